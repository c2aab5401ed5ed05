"""Sigma windows: the text forms of skip rules, cache rules and guidance intervals, parsed once.

options.py (which checks fields and names them in errors) and plan.py (which turns windows into
per-step decisions) both build on this module; neither imports the other at run time. Parsing here
raises LegoError with the problem only: options.py puts the field's name in front.

    "k@lo:hi,..."   brick k runs only while lo <= sigma <= hi (a bound may be left out)
    "lo:hi"         an interval of sigma (guidance, guidance cache)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lego_export.edm import EDMConfig
from lego_export.errors import LegoError


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

    def outside(self, sigma: float) -> tuple[int, ...]:
        """The bricks whose windows do not allow this noise level (cache rules: those take their cache)."""
        return tuple(sorted({w.index for w in self.windows if not w.allows(sigma)}))


def parse_rules(spec: str, num_bricks: int, first_may_stop: bool = False) -> tuple[BrickWindow, ...]:
    """Parse ``"k@lo:hi,..."``. Brick 0 may have a rule only when first_may_stop (a cached brick 0
    hands its cached output on; a skipped one would leave no estimate)."""
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
        if window.index == 0 and not first_may_stop:
            raise LegoError(f"rule {part!r}: brick 0 always runs (every step needs an estimate)")
        if math.isnan(window.lo) or math.isnan(window.hi) or math.isinf(window.lo):
            raise LegoError(f"rule {part!r}: bounds must be numbers (leave a bound out for none)")
        if window.lo < 0:  # sigma is never negative: such a bound would read as a rule it is not
            raise LegoError(f"rule {part!r}: bounds are noise levels, 0 or more")
        if window.lo > window.hi:
            raise LegoError(f"rule {part!r}: lower bound above upper bound")
        windows.append(window)
    return tuple(windows)


def parse_policy(spec: str, num_bricks: int) -> SkipPolicy:
    """Skip rules ``"k@lo:hi,..."`` (brick 0 always runs)."""
    return SkipPolicy(parse_rules(spec, num_bricks), f"rules {spec}")


def parse_interval(spec: str) -> tuple[float, float]:
    """``"lo:hi"`` (either bound may be left out) as (lo, hi)."""
    try:
        lo_text, hi_text = spec.split(":")
        lo, hi = float(lo_text) if lo_text.strip() else 0.0, float(hi_text) if hi_text.strip() else math.inf
    except (AttributeError, ValueError):
        raise LegoError(f"{spec!r} cannot be read; write LO:HI in sigma, e.g. 4:14 or 4:") from None
    if math.isnan(lo) or math.isnan(hi) or math.isinf(lo) or lo < 0 or lo > hi:
        raise LegoError(f"{spec!r}: bounds must be numbers with 0 <= LO <= HI (leave a bound out for none)")
    return lo, hi


def skip_window(brick_sizes: list[int], k: int, fraction: float, edm: EDMConfig) -> BrickWindow:
    """Brick k off for a fraction of the trajectory (the model's Karras schedule): a global brick
    (tiles no smaller than brick 0's) at low noise, the last `fraction`; a local one at high noise,
    the first `fraction`."""
    if brick_sizes[k] >= brick_sizes[0]:
        return BrickWindow(k, lo=edm.sigma_at(1.0 - fraction))
    return BrickWindow(k, hi=edm.sigma_at(fraction))


def late_brick_policy(brick_sizes: list[int], t_break: float, edm: EDMConfig) -> SkipPolicy:
    """Drop the last brick over a fraction t_break of the trajectory: in a PG or U stack the global
    brick at low noise (the last t_break), in a PR stack the local one at high noise (the first).
    The caller has checked 0 <= t_break <= 1 and that there are at least two bricks
    (SamplingOptions.validate)."""
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
