"""The brick plan: which bricks run at each sampling step, and where the tile grid sits.

``plan(options, model, canvas, seed)`` is a pure function of its arguments: lego-run --plan, the
pipeline, the server's validation and cost estimates all call it, with no backend.

A step always runs a *prefix* of the brick chain: brick k reads brick k-1's output, so a brick can
only be skipped together with every brick after it. Skip rules are stated in sigma, not in step
indices, so one policy means the same thing at 18 steps or 250.

Policies:
  - ``skip-late-bricks`` (``--t-break F``): drop the last brick for a fraction F of the sampling
    trajectory. In a PG or U stack the last brick is the global one (the largest tiles): it is
    dropped at low noise, the last F of the trajectory. In a PR stack the last brick is the most
    local one: it is dropped at high noise, the first F of the trajectory.
  - an explicit SPEC ``"k@lo:hi,..."``: brick k (0-based) runs only while lo <= sigma <= hi
    (either bound may be left out), e.g. ``2@0.5:`` keeps brick 2 for sigma >= 0.5 only.

Classifier-free guidance runs at every step, or (a guidance interval ``"lo:hi"``) only at the steps
with lo <= sigma <= hi: a guided step runs its bricks twice, for the conditional and the null label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lego_export.edm import EDMConfig
from lego_export.errors import LegoError
from lego_export.tiling import check_canvas

if TYPE_CHECKING:
    from lego_export.config import LegoConfig
    from lego_export.options import SamplingOptions


@dataclass(frozen=True)
class BrickWindow:
    """Brick ``index`` runs while lo <= sigma <= hi."""

    index: int
    lo: float = 0.0
    hi: float = math.inf

    def allows(self, sigma: float) -> bool:
        return self.lo <= sigma <= self.hi


@dataclass(frozen=True)
class SkipPolicy:
    windows: tuple[BrickWindow, ...] = ()
    description: str = "full chain"

    def bricks_at(self, sigma: float, num_bricks: int) -> int:
        """Length of the prefix of bricks to run at this noise level (at least 1)."""
        for k in range(1, num_bricks):
            if any(w.index == k and not w.allows(sigma) for w in self.windows):
                return k
        return num_bricks


def late_brick_policy(brick_sizes: list[int], t_break: float, edm: EDMConfig) -> SkipPolicy:
    """Drop the last brick over a fraction t_break of the trajectory (see the module docstring);
    the trajectory is the model's Karras schedule, so the threshold follows its sigma_min / sigma_max."""
    if not 0.0 <= t_break <= 1.0:
        raise LegoError(f"--t-break must be between 0 and 1, got {t_break}")
    if len(brick_sizes) < 2:
        raise LegoError("this model has a single brick: there is no brick to skip")
    last = len(brick_sizes) - 1
    if t_break == 0:
        return SkipPolicy((), "full chain (t-break 0)")
    window = skip_window(brick_sizes, last, t_break, edm)
    if window.lo > 0:  # PG / U: global brick last, skipped at low noise
        return SkipPolicy(
            (window,),
            f"skip brick {last} (global) for sigma < {window.lo:.3g} (last {t_break:.0%} of the trajectory)",
        )
    return SkipPolicy(  # PR: local brick last, skipped at high noise
        (window,),
        f"skip brick {last} (local) for sigma > {window.hi:.3g} (first {t_break:.0%} of the trajectory)",
    )


def skip_window(brick_sizes: list[int], k: int, fraction: float, edm: EDMConfig) -> BrickWindow:
    """Brick k off for a fraction of the trajectory (the model's Karras schedule): a global brick
    (tiles no smaller than brick 0's) at low noise, the last `fraction`; a local one at high noise,
    the first `fraction`."""
    if brick_sizes[k] >= brick_sizes[0]:
        return BrickWindow(k, lo=edm.sigma_at(1.0 - fraction))
    return BrickWindow(k, hi=edm.sigma_at(fraction))


def parse_policy(spec: str, num_bricks: int) -> SkipPolicy:
    """Parse ``"k@lo:hi,..."`` (see the module docstring)."""
    windows = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            index_text, bounds = part.split("@")
            lo_text, hi_text = bounds.split(":")
            window = BrickWindow(
                int(index_text), float(lo_text) if lo_text else 0.0, float(hi_text) if hi_text else math.inf
            )
        except ValueError:
            raise LegoError(f"rule {part!r} cannot be read; write BRICK@LO:HI, e.g. 2@0.5: or 2@:1.5") from None
        if not 0 <= window.index < num_bricks:
            raise LegoError(f"rule {part!r}: brick index must be 0 to {num_bricks - 1}")
        if window.index == 0:
            raise LegoError(f"rule {part!r}: brick 0 always runs (every step needs an estimate)")
        if math.isnan(window.lo) or math.isnan(window.hi) or math.isinf(window.lo):
            raise LegoError(f"rule {part!r}: bounds must be numbers (leave a bound out for none)")
        if window.lo > window.hi:
            raise LegoError(f"rule {part!r}: lower bound above upper bound")
        windows.append(window)
    return SkipPolicy(tuple(windows), f"rules {spec}")


def parse_interval(spec: str) -> tuple[float, float]:
    """``"lo:hi"`` (either bound may be left out) as (lo, hi), for the guidance interval."""
    try:
        lo_text, hi_text = spec.split(":")
        lo, hi = float(lo_text) if lo_text.strip() else 0.0, float(hi_text) if hi_text.strip() else math.inf
    except (AttributeError, ValueError):
        raise LegoError(f"{spec!r} cannot be read; write LO:HI in sigma, e.g. 4:14 or 4:") from None
    if math.isnan(lo) or math.isnan(hi) or math.isinf(lo) or lo < 0 or lo > hi:
        raise LegoError(f"{spec!r}: bounds must be numbers with 0 <= LO <= HI (leave a bound out for none)")
    return lo, hi


@dataclass(frozen=True)
class StepPlan:
    step: int
    sigma: float
    bricks: int  # run bricks 0 .. bricks-1
    shift: tuple[int, int]  # tile-grid offset (dy, dx) for this step
    guided: bool = False  # classifier-free guidance at this step: the bricks run for both halves


def tile_shift(step: int, period: int, seed: int = 0) -> tuple[int, int]:
    """A reproducible pseudo-random offset of the tile grid for one step (0 <= offset < period)."""
    rng = np.random.default_rng([seed, step, 0x5EED])
    dy, dx = rng.integers(0, period, size=2)
    return int(dy), int(dx)


def plan(options: SamplingOptions, model: LegoConfig, canvas: tuple[int, int], seed: int = 0) -> list[StepPlan]:
    """The per-step plan of one sampling run: options checked against the model, canvas against
    its bricks. The tile grid moves between steps when options.tile_shift says so (by default on a
    canvas larger than the training size)."""
    options.validate(model)
    h, w = canvas
    check_canvas(h, w, model.canvas_multiple)
    shift = options.tile_shift
    if shift is None:
        shift = h > model.img_resolution or w > model.img_resolution
    period = max(b.size for b in model.bricks) if shift else None
    guide = None
    if options.guidance != 1.0 and model.num_classes:
        guide = parse_interval(options.guidance_interval) if options.guidance_interval else (0.0, math.inf)
    sigmas = model.edm.sigmas(options.steps)
    return make_plan(sigmas, len(model.bricks), options.skip_policy(model), period, seed, guide)


def make_plan(
    sigmas: np.ndarray,
    num_bricks: int,
    policy: SkipPolicy,
    shift_period: int | None = None,
    seed: int = 0,
    guide: tuple[float, float] | None = None,
) -> list[StepPlan]:
    """One StepPlan per step; Heun's second evaluation at sigmas[i + 1] uses step i's plan. guide:
    the sigma interval where guidance runs (None: no guidance)."""
    plans = []
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        shift = tile_shift(i, shift_period, seed) if shift_period else (0, 0)
        guided = guide is not None and guide[0] <= sigma <= guide[1]
        plans.append(StepPlan(i, sigma, policy.bricks_at(sigma, num_bricks), shift, guided))
    return plans


def engine_work(options: SamplingOptions, model: LegoConfig, canvas: tuple[int, int], num: int) -> list[dict[str, int]]:
    """Rows each engine is called with, per denoiser evaluation of one run of num images: the
    embedder once per image (twice at a guided step: the null-label half), brick k once per tile of
    its size, for the bricks the plan runs. What a run costs follows from this and each engine's
    time per call (the server's cost model); a latent model's decoder is not included. The seed
    only moves the tile grid (a roll keeps the tile count), so the work does not depend on it."""
    steps = plan(options, model, canvas)
    h, w = canvas
    work = []
    for i, step in enumerate(steps):
        rows = num * (2 if step.guided else 1)
        calls = {"embedder": rows}
        for k, b in enumerate(model.bricks[: step.bricks]):
            calls[f"brick{k}"] = rows * (h // b.size) * (w // b.size)
        # Heun corrects every step but the last, with a second evaluation under the same plan.
        work += [calls] * (2 if options.sampler == "heun" and i < len(steps) - 1 else 1)
    return work


def flop_fraction_saved(plans: list[StepPlan], brick_flops: list[float]) -> float:
    """Fraction of brick FLOPs a plan saves relative to running every brick once at every step. A
    guided step runs its bricks twice, so a guided plan can save less than nothing (-1: guidance at
    every step of the full chain)."""
    full = len(plans) * sum(brick_flops)
    run = sum(sum(brick_flops[: p.bricks]) * (2 if p.guided else 1) for p in plans)
    return 1.0 - run / full if full else 0.0


def describe_saving(saved: float) -> str:
    """flop_fraction_saved for people, guided plans (which may save less than nothing) included."""
    return f"{saved:.1%} of brick FLOPs saved" if saved >= 0 else f"{-saved:.1%} more brick FLOPs than unguided"
