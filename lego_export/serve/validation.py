"""The JSON body of ``POST /v1/images``: parsed, type-checked and validated before anything is allocated.

A request is :class:`~lego_export.options.SamplingOptions` (checked by its own ``validate``, as for
lego-run) plus what only HTTP has. Any failure is a :class:`RequestError`: the HTTP status and a
one-line message naming the JSON field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from lego_export.config import LegoConfig
from lego_export.edm import SAMPLERS, Churn
from lego_export.errors import LegoError
from lego_export.jsonio import loads_strict
from lego_export.ladder import serving_ladder
from lego_export.manifest import Manifest
from lego_export.options import (
    MAX_GUIDANCE,
    MAX_SEED,
    OptionError,
    SamplingOptions,
    check_classes,
    check_request,
    parse_canvas,
)
from lego_export.plan import plan
from lego_export.points import point_names, resolve_quality
from lego_export.serve.config import Limits

MAX_BODY_BYTES = 64 * 1024  # a request is a few hundred bytes; anything this large is not one
MAX_DEADLINE_S = 86_400.0
MAX_PRIORITY = 9
RESPONSE_FORMATS = {"png": "image/png", "npz": "application/octet-stream"}
QUALITIES = ("elastic", "exact")  # or a rung number: degrade at most to that rung of the ladder
# SamplingOptions field -> JSON field, where they differ ("skip.late": how option errors name skip), and back
JSON_NAMES = {"guidance": "cfg", "guidance_interval": "cfg_interval", "guidance_cache": "cfg_cache",
              "skip.late": "skip"}  # fmt: skip
OPTION_NAMES = {"cfg": "guidance", "cfg_interval": "guidance_interval", "cfg_cache": "guidance_cache"}
OPTION_FIELDS = {JSON_NAMES.get(f.name, f.name) for f in fields(SamplingOptions)}
REQUEST_FIELDS = {"class", "classes", "resolution", "seed", "num", "format", "columns", "recommended", "async",
                  "stream", "deadline_s", "priority", "quality"}  # fmt: skip
FIELDS = OPTION_FIELDS | REQUEST_FIELDS


class RequestError(Exception):
    """A refused request: HTTP status, a one-line message, and seconds for Retry-After (None: retrying
    as it is cannot help)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass
class ImageRequest:
    """One validated request: the sampling options and what only HTTP has."""

    options: SamplingOptions = field(default_factory=SamplingOptions)
    num: int = 1
    resolution: tuple[int, int] | None = None
    classes: list[int] | None = None
    seed: int = 0
    format: str = "png"
    columns: int = 8
    is_async: bool = False
    stream: bool = False  # answer with the job's server-sent events (as GET /v1/jobs/{id}/events)
    recommended: bool = False  # the options are the model's recommended setting
    deadline_s: float | None = None  # finish within this many seconds of arrival (None: the server's --slo)
    priority: int = 0  # higher runs first (0 to MAX_PRIORITY)
    quality: str | int = "elastic"  # "exact": never degraded; elastic: any rung; k: rungs 0..k only
    point: str | None = None  # the model's named point asked for ("quality": NAME): its options, never degraded

    def pipe_kwargs(self) -> dict:
        """The offline pipeline's arguments for the same images: the whole request is one batch (images do not
        depend on the batch size)."""
        return dict(options=self.options, num=self.num, resolution=self.resolution, classes=self.classes,
                    seed=self.seed, batch=self.num)  # fmt: skip

    def canvas(self, model: LegoConfig) -> tuple[int, int]:
        """The canvas it samples: its resolution, else the model's training size."""
        return self.resolution or (model.img_resolution, model.img_resolution)

    @property
    def media_type(self) -> str:
        return RESPONSE_FORMATS[self.format]

    def describe(self) -> dict:
        """What was asked, for the answer (headers and job JSON)."""
        asked = {"options": self.options.to_dict(), "recommended": self.recommended, "seed": self.seed}
        return {**asked, "point": self.point} if self.point else asked


def request_schema(limits: Limits, manifest: Manifest | None = None) -> dict:
    """The JSON schema of a request body (the OpenAPI document's): every field, its type and the limits
    this server checks (the checks stay the authority)."""
    classes = manifest.model.num_classes if manifest is not None else 0
    names = list(manifest.class_names or []) if manifest is not None else []
    points = point_names(manifest.recommended if manifest is not None else None)
    label = {"oneOf": [{"type": "integer", "minimum": 0, **({"maximum": classes - 1} if classes else {})},
                       {"type": "string", **({"enum": names} if names else {})}]}  # fmt: skip
    number = {"type": "number"}
    s_max = {"type": ["number", "null"]}
    churn = {"type": "object", "additionalProperties": False,
             "properties": {"s_churn": number, "s_min": number, "s_max": s_max, "s_noise": number}}  # fmt: skip
    side = f"HxW, at most {limits.max_resolution} a side, multiples of the largest brick"
    properties = {
        "class": {**label, "description": "one class for every image: an index, or a name from the manifest"},
        "classes": {"type": "array", "items": label, "minItems": 1, "description": "cycled over the images"},
        "num": {"type": "integer", "minimum": 1, "maximum": limits.max_images, "default": 1},
        "resolution": {"type": "string", "pattern": "^[0-9]+[xX][0-9]+$", "description": side},
        "steps": {"type": "integer", "minimum": 1, "maximum": limits.max_steps},
        "sampler": {"type": "string", "enum": list(SAMPLERS)},
        "skip": {"type": "string", "description": '"none", "late", or rules "K@LO:HI,..." in sigma'},
        "t_break": {"type": "number", "minimum": 0, "maximum": 1, "description": 'only with skip "late"'},
        "reuse_residual": {"type": "boolean"},
        "recommended": {"type": "boolean", "default": True},
        "cfg": {"type": "number", "minimum": -MAX_GUIDANCE, "maximum": MAX_GUIDANCE, "default": 1.0},
        "cfg_interval": {"type": "string", "description": 'guidance only at steps with LO <= sigma <= HI: "LO:HI"'},
        "churn": {"oneOf": [{"type": "number", "minimum": 0}, churn]},
        "cache": {"type": "string", "description": 'brick caching rules "K@LO:HI,...": brick K runs only there'},
        "forecast": {"type": "integer", "minimum": 0, "maximum": 2, "default": 0},
        "gate": {"type": ["number", "null"], "minimum": 0, "description": "per-image gate (relative L1 change)"},
        "gate_signal": {"type": "string", "enum": ["brick0", "input"], "default": "brick0"},
        "cfg_cache": {"type": "string", "description": 'guided steps in "LO:HI" run the conditional half only'},
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED, "default": 0},
        "tile_shift": {"type": ["boolean", "null"]},
        "format": {"type": "string", "enum": list(RESPONSE_FORMATS), "default": "png"},
        "columns": {"type": "integer", "minimum": 1, "maximum": 1024, "default": 8},
        "async": {"type": "boolean", "default": False},
        "stream": {"type": "boolean", "default": False},
        "deadline_s": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_DEADLINE_S},
        "priority": {"type": "integer", "minimum": 0, "maximum": MAX_PRIORITY, "default": 0},
        "quality": {
            "oneOf": [{"type": "string", "enum": [*QUALITIES, *points]}, {"type": "integer", "minimum": 0}],
            "description": "elastic, exact, the lowest rung of the ladder allowed, or a named point (never degraded)",
            "default": "elastic",
        },
    }
    assert set(properties) == FIELDS, set(properties) ^ FIELDS  # the schema names every field, no other
    return {"type": "object", "additionalProperties": False, "properties": properties}


def parse_body(body: bytes) -> dict:
    """JSON object from the raw body; NaN and Infinity literals are refused like any bad JSON."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        data = loads_strict(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "body must be a JSON object")
    return data


def _get(data: dict, name: str, default: Any, ok: Callable[[Any], bool], expected: str) -> Any:
    """data[name] (default if absent) if ok(it), else a 400: "{name} must be {expected}, got {value!r}"."""
    value = data.get(name, default)
    if not ok(value):
        raise RequestError(400, f"{name} must be {expected}, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(data: dict, name: str, default: int, lo: int, hi: int, over_limit: bool = False) -> int:
    """An integer from lo to hi; over_limit: above hi is over this server's limit (413)."""
    value = _get(data, name, default, _is_int, "an integer")
    if value > hi and over_limit:
        raise RequestError(413, f"{name} {value} is over this server's limit of {hi}")
    if not lo <= value <= hi:
        raise RequestError(400, f"{name} must be from {lo} to {hi}, got {value}")
    return value


def _bool(data: dict, name: str, default: bool) -> bool:
    return _get(data, name, default, lambda v: isinstance(v, bool), "true or false")


def _deadline(data: dict) -> float | None:
    def ok(v: Any) -> bool:
        return v is None or ((_is_int(v) or isinstance(v, float)) and 0 < v <= MAX_DEADLINE_S)

    value = _get(data, "deadline_s", None, ok, f"a number of seconds above 0 and at most {MAX_DEADLINE_S:g}")
    return None if value is None else float(value)


def _churn(value: Any) -> Churn | None:
    """A number (S_churn, EDM's defaults for the rest) or an object of s_churn, s_min, s_max, s_noise;
    the numbers are checked with the other options (SamplingOptions.validate)."""
    if value is None or value == 0:
        return None
    if not isinstance(value, dict):
        return Churn(value)
    unknown = sorted(set(value) - set(Churn.__dataclass_fields__))
    if unknown:
        raise RequestError(400, f"churn has unknown field {unknown[0]!r}")
    s_max = value.get("s_max")  # null or absent: no upper bound (JSON has no infinity)
    return Churn(value.get("s_churn", 0.0), value.get("s_min", 0.0), math.inf if s_max is None else s_max,
                 value.get("s_noise", 1.0))  # fmt: skip


def _classes(data: dict) -> list | None:
    if "class" in data and "classes" in data:
        raise RequestError(400, "give class or classes, not both")
    if "class" in data:
        return [data["class"]]
    expected = "a non-empty list of class indices or names"
    return _get(data, "classes", None, lambda v: v is None or (isinstance(v, list) and len(v) > 0), expected)


def _quality(data: dict, rungs: int, names: Sequence[str]) -> str | int:
    """The quality asked for: "elastic", "exact", a rung of the ladder (rungs: how many, the top
    included), or one of the model's named points (names)."""
    value = data.get("quality", "elastic")
    if value in QUALITIES or (isinstance(value, str) and value in names):
        return value
    if isinstance(value, str):
        have = f"this model's named points: {', '.join(names)}" if names else "this model has no named points"
        raise RequestError(400, f'quality must be "elastic", "exact", a rung number or a named point ({have}), '
                                f"got {value!r}")  # fmt: skip
    if not _is_int(value) or value < 0:
        raise RequestError(400, f'quality must be "elastic", "exact" or a rung number of the ladder, got {value!r}')
    if value >= rungs:
        raise RequestError(400, f"quality {value}: this model has rungs 0 to {rungs - 1}")
    return value


def parse_image_request(data: dict, manifest: Manifest, limits: Limits, rungs: int | None = None) -> ImageRequest:
    """Validate a request body against the model and this server's limits: 400 for a bad field, 413
    for one over a limit, each message naming the field. rungs: how many rungs the serving ladder has
    (a server knows; else derived from the manifest)."""
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r}; known: {', '.join(sorted(FIELDS))}")
    given = {OPTION_NAMES.get(k, k): v for k, v in data.items() if k in OPTION_FIELDS and v is not None}
    if "churn" in given:
        given["churn"] = _churn(given["churn"])
    use_recommended = _bool(data, "recommended", True)
    rungs = len(serving_ladder(manifest).rungs) if rungs is None else rungs
    quality = _quality(data, rungs, point_names(manifest.recommended))
    point = quality if isinstance(quality, str) and quality not in QUALITIES else None
    model = manifest.model
    try:
        # a named point's setting is used whatever "recommended" says
        tuned = manifest.recommended if use_recommended or point is not None else None
        options, used = resolve_quality(given, tuned, point)
        if _is_int(options.steps) and options.steps > limits.max_steps:
            raise RequestError(413, f"steps {options.steps} is over this server's limit of {limits.max_steps}")
        canvas = parse_canvas(data["resolution"]) if data.get("resolution") is not None else None
        if canvas is not None and max(canvas) > limits.max_resolution:
            limit = limits.max_resolution
            raise RequestError(413, f"resolution {data['resolution']!r} is over this server's limit of {limit} a side")
        formats = f"one of {', '.join(RESPONSE_FORMATS)}"
        req = ImageRequest(
            options=options,
            format=_get(data, "format", "png", lambda v: isinstance(v, str) and v in RESPONSE_FORMATS, formats),
            num=_int(data, "num", 1, 1, limits.max_images, over_limit=True),
            resolution=canvas,
            seed=_int(data, "seed", 0, 0, MAX_SEED),
            columns=_int(data, "columns", 8, 1, 1024),
            is_async=_bool(data, "async", False),
            stream=_bool(data, "stream", False),
            recommended=used,
            deadline_s=_deadline(data),
            priority=_int(data, "priority", 0, 0, MAX_PRIORITY),
            quality="exact" if point is not None else quality,
            point=point,
        )
        if req.is_async and req.stream:
            raise RequestError(400, "async and stream: choose one (a streamed job's result is at /v1/jobs/{id}/result)")
        hw = req.canvas(model)
        plan(options, model, hw, req.seed)  # every option against the model, the canvas against the bricks
        req.classes = check_classes(_classes(data), model.num_classes, manifest.class_names) or None
        check_request(num=req.num, batch=req.num, seed=req.seed, canvas=hw, channels=model.img_channels)
    except OptionError as e:
        names = {**JSON_NAMES, "classes": "class"} if "class" in data else JSON_NAMES
        raise RequestError(400, str(e.renamed(names))) from None
    except LegoError as e:
        raise RequestError(400, str(e)) from None
    return req
