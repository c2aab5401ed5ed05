"""The server's settings, declared once: lego-serve's options and Ray Serve's ``key=value`` options
are both derived from :class:`ServeConfig`'s fields, and checked by :meth:`ServeConfig.check`.

Each field's metadata gives its help text and its range or choices; errors are OptionErrors naming
the field, which lego-serve shows as its flag and Ray Serve as its key.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from lego_export.options import MAX_IMAGES, MAX_SIDE, MAX_STEPS, OptionError
from lego_export.runtime.backends import BACKENDS, COMPUTE_PRECISIONS, MAX_THREADS

MAX_DRAIN_S = 86_400.0


def setting(default, help: str, *, range: tuple | None = None, choices: tuple | None = None, **extra):
    """A field of ServeConfig with what its options need: help, and a range or choices."""
    return field(default=default, metadata={"help": help, "range": range, "choices": choices, **extra})


@dataclass(frozen=True)
class ServeConfig:
    """Everything one server process needs (lego-serve's options; each Ray replica's)."""

    engines: str = setting("engines", "Folder written by lego-export build.")
    backend: str = setting(
        "auto", "Engine backend, shared by every request; auto chooses as lego-run does.", choices=BACKENDS
    )
    precision: str = setting(
        "fp32", "What the bricks compute in, as lego-run's --precision.", choices=COMPUTE_PRECISIONS
    )
    ckpt: str | None = setting(None, "Checkpoint, for --backend torch.")
    threads: int = setting(0, "Engine threads (0: all cores).", range=(0, MAX_THREADS))
    streams: int = setting(
        1,
        "Engine calls of different requests that run at once, each on its share of the threads (ONNX Runtime, "
        "OpenVINO); 0: two on ONNX Runtime on a CPU of two or more cores, else one.",
        range=(0, 64),
    )
    max_batch_tiles: int = setting(0, "Most tiles per engine call (0: the manifest's N range).", range=(0, 2**31 - 1))
    max_active: int = setting(16, "Requests sampling at once.", range=(1, 4096))
    max_queue: int = setting(64, "Requests waiting for a slot; more get 429.", range=(0, 1_000_000))
    calibrate: bool = setting(
        True,
        "Time each engine at startup: the cost model that prices requests (deadlines, the ladder) and the "
        "chunk size of engine calls. Without it, requests run in arrival order and only deadline_s applies.",
    )
    slo: str = setting(
        "none",
        'Deadline of a request without deadline_s: seconds ("30s") or a multiple of its own predicted time '
        'alone ("5x"). A request that cannot meet it is refused (429) or, unless "quality": "exact", runs at a '
        "cheaper rung of the quality ladder; a late one ends as expired (504).",
    )
    max_resolution: int = setting(256, "Largest canvas side a request may ask for.", range=(1, MAX_SIDE))
    max_steps: int = setting(1000, "Most sampling steps a request may ask for.", range=(1, MAX_STEPS))
    max_images: int = setting(64, "Most images per request.", range=(1, MAX_IMAGES))
    keep_jobs: int = setting(256, "Finished asynchronous jobs kept for GET /v1/jobs/{id}.", range=(0, 1_000_000))
    job_ttl_s: float = setting(600.0, "Seconds a finished job is kept at most.", range=(0, 86_400), unit=" seconds")
    drain_timeout: float = setting(
        30.0,
        "On SIGTERM / Ctrl-C: seconds running requests may take before they are failed.",
        range=(0, MAX_DRAIN_S),
        unit=" seconds",
    )
    docs: bool = setting(True, "Serve the OpenAPI document at /openapi.json and its page at /docs.")
    ui: bool = setting(True, "Serve the playground page at /.")

    @property
    def limits(self) -> Limits:
        return Limits(max_resolution=self.max_resolution, max_steps=self.max_steps, max_images=self.max_images)

    def check(self) -> ServeConfig:
        """Every field against its type, range or choices, and the rules between them; returns self."""
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            kind = type(f.default) if f.default is not None else str
            if value is None and f.default is None:
                continue
            if kind is bool and not isinstance(value, bool):
                raise OptionError(f.name, f"must be true or false, got {value!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise OptionError(f.name, f"must be an integer, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise OptionError(f.name, f"must be a number, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise OptionError(f.name, f"must be a string, got {value!r}")
            if meta["range"] is not None and not meta["range"][0] <= value <= meta["range"][1]:
                lo, hi = meta["range"]
                what = f"an integer from {lo} to {hi}" if kind is int else f"{lo:g} to {hi:g}{meta.get('unit', '')}"
                raise OptionError(f.name, f"must be {what}, got {value!r}")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise OptionError(f.name, f"must be one of {', '.join(meta['choices'])}, got {value!r}")
        parse_slo(self.slo)
        return self

    def describe(self) -> dict:
        """Every setting by name, the request limits as one object (GET /healthz)."""
        limits = asdict(self.limits)
        return {**{k: v for k, v in asdict(self).items() if k not in limits}, "limits": limits}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a server (checked before anything is allocated); by default
    lego-serve's, which admit every documented recipe (the LEGO authors' FID recipe samples 256 steps)."""

    max_resolution: int = ServeConfig.max_resolution  # largest canvas side, pixels
    max_steps: int = ServeConfig.max_steps
    max_images: int = ServeConfig.max_images


def parse_slo(text: str) -> tuple[str, float] | None:
    """--slo: "none", "N" or "Ns" (seconds), or "Nx" (N times the request's predicted time alone)."""
    value = str(text).strip().lower()
    if value in ("", "none"):
        return None
    unit = "x" if value.endswith("x") else "s"
    try:
        number = float(value.rstrip("xs"))
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and 0 < number <= 86_400 and (unit == "s" or number >= 1)):
        raise OptionError("slo", f'must be "none", seconds ("30s") or a multiple of at least 1 ("5x"), got {text!r}')
    return unit, number


def config_fields() -> tuple:
    """ServeConfig's fields, from which each surface derives its options."""
    return fields(ServeConfig)
