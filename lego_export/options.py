"""How to sample: one frozen value for lego-run, the Python API, lego-serve, the tuner and the manifest.

    opts = SamplingOptions(sampler="dpm2m", steps=8, skip="1@0.32:", reuse_residual=True)
    opts.validate(manifest.model)      # OptionError naming the field: "steps must be ..."
    plan(opts, manifest.model, (32, 96), seed=0)   # plan.py: which bricks run per step

Each surface maps its own names onto these fields once: lego-run's flags (runtime/cli.py, FLAGS),
the server's JSON fields (serve/validation.py). Checks live here, so a message names the field and
each surface translates the name. A request also has what is not a sampling choice (how many images,
which classes, the canvas, the seed); :func:`check_request` checks those, with the same errors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from lego_export.edm import SAMPLERS, Churn
from lego_export.errors import LegoError
from lego_export.windows import SkipPolicy, late_brick_policy, parse_interval, parse_policy, parse_rules

if TYPE_CHECKING:
    from lego_export.config import LegoConfig

# PG: skip the global brick for the last 20% of the trajectory. Chosen by measurement
# (docs/performance.md): on the shipped model 0.2 keeps FID within 1% of the full chain, while the
# paper's best ImageNet point, 0.3, costs 1.17x its FID here.
DEFAULT_T_BREAK = 0.2

MAX_STEPS = 10_000
MAX_GUIDANCE = 100.0  # far beyond any useful scale; bounded so that no scale overflows float32
MAX_IMAGES = 1_000_000
MAX_SIDE = 16_384
MAX_SEED = 2**63 - 1
MAX_FORECAST_ORDER = 2  # quadratic: higher orders extrapolate noise (three uneven points already swing)
GATE_SIGNALS = ("brick0", "input")
MAX_GATE = 1e6  # a relative change; far beyond any image's, bounded so that it stays a number
CANVAS_BYTES_PER_PIXEL = 280  # measured: peak memory per canvas pixel per image in a batch


class OptionError(LegoError):
    """A bad option or request value; ``field`` names it (``steps``, ``churn.s_min``, ``resolution``),
    and the message starts with that name, so each surface can put its own name in its place."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem

    def renamed(self, names: Mapping[str, str]) -> LegoError:
        """The same error under a surface's name for the field (a flag, a JSON field)."""
        return LegoError(f"{names.get(self.field, self.field)} {self.problem}")


@dataclass(frozen=True)
class SamplingOptions:
    """Every choice of how to sample; the plan (plan.py) is a function of these, the model
    and the canvas. Defaults are EDM's Heun over 50 steps with the full chain."""

    sampler: str = "heun"  # heun, euler or dpm2m (edm.SAMPLERS)
    steps: int = 50  # Karras schedule steps, sigma_max -> sigma_min
    skip: str = "none"  # "none", "late" (the last brick for t_break of the trajectory), or "k@lo:hi,..."
    t_break: float | None = None  # with skip="late": that fraction; None: DEFAULT_T_BREAK
    reuse_residual: bool = False  # a skipped brick's last correction is added back (denoiser.py)
    churn: Churn | None = None  # EDM's stochastic sampler; None: deterministic
    guidance: float = 1.0  # classifier-free guidance scale (1: none)
    guidance_interval: str | None = None  # "lo:hi": guidance only at steps with lo <= sigma <= hi; None: all
    tile_shift: bool | None = None  # roll the tile grid between steps; None: on above the training size
    # Brick caching (denoiser.BrickCache): a brick that does not run hands on its last correction.
    cache: str = "none"  # "none" or "k@lo:hi,...": brick k (0 too) runs only there, elsewhere takes its cache
    forecast: int = 0  # a cached correction: 0 the last one, 1 linear, 2 quadratic in log sigma over its last runs
    gate: float | None = None  # per image: later bricks run only when brick 0's estimate moved this much (rel. L1)
    gate_signal: str = "brick0"  # what the gate measures: brick 0's estimate, or "input" (c_in x; gates brick 0 too)
    guidance_cache: str | None = None  # "lo:hi": guided steps there run the conditional half, reusing the difference

    def __post_init__(self) -> None:
        if self.skip is None:
            object.__setattr__(self, "skip", "none")
        if self.cache is None:
            object.__setattr__(self, "cache", "none")
        if self.churn is not None and not isinstance(self.churn, Churn):
            raise OptionError("churn", f"must be a Churn, got {self.churn!r}")
        if isinstance(self.churn, Churn) and self.churn.s_churn == 0:
            object.__setattr__(self, "churn", None)  # zero strength is the deterministic sampler

    @property
    def late_fraction(self) -> float:
        return DEFAULT_T_BREAK if self.t_break is None else self.t_break

    def validate(self, model: LegoConfig) -> SamplingOptions:
        """Check every field against its range and the model; returns self. Nothing is allocated."""
        if self.sampler not in SAMPLERS:
            raise OptionError("sampler", f"must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        _integer("steps", self.steps, 1, MAX_STEPS)
        if not isinstance(self.skip, str):
            raise OptionError("skip", f'must be "none", "late" or rules like "2@0.5:", got {self.skip!r}')
        if self.t_break is not None:
            if self.skip != "late":
                raise OptionError("t_break", 'applies only when the late bricks are skipped (skip "late")')
        if not isinstance(self.reuse_residual, bool):
            raise OptionError("reuse_residual", f"must be true or false, got {self.reuse_residual!r}")
        if self.tile_shift is not None and not isinstance(self.tile_shift, bool):
            raise OptionError("tile_shift", f"must be true, false or unset, got {self.tile_shift!r}")
        _number("guidance", self.guidance, -MAX_GUIDANCE, MAX_GUIDANCE)
        if self.guidance != 1.0 and not model.num_classes:
            raise OptionError("guidance", "needs a class-conditional model (classifier-free guidance); this one is not")
        self._check_guided_interval("guidance_interval")
        if self.churn is not None:
            c = self.churn
            for name in ("s_churn", "s_min", "s_noise"):
                _number(f"churn.{name}", getattr(c, name), 0.0, math.inf)
            if not isinstance(c.s_max, int | float) or math.isnan(c.s_max) or c.s_max < c.s_min:
                raise OptionError("churn.s_max", f"must be at least s_min ({c.s_min}), got {c.s_max}")
            if self.sampler == "dpm2m":
                raise OptionError("churn", "works with the heun and euler samplers, not dpm2m")
        self.skip_policy(model)  # the rules parse, and name bricks the model has
        self._validate_cache(model)
        return self

    def _validate_cache(self, model: LegoConfig) -> None:
        if not isinstance(self.cache, str):
            raise OptionError("cache", f'must be "none" or rules like "2@0.5:" or "0@1:", got {self.cache!r}')
        policy = self.cache_policy(model)
        if policy is not None and not policy.windows:  # blank rules would cache nothing yet drop the recommended
            raise OptionError("cache", f'needs a rule like "2@0.5:" ("none" for no caching), got {self.cache!r}')
        _integer("forecast", self.forecast, 0, MAX_FORECAST_ORDER)
        if self.gate is not None:
            _number("gate", self.gate, 0.0, MAX_GATE)
            if len(model.bricks) < 2:
                raise OptionError("gate", "needs a model of two or more bricks (brick 0 decides for the rest)")
        if self.gate_signal not in GATE_SIGNALS:
            raise OptionError("gate_signal", f"must be one of {', '.join(GATE_SIGNALS)}, got {self.gate_signal!r}")
        if self.gate_signal != "brick0" and self.gate is None:
            raise OptionError("gate_signal", "applies only with a gate")
        if self.forecast and not self.caches:
            raise OptionError("forecast", "applies only where bricks take their cache (set cache or gate)")
        self._check_guided_interval("guidance_cache")

    def _check_guided_interval(self, name: str) -> None:
        """guidance_interval and guidance_cache: a sigma interval "lo:hi" that needs guidance."""
        value = getattr(self, name)
        if value is None:
            return
        if self.guidance == 1.0:
            raise OptionError(name, "applies only with guidance (a scale other than 1)")
        try:
            parse_interval(value)
        except LegoError as e:
            raise OptionError(name, str(e)) from None

    @property
    def caches(self) -> bool:
        """Whether any brick may take its cache instead of running (cache rules or the gate)."""
        return self.cache != "none" or self.gate is not None

    def cache_policy(self, model: LegoConfig) -> SkipPolicy | None:
        """The cache field as per-brick sigma windows (where each brick runs); None: no rules."""
        if self.cache == "none":
            return None
        try:
            return SkipPolicy(parse_rules(self.cache, len(model.bricks), first_may_stop=True), f"cache {self.cache}")
        except LegoError as e:
            raise OptionError("cache", str(e)) from None

    def skip_policy(self, model: LegoConfig) -> SkipPolicy:
        """The skip field as per-brick sigma windows for this model."""
        if self.skip == "none":
            return SkipPolicy()
        sizes = [b.size for b in model.bricks]
        if self.skip == "late":  # the one place both rules of skip "late" are checked
            if len(sizes) < 2:
                raise OptionError("skip.late", "cannot be used: this model has a single brick, none to skip")
            _number("t_break", self.late_fraction, 0.0, 1.0)
            return late_brick_policy(sizes, self.late_fraction, model.edm)
        try:
            return parse_policy(self.skip, len(sizes))
        except LegoError as e:
            raise OptionError("skip", str(e)) from None

    def describe(self) -> str:
        """One line for people: 'dpm2m, 8 steps, skip 1@0.32:, residual reuse'."""
        skip = {"none": "full chain", "late": f"late bricks off for {self.late_fraction:g}"}.get(
            self.skip, f"skip {self.skip}"
        )
        parts = [self.sampler, f"{self.steps} steps", skip]
        parts += ["residual reuse"] if self.reuse_residual else []
        parts += [f"churn {self.churn.s_churn:g}"] if self.churn else []
        parts += [f"cfg {self.guidance:g}"] if self.guidance != 1.0 else []
        parts += [f"at sigma {self.guidance_interval}"] if self.guidance_interval else []
        parts += [f"cache {self.cache}"] if self.cache != "none" else []
        parts += [f"gate {self.gate:g} on {self.gate_signal}"] if self.gate is not None else []
        parts += [f"forecast order {self.forecast}"] if self.forecast else []
        parts += [f"guidance cached at sigma {self.guidance_cache}"] if self.guidance_cache else []
        return ", ".join(parts)

    def to_dict(self) -> dict:
        """The JSON form (timing JSON, server answers, PNG metadata); s_max infinity as null."""
        d = asdict(self)
        if self.churn is not None and math.isinf(self.churn.s_max):
            d["churn"]["s_max"] = None
        return d


FIELDS = tuple(f.name for f in fields(SamplingOptions))
# Giving any of these says how to sample the trajectory: then the model's recommended setting is not
# used. tile_shift and guidance_cache combine with it; guidance given replaces the recommended setting's guidance.
TRAJECTORY_FIELDS = (
    *("sampler", "steps", "skip", "t_break", "reuse_residual", "churn"),
    *("cache", "forecast", "gate", "gate_signal"),
)
GUIDANCE_FIELDS = ("guidance", "guidance_interval")  # given either, the recommended interval is not used


def resolve(given: Mapping[str, Any], recommended: SamplingOptions | None = None) -> tuple[SamplingOptions, bool]:
    """The options a run uses, and whether they are the recommended setting: the fields given, over
    the model's recommended setting when one is passed and no trajectory field is given, else over
    the defaults. The one rule of every surface (lego-run, lego-serve, the Python API)."""
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise OptionError(unknown[0], f"is not a sampling option; known: {', '.join(FIELDS)}")
    use = recommended is not None and not set(given) & set(TRAJECTORY_FIELDS)
    base = recommended if use else SamplingOptions()
    if set(given) & set(GUIDANCE_FIELDS):
        # `--cfg 2` means every step, not the recommended interval; `--cfg-interval` alone moves the
        # base's own guidance (the recommended setting's scale) to the steps given
        scale = 1.0 if "guidance" in given else base.guidance
        base = replace(base, guidance=scale, guidance_interval=None)
    return replace(base, **given), use


def parse_canvas(text: str) -> tuple[int, int]:
    """'HxW' (e.g. '32x96') as (height, width); OptionError on the field 'resolution'."""
    if not isinstance(text, str):
        raise OptionError("resolution", f'must be a string HxW, e.g. "32x96", got {text!r}')
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise OptionError("resolution", f"{text!r}: write HxW, e.g. 32x96") from None
    return check_canvas_sides((h, w))


def check_canvas_sides(canvas: Sequence[int]) -> tuple[int, int]:
    if not isinstance(canvas, Sequence) or isinstance(canvas, str) or len(canvas) != 2:
        raise OptionError("resolution", f"must be (height, width), got {canvas!r}")
    h, w = canvas
    for side, name in ((h, "height"), (w, "width")):
        if isinstance(side, bool) or not isinstance(side, int | np.integer) or not 1 <= side <= MAX_SIDE:
            raise OptionError("resolution", f"{name} must be an integer from 1 to {MAX_SIDE}, got {side!r}")
    return int(h), int(w)


def check_request(
    *,
    num: int,
    batch: int,
    seed: int,
    canvas: tuple[int, int],
    channels: int,
    indices: Sequence[int] | None = None,
) -> None:
    """Refuse, before anything is allocated, a request out of range or larger than this machine's memory.
    batch: images sampled together (what memory must hold at once)."""
    _integer("num", num, 1, MAX_IMAGES)
    _integer("batch", batch, 1, MAX_IMAGES)
    _integer("seed", seed, 0, MAX_SEED)
    h, w = check_canvas_sides(canvas)
    if indices is not None:
        if isinstance(indices, str | bytes) or not isinstance(indices, Sequence | np.ndarray):
            raise OptionError("indices", f"must be a list of image indices, got {indices!r:.60}")
        if not len(indices):
            raise OptionError("indices", "must hold at least one image index")
        for i in indices:
            _integer("indices", i, 0, num - 1)  # image i of the num: its class block depends on num
    need = CANVAS_BYTES_PER_PIXEL * h * w * min(num, batch) * max(channels, 1)
    have = physical_memory()
    if have and need > 0.8 * have:
        raise OptionError(
            "batch",
            f"of {min(num, batch)} canvases of {h}x{w} needs about {need / 2**30:.1f} GiB; this machine has "
            f"{have / 2**30:.1f} GiB: lower the batch or the resolution",
        )


def check_classes(classes: Sequence[int | str] | None, model_classes: int, names: Sequence[str] = ()) -> list[int]:
    """Class indices from indices or names (the model's class_names); [] for 'every class'."""
    if classes is None:
        return []
    if isinstance(classes, str | bytes) or not isinstance(classes, Sequence):
        raise OptionError("classes", f"must be a list of class indices or names, got {classes!r}")
    if classes and not model_classes:
        raise OptionError("classes", "cannot be used: this model is unconditional")
    lookup = {n.lower(): i for i, n in enumerate(names)}
    out = []
    for c in classes:
        if isinstance(c, str) and c.strip().lower() in lookup:
            out.append(lookup[c.strip().lower()])
            continue
        if isinstance(c, str) and c.strip().isdigit():
            c = int(c)
        if isinstance(c, bool) or not isinstance(c, int | np.integer):
            known = f"; names: {', '.join(names)}" if names else ""
            raise OptionError("classes", f"must be class indices 0 to {model_classes - 1}{known}, got {c!r}")
        if not 0 <= c < model_classes:
            raise OptionError("classes", f"{c} is out of range: this model has classes 0 to {model_classes - 1}")
        out.append(int(c))
    return out


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _integer(field: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
        raise OptionError(field, f"must be an integer from {lo} to {hi}, got {value!r}")


def _number(field: str, value, lo: float, hi: float) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or not lo <= value <= hi:
        bounds = f"at least {lo:g}" if math.isinf(hi) else f"from {lo:g} to {hi:g}"
        raise OptionError(field, f"must be a finite number {bounds}, got {value!r}")
