"""The brick plan: which bricks run at each sampling step, and where the tile grid sits.

``plan(options, model, canvas, seed)`` is a pure function of its arguments: lego-run --plan, the
pipeline, the server's validation and cost estimates all call it, with no backend.

A step runs a *prefix* of the brick chain: brick k reads brick k-1's output, so a brick can only be
skipped together with every brick after it. Within the prefix a brick may instead take its cached
correction (cache rules; see denoiser.BrickCache), which it hands on to the bricks after it like an
output of its own. Rules are stated in sigma, not in step indices, so one policy means the same thing
at 18 steps or 250.

Policies:
  - ``skip="late"`` (options.t_break F): drop the last brick for a fraction F of the sampling
    trajectory. In a PG or U stack the last brick is the global one (the largest tiles): it is
    dropped at low noise, the last F of the trajectory. In a PR stack the last brick is the most
    local one: it is dropped at high noise, the first F of the trajectory.
  - an explicit SPEC ``"k@lo:hi,..."``: brick k (0-based) runs only while lo <= sigma <= hi
    (either bound may be left out), e.g. ``2@0.5:`` keeps brick 2 for sigma >= 0.5 only.

Cache rules ``"k@lo:hi,..."`` (any brick, brick 0 included): brick k runs only while lo <= sigma <= hi
and takes its cached (or forecast) correction elsewhere, from its first run on.

Classifier-free guidance runs at every step, or (a guidance interval ``"lo:hi"``) only at the steps
with lo <= sigma <= hi: a guided step runs its bricks twice, for the conditional and the null label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from lego_export.tiling import check_canvas
from lego_export.windows import (  # noqa: F401  (the names callers know from here)
    BrickWindow,
    SkipPolicy,
    late_brick_policy,
    parse_interval,
    parse_policy,
    skip_window,
)

if TYPE_CHECKING:
    from lego_export.config import LegoConfig
    from lego_export.options import SamplingOptions


@dataclass(frozen=True)
class StepPlan:
    step: int
    sigma: float
    bricks: int  # run bricks 0 .. bricks-1 (the rest are skipped)
    shift: tuple[int, int]  # tile-grid offset (dy, dx) for this step
    guided: bool = False  # classifier-free guidance at this step: the bricks run for both halves
    cached: tuple[int, ...] = ()  # bricks of the prefix that take their cached correction instead of running
    guidance_cached: bool = False  # a guided step that runs the conditional half only (guidance cache)

    def runs(self, k: int) -> bool:
        """Whether brick k runs at this step (before any per-image gate)."""
        return k < self.bricks and k not in self.cached

    @property
    def halves(self) -> int:
        """How many times each brick that runs sees each image: 2 at a guided step with both halves."""
        return 2 if self.guided and not self.guidance_cached else 1


def tile_shift(step: int, period: int, seed: int = 0) -> tuple[int, int]:
    """A reproducible pseudo-random offset of the tile grid for one step (0 <= offset < period)."""
    rng = np.random.default_rng([seed, step, 0x5EED])
    dy, dx = rng.integers(0, period, size=2)
    return int(dy), int(dx)


def plan(options: SamplingOptions, model: LegoConfig, canvas: tuple[int, int], seed: int = 0) -> list[StepPlan]:
    """The per-step plan of one sampling run: options checked against the model, canvas against
    its bricks. The tile grid moves between steps when options.tile_shift says so (by default on a
    canvas larger than the training size). A per-image gate (options.gate) is decided at run time:
    the plan is its upper bound, every brick it lists running for every image."""
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
    steps = make_plan(sigmas, len(model.bricks), options.skip_policy(model), period, seed, guide)
    guide_cache = parse_interval(options.guidance_cache) if options.guidance_cache and guide else None
    return with_cache(steps, options.cache_policy(model), guide_cache)


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


def with_cache(
    steps: list[StepPlan], cache: SkipPolicy | None = None, guide_cache: tuple[float, float] | None = None
) -> list[StepPlan]:
    """The plan with brick caching: a brick of a step's prefix outside its cache window takes its
    cached correction, once it has run at an earlier step (before that there is nothing to reuse);
    a guided step inside guide_cache runs the conditional half only, once an earlier step ran both."""
    ran: set[int] = set()
    guided_before = False
    out = []
    for p in steps:
        outside = cache.outside(p.sigma) if cache is not None else ()
        cached = tuple(k for k in outside if k < p.bricks and k in ran)
        half = guide_cache is not None and p.guided and guided_before and guide_cache[0] <= p.sigma <= guide_cache[1]
        out.append(replace(p, cached=cached, guidance_cached=half) if cached or half else p)
        ran |= {k for k in range(p.bricks) if k not in cached}
        guided_before |= p.guided and not half
    return out


def engine_work(options: SamplingOptions, model: LegoConfig, canvas: tuple[int, int], num: int) -> list[dict[str, int]]:
    """Rows each engine is called with, per denoiser evaluation of one run of num images: the
    embedder once per image (twice at a guided step: the null-label half), brick k once per tile of
    its size, for the bricks the plan runs. What a run costs follows from this and each engine's
    time per call (the server's cost model); a latent model's decoder is not included. The seed
    only moves the tile grid (a roll keeps the tile count), so the work does not depend on it. A
    per-image gate only lowers it: this is its upper bound."""
    steps = plan(options, model, canvas)
    h, w = canvas
    work = []
    for i, step in enumerate(steps):
        rows = num * step.halves
        calls = {"embedder": rows}
        for k, b in enumerate(model.bricks):
            if step.runs(k):
                calls[f"brick{k}"] = rows * (h // b.size) * (w // b.size)
        # Heun corrects every step but the last, with a second evaluation under the same plan.
        work += [calls] * (2 if options.sampler == "heun" and i < len(steps) - 1 else 1)
    return work


def step_flops(step: StepPlan, brick_flops: list[float]) -> float:
    """Brick FLOPs of one evaluation of this step per image (both halves of a guided one)."""
    return sum(f for k, f in enumerate(brick_flops) if step.runs(k)) * step.halves


def flop_fraction_saved(plans: list[StepPlan], brick_flops: list[float]) -> float:
    """Fraction of brick FLOPs a plan saves relative to running every brick once at every step. A
    guided step runs its bricks twice, so a guided plan can save less than nothing (-1: guidance at
    every step of the full chain)."""
    full = len(plans) * sum(brick_flops)
    run = sum(step_flops(p, brick_flops) for p in plans)
    return 1.0 - run / full if full else 0.0


def describe_saving(saved: float) -> str:
    """flop_fraction_saved for people, guided plans (which may save less than nothing) included."""
    return f"{saved:.1%} of brick FLOPs saved" if saved >= 0 else f"{-saved:.1%} more brick FLOPs than unguided"
