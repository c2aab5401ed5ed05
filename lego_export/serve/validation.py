"""The JSON body of ``POST /v1/images``: parsed, type-checked and validated before anything is allocated.

A request is :class:`~lego_export.options.SamplingOptions` (checked by its own ``validate``, as for
lego-run) plus what only HTTP has: how many images, which classes, the canvas, the seed, the answer's
format and grid columns, and whether to answer at once or as a job. Any failure is a
:class:`RequestError` carrying the HTTP status and a one-line message naming the JSON field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lego_export.edm import SAMPLERS, Churn
from lego_export.errors import LegoError
from lego_export.jsonio import loads_strict
from lego_export.manifest import Manifest
from lego_export.options import (
    MAX_SEED,
    OptionError,
    SamplingOptions,
    check_classes,
    check_request,
    parse_canvas,
    resolve,
)
from lego_export.runtime.plan import plan

MAX_BODY_BYTES = 64 * 1024  # a request is a few hundred bytes; anything this large is not one
RESPONSE_FORMATS = {"png": "image/png", "npz": "application/octet-stream"}
OPTION_FIELDS = {"steps", "sampler", "skip", "t_break", "reuse_residual", "churn", "cfg", "tile_shift"}
JSON_NAMES = {"guidance": "cfg", "skip.late": "skip"}  # SamplingOptions field -> JSON field, where they differ
REQUEST_FIELDS = {"class", "classes", "resolution", "seed", "num", "format", "columns", "recommended", "async"}
FIELDS = OPTION_FIELDS | REQUEST_FIELDS
CHURN_FIELDS = set(Churn.__dataclass_fields__)


class RequestError(Exception):
    """A refused request: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Limits:
    """What one request may ask of this server (checked before anything is allocated); the defaults
    admit every documented recipe (the LEGO authors' FID recipe samples 256 steps)."""

    max_resolution: int = 256  # largest canvas side, pixels
    max_steps: int = 1000
    max_images: int = 64


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
    recommended: bool = False  # the options are the model's recommended setting

    def pipe_kwargs(self) -> dict:
        """The offline pipeline's arguments for the same images; the whole request is one batch, so
        each evaluation reaches the batcher at once (images do not depend on the batch size)."""
        return dict(
            options=self.options,
            num=self.num,
            resolution=self.resolution,
            classes=self.classes,
            seed=self.seed,
            batch=self.num,
        )

    @property
    def media_type(self) -> str:
        return RESPONSE_FORMATS[self.format]

    def describe(self) -> dict:
        """What ran, for the answer (headers and job JSON)."""
        return {"options": self.options.to_dict(), "recommended": self.recommended, "seed": self.seed}


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


def _int(data: dict, name: str, default: int, lo: int, hi: int, over_limit: bool = False) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name} must be an integer, got {value!r}")
    if value > hi and over_limit:
        raise RequestError(413, f"{name} {value} is over this server's limit of {hi}")
    if not lo <= value <= hi:
        raise RequestError(400, f"{name} must be from {lo} to {hi}, got {value}")
    return value


def _float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(400, f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise RequestError(400, f"{name} must be a finite number, got {value}")
    return value


def _bool(data: dict, name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false, got {value!r}")
    return value


def _choice(data: dict, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = data.get(name, default)
    if value not in choices:
        raise RequestError(400, f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _churn(value) -> Churn | None:
    """A number (S_churn, EDM's defaults for the rest) or an object of s_churn, s_min, s_max, s_noise."""
    if value is None or value == 0:
        return None
    if isinstance(value, dict):
        unknown = set(value) - CHURN_FIELDS
        if unknown:
            raise RequestError(400, f"churn has unknown field {sorted(unknown)[0]!r}")
        s_max = value.get("s_max")  # null or absent: no upper bound (JSON has no infinity)
        churn = Churn(
            _float(value.get("s_churn", 0.0), "churn.s_churn"),
            _float(value.get("s_min", 0.0), "churn.s_min"),
            math.inf if s_max is None else _float(s_max, "churn.s_max"),
            _float(value.get("s_noise", 1.0), "churn.s_noise"),
        )
    else:
        churn = Churn(_float(value, "churn"))
    if churn.s_churn == 0:
        return None
    return churn


def _skip(data: dict) -> str:
    value = data.get("skip", "none")
    if not isinstance(value, str):
        raise RequestError(400, f'skip must be "none", "late" or a policy like "2@0.5:", got {value!r}')
    return value


def _classes(data: dict) -> list | None:
    if "class" in data and "classes" in data:
        raise RequestError(400, "give class or classes, not both")
    if "class" in data:
        return [data["class"]]
    if "classes" in data:
        value = data["classes"]
        if not isinstance(value, list) or not value:
            raise RequestError(400, f"classes must be a non-empty list of class indices or names, got {value!r}")
        return value
    return None


def parse_image_request(data: dict, manifest: Manifest, limits: Limits) -> ImageRequest:
    """Validate a request body against the model and this server's limits: 400 for a bad field, 413
    for one over a limit, each message naming the field."""
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r}; known: {', '.join(sorted(FIELDS))}")
    given = {}
    if "steps" in data:
        given["steps"] = _int(data, "steps", 50, 1, limits.max_steps, over_limit=True)
    if "sampler" in data:
        given["sampler"] = _choice(data, "sampler", "heun", SAMPLERS)
    if "skip" in data:
        given["skip"] = _skip(data)
    if "t_break" in data:
        given["t_break"] = _float(data["t_break"], "t_break")
    if "reuse_residual" in data:
        given["reuse_residual"] = _bool(data, "reuse_residual", False)
    if "churn" in data:
        given["churn"] = _churn(data["churn"])
    if "cfg" in data:
        given["guidance"] = _float(data["cfg"], "cfg")
    tile_shift = data.get("tile_shift")
    if tile_shift is not None and not isinstance(tile_shift, bool):
        raise RequestError(400, f"tile_shift must be true, false or null, got {tile_shift!r}")
    if tile_shift is not None:
        given["tile_shift"] = tile_shift
    tuned = manifest.recommended if _bool(data, "recommended", True) else None
    model = manifest.model
    try:
        options, used = resolve(given, tuned.options if tuned is not None else None)
        if options.steps > limits.max_steps:  # the recommended setting's own steps
            raise RequestError(413, f"the model's recommended {options.steps} steps are over this server's limit")
        canvas = None
        if data.get("resolution") is not None:
            canvas = parse_canvas(data["resolution"])
            if max(canvas) > limits.max_resolution:
                raise RequestError(
                    413,
                    f"resolution {data['resolution']!r} is over this server's limit of {limits.max_resolution} a side",
                )
        req = ImageRequest(
            options=options,
            num=_int(data, "num", 1, 1, limits.max_images, over_limit=True),
            resolution=canvas,
            seed=_int(data, "seed", 0, 0, MAX_SEED),
            format=_choice(data, "format", "png", tuple(RESPONSE_FORMATS)),
            columns=_int(data, "columns", 8, 1, 1024),
            is_async=_bool(data, "async", False),
            recommended=used,
        )
        classes = _classes(data)
        req.classes = check_classes(classes, model.num_classes, manifest.class_names) or None
        hw = canvas or (model.img_resolution, model.img_resolution)
        check_request(req.num, req.num, req.seed, hw, model.img_channels)
        plan(options, model, hw, req.seed)  # options against the model, canvas against its bricks
    except OptionError as e:
        names = {**JSON_NAMES, "classes": "class"} if "class" in data else JSON_NAMES
        raise RequestError(400, str(e.renamed(names))) from None
    except LegoError as e:
        raise RequestError(400, str(e)) from None
    return req
