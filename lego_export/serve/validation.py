"""The JSON body of ``POST /v1/images``: parsed, type-checked and validated before anything is allocated.

A request is :class:`~lego_export.options.SamplingOptions` (checked by its own ``validate``, as for
lego-run) plus what only HTTP has: how many images, which classes, the canvas, the seed, the answer's
format and grid columns, and whether to answer at once or as a job. Any failure is a
:class:`RequestError` carrying the HTTP status and a one-line message naming the JSON field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lego_export.config import LegoConfig
from lego_export.edm import Churn
from lego_export.errors import LegoError
from lego_export.jsonio import loads_strict
from lego_export.ladder import serving_ladder
from lego_export.manifest import Manifest
from lego_export.options import FIELDS as OPTION_FIELD_NAMES
from lego_export.options import (
    MAX_SEED,
    OptionError,
    SamplingOptions,
    check_classes,
    check_request,
    parse_canvas,
    resolve,
)
from lego_export.plan import plan
from lego_export.points import point_names, resolve_quality
from lego_export.serve.config import Limits

MAX_BODY_BYTES = 64 * 1024  # a request is a few hundred bytes; anything this large is not one
RESPONSE_FORMATS = {"png": "image/png", "npz": "application/octet-stream"}
# SamplingOptions field -> JSON field, where they differ, and back
JSON_NAMES = {
    "guidance": "cfg",
    "guidance_interval": "cfg_interval",
    "guidance_cache": "cfg_cache",
    "skip.late": "skip",
}
OPTION_NAMES = {"cfg": "guidance", "cfg_interval": "guidance_interval", "cfg_cache": "guidance_cache"}
OPTION_FIELDS = {JSON_NAMES.get(name, name) for name in OPTION_FIELD_NAMES}
REQUEST_FIELDS = {"class", "classes", "resolution", "seed", "num", "format", "columns", "recommended", "async",
                  "stream", "deadline_s", "priority", "quality"}  # fmt: skip
MAX_DEADLINE_S = 86_400.0
MAX_PRIORITY = 9
QUALITIES = ("elastic", "exact")  # or a rung number: degrade at most to that rung of the ladder
FIELDS = OPTION_FIELDS | REQUEST_FIELDS
CHURN_FIELDS = set(Churn.__dataclass_fields__)


class RequestError(Exception):
    """A refused request: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


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
    """The JSON schema of a request body (the OpenAPI document's): every field, its type and its
    limits as this server checks them. The server's own checks stay the authority; the schema says
    what they accept."""
    from lego_export.edm import SAMPLERS
    from lego_export.options import MAX_GUIDANCE

    classes = manifest.model.num_classes if manifest is not None else 0
    names = list(manifest.class_names or []) if manifest is not None else []
    label = {"oneOf": [{"type": "integer", "minimum": 0, **({"maximum": classes - 1} if classes else {})},
                       {"type": "string", **({"enum": names} if names else {})}]}  # fmt: skip
    number = {"type": "number"}
    churn_object = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"s_churn": number, "s_min": number, "s_max": {"type": ["number", "null"]}, "s_noise": number},
    }
    properties = {
        "class": {**label, "description": "one class for every image: an index, or a name from the manifest"},
        "classes": {"type": "array", "items": label, "minItems": 1, "description": "cycled over the images"},
        "num": {"type": "integer", "minimum": 1, "maximum": limits.max_images, "default": 1},
        "resolution": {
            "type": "string",
            "pattern": "^[0-9]+[xX][0-9]+$",
            "description": f"HxW, at most {limits.max_resolution} a side, multiples of the largest brick",
        },  # fmt: skip
        "steps": {"type": "integer", "minimum": 1, "maximum": limits.max_steps},
        "sampler": {"type": "string", "enum": list(SAMPLERS)},
        "skip": {"type": "string", "description": '"none", "late", or rules "K@LO:HI,..." in sigma'},
        "t_break": {"type": "number", "minimum": 0, "maximum": 1, "description": 'only with skip "late"'},
        "reuse_residual": {"type": "boolean"},
        "recommended": {"type": "boolean", "default": True},
        "cfg": {"type": "number", "minimum": -MAX_GUIDANCE, "maximum": MAX_GUIDANCE, "default": 1.0},
        "cfg_interval": {"type": "string", "description": 'guidance only at steps with LO <= sigma <= HI: "LO:HI"'},
        "churn": {"oneOf": [{"type": "number", "minimum": 0}, churn_object]},
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
            "oneOf": [
                {"type": "string", "enum": [*QUALITIES, *point_names(manifest.recommended if manifest else None)]},
                {"type": "integer", "minimum": 0},
            ],
            "description": "elastic, exact, the lowest rung of the ladder allowed, or a named point (never degraded)",
            "default": "elastic",
        },  # fmt: skip
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


def _int(data: dict, name: str, default: int, lo: int, hi: int, over_limit: bool = False) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name} must be an integer, got {value!r}")
    if value > hi and over_limit:
        raise RequestError(413, f"{name} {value} is over this server's limit of {hi}")
    if not lo <= value <= hi:
        raise RequestError(400, f"{name} must be from {lo} to {hi}, got {value}")
    return value


def _churn(value) -> Churn | None:
    """A number (S_churn, EDM's defaults for the rest) or an object of s_churn, s_min, s_max, s_noise;
    the numbers are checked with the other options (SamplingOptions.validate)."""
    if value is None or value == 0:
        return None
    if not isinstance(value, dict):
        return Churn(value)
    unknown = set(value) - CHURN_FIELDS
    if unknown:
        raise RequestError(400, f"churn has unknown field {sorted(unknown)[0]!r}")
    s_max = value.get("s_max")  # null or absent: no upper bound (JSON has no infinity)
    return Churn(value.get("s_churn", 0.0), value.get("s_min", 0.0), math.inf if s_max is None else s_max,
                 value.get("s_noise", 1.0))  # fmt: skip


def _classes(data: dict) -> list | None:
    if "class" in data and "classes" in data:
        raise RequestError(400, "give class or classes, not both")
    if "class" in data:
        return [data["class"]]
    value = data.get("classes")
    if value is not None and (not isinstance(value, list) or not value):
        raise RequestError(400, f"classes must be a non-empty list of class indices or names, got {value!r}")
    return value


def _deadline(data: dict) -> float | None:
    value = data.get("deadline_s")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_DEADLINE_S:
        raise RequestError(
            400, f"deadline_s must be a number of seconds above 0 and at most {MAX_DEADLINE_S:g}, got {value!r}"
        )
    return float(value)


def _quality(data: dict, rungs: int, names: Sequence[str] = ()) -> str | int:
    """The quality asked for: "elastic", "exact", a rung of the ladder (rungs: how many, the top
    included), or one of the model's named points (names)."""
    value = data.get("quality", "elastic")
    if value in QUALITIES or (isinstance(value, str) and value in names):
        return value
    if isinstance(value, str):
        have = f"this model's named points: {', '.join(names)}" if names else "this model has no named points"
        raise RequestError(400, f'quality must be "elastic", "exact", a rung number or a named point ({have}), '
                                f"got {value!r}")  # fmt: skip
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RequestError(400, f'quality must be "elastic", "exact" or a rung number of the ladder, got {value!r}')
    if value >= rungs:
        raise RequestError(400, f"quality {value}: this model has rungs 0 to {rungs - 1}")
    return value


def _bool(data: dict, name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false, got {value!r}")
    return value


def parse_image_request(data: dict, manifest: Manifest, limits: Limits, rungs: int | None = None) -> ImageRequest:
    """Validate a request body against the model and this server's limits: 400 for a bad field, 413
    for one over a limit, each message naming the field. rungs: how many rungs the serving ladder has
    (a server knows; else derived from the manifest, which plans every default rung)."""
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r}; known: {', '.join(sorted(FIELDS))}")
    given = {OPTION_NAMES.get(k, k): v for k, v in data.items() if k in OPTION_FIELDS and v is not None}
    if "churn" in given:
        given["churn"] = _churn(given["churn"])
    tuned = manifest.recommended if _bool(data, "recommended", True) else None
    model = manifest.model
    names = {**JSON_NAMES, "classes": "class"} if "class" in data else JSON_NAMES
    rungs = len(serving_ladder(manifest).rungs) if rungs is None else rungs
    quality = _quality(data, rungs, point_names(manifest.recommended))
    point = quality if isinstance(quality, str) and quality not in QUALITIES else None
    try:
        if point is not None:  # a named point: its setting, run as asked (never degraded)
            options, used = resolve_quality(given, manifest.recommended, point)
        else:
            options, used = resolve(given, tuned.options if tuned is not None else None)
        steps = options.steps
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > limits.max_steps:
            raise RequestError(413, f"steps {steps} is over this server's limit of {limits.max_steps}")
        canvas = parse_canvas(data["resolution"]) if data.get("resolution") is not None else None
        if canvas is not None and max(canvas) > limits.max_resolution:
            limit = limits.max_resolution
            raise RequestError(413, f"resolution {data['resolution']!r} is over this server's limit of {limit} a side")
        format = data.get("format", "png")
        if not isinstance(format, str) or format not in RESPONSE_FORMATS:
            raise RequestError(400, f"format must be one of {', '.join(RESPONSE_FORMATS)}, got {format!r}")
        req = ImageRequest(
            options=options,
            num=_int(data, "num", 1, 1, limits.max_images, over_limit=True),
            resolution=canvas,
            seed=_int(data, "seed", 0, 0, MAX_SEED),
            format=format,
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
        # batch = num: a request's images are sampled together (ImageRequest.to_pipeline)
        check_request(num=req.num, batch=req.num, seed=req.seed, canvas=hw, channels=model.img_channels)
    except OptionError as e:
        raise RequestError(400, str(e.renamed(names))) from None
    except LegoError as e:
        raise RequestError(400, str(e)) from None
    return req
