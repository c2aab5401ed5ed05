"""The JSON body of ``POST /v1/images``: parsed, type-checked and validated before anything is allocated.

Every check lego-run makes applies (``check_request``, the skip policy parser, the class range,
finite guidance, churn), plus the server's own limits. Any failure is a :class:`RequestError`
carrying the HTTP status and a one-line message naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lego_export.edm import SAMPLERS, Churn
from lego_export.errors import LegoError
from lego_export.manifest import loads_strict
from lego_export.runtime.pipeline import DEFAULT_T_BREAK, LegoPipeline, check_request

MAX_BODY_BYTES = 64 * 1024  # a request is a few hundred bytes; anything this large is not one
FORMATS = {"png": "image/png", "npz": "application/octet-stream"}
FIELDS = {
    "class",
    "classes",
    "resolution",
    "steps",
    "sampler",
    "skip",
    "t_break",
    "cfg",
    "churn",
    "seed",
    "num",
    "format",
    "columns",
    "tile_shift",
    "reuse_residual",
    "recommended",
    "async",
}
SAMPLING_FIELDS = {"steps", "sampler", "skip", "t_break", "reuse_residual", "churn"}
CHURN_FIELDS = {"s_churn", "s_min", "s_max", "s_noise"}


class RequestError(Exception):
    """A refused request: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Limits:
    """What one request may ask of this server (checked before anything is allocated)."""

    max_resolution: int = 256  # largest canvas side, pixels
    max_steps: int = 250
    max_images: int = 64


@dataclass
class ImageRequest:
    """One validated request; :meth:`pipe_kwargs` are the offline pipeline's arguments."""

    num: int = 1
    steps: int = 50
    sampler: str = "heun"
    skip: str | None = None
    t_break: float = DEFAULT_T_BREAK
    resolution: tuple[int, int] | None = None
    classes: list[int] | None = None
    guidance: float = 1.0
    seed: int = 0
    churn: Churn | None = None
    tile_shift: bool | None = None
    reuse_residual: bool = False
    format: str = "png"
    columns: int = 8
    is_async: bool = False

    def pipe_kwargs(self) -> dict:
        """The same arguments lego-run passes to LegoPipeline; the whole request is one batch, so
        each evaluation reaches the scheduler at once (images do not depend on the batch size)."""
        return dict(
            num=self.num,
            steps=self.steps,
            sampler=self.sampler,
            skip=self.skip,
            t_break=self.t_break,
            resolution=self.resolution,
            classes=self.classes,
            guidance=self.guidance,
            seed=self.seed,
            batch=self.num,
            tile_shift=self.tile_shift,
            churn=self.churn,
            reuse_residual=self.reuse_residual,
        )

    @property
    def media_type(self) -> str:
        return FORMATS[self.format]


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


def _resolution(value, limits: Limits) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(400, f'resolution must be a string HxW, e.g. "32x96", got {value!r}')
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise RequestError(400, f"resolution {value!r}: write HxW, e.g. 32x96") from None
    if h < 1 or w < 1:
        raise RequestError(400, f"resolution {value!r}: sides must be positive")
    if max(h, w) > limits.max_resolution:
        raise RequestError(413, f"resolution {value!r} is over this server's limit of {limits.max_resolution} a side")
    return h, w


def _classes(data: dict) -> list[int] | None:
    if "class" in data and "classes" in data:
        raise RequestError(400, "give class or classes, not both")
    if "class" in data:
        value = [data["class"]]
    elif "classes" in data:
        value = data["classes"]
        if not isinstance(value, list) or not value:
            raise RequestError(400, f"classes must be a non-empty list of integers, got {value!r}")
    else:
        return None
    for c in value:
        if isinstance(c, bool) or not isinstance(c, int):
            raise RequestError(400, f"class must be an integer, got {c!r}")
    return list(value)


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


def _skip(data: dict) -> str | None:
    value = data.get("skip", "none")
    if not isinstance(value, str):
        raise RequestError(400, f'skip must be "none", "late" or a policy like "2@0.5:", got {value!r}')
    return None if value == "none" else value


def parse_image_request(data: dict, planner: LegoPipeline, limits: Limits) -> ImageRequest:
    """Validate a request body against the model (planner: a LegoPipeline without backend) and limits."""
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r}; known: {', '.join(sorted(FIELDS))}")
    req = ImageRequest(
        num=_int(data, "num", 1, 1, limits.max_images, over_limit=True),
        steps=_int(data, "steps", 50, 1, limits.max_steps, over_limit=True),
        sampler=_choice(data, "sampler", "heun", SAMPLERS),
        skip=_skip(data),
        t_break=_float(data.get("t_break", DEFAULT_T_BREAK), "t_break"),
        resolution=_resolution(data.get("resolution"), limits),
        classes=_classes(data),
        guidance=_float(data.get("cfg", 1.0), "cfg"),
        seed=_int(data, "seed", 0, 0, 2**63 - 1),
        churn=_churn(data.get("churn")),
        format=_choice(data, "format", "png", tuple(FORMATS)),
        columns=_int(data, "columns", 8, 1, 1024),
        reuse_residual=_bool(data, "reuse_residual", False),
        is_async=_bool(data, "async", False),
    )
    tile_shift = data.get("tile_shift")
    if tile_shift is not None and not isinstance(tile_shift, bool):
        raise RequestError(400, f"tile_shift must be true, false or null, got {tile_shift!r}")
    req.tile_shift = tile_shift
    recommended = planner.manifest.recommended
    if _bool(data, "recommended", True) and recommended is not None and not SAMPLING_FIELDS & set(data):
        # As lego-run: the model's tuned setting, unless the request says how to sample.
        if recommended.steps > limits.max_steps:
            raise RequestError(400, f"the model's recommended {recommended.steps} steps exceed --max-steps")
        req.sampler, req.steps = recommended.sampler, recommended.steps
        req.skip, req.reuse_residual = recommended.skip_policy or None, recommended.reuse_residual
    check_with_pipeline(req, planner)
    return req


def check_with_pipeline(req: ImageRequest, planner: LegoPipeline) -> None:
    """The checks lego-run makes, from the runtime itself: memory, canvas, skip policy, classes, cfg, churn
    (and its sampler)."""
    try:
        if not math.isfinite(req.guidance):
            raise LegoError(f"cfg must be a finite number, got {req.guidance}")
        if req.guidance != 1.0 and not planner.num_classes:
            raise LegoError("classifier-free guidance (cfg) needs a class-conditional model; this one is not")
        if not 0.0 <= req.t_break <= 1.0:
            raise LegoError(f"t_break must be between 0 and 1, got {req.t_break}")
        hw = req.resolution or (planner.resolution, planner.resolution)
        check_request(req.num, req.num, req.seed, req.steps, hw, planner.channels)
        if req.churn is not None:
            req.churn.validate()
            if req.sampler == "dpm2m":
                raise LegoError("churn works with the heun and euler samplers, not dpm2m")
        planner.plan(req.steps, req.skip, req.t_break, hw, req.tile_shift, req.seed)
        planner.labels_for(req.num, req.classes, range(req.num))
    except LegoError as e:
        raise RequestError(400, str(e)) from None
