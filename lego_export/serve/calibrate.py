"""How many rows per engine call: measured once at startup, per engine.

On a CPU the time per tile stops falling after a modest N and rises again for large calls
(probably as their activations outgrow the caches). The batcher therefore cuts merged calls into chunks of
the size that runs fastest per row, not of the largest size the engine accepts. On a GPU the
fastest size is usually the largest, which the same measurement finds.
"""

from __future__ import annotations

import time

import numpy as np

from lego_export.manifest import EngineSpec

TOLERANCE = 1.05  # any N within 5% of the best time per row is as good; the largest such N wins (fewer calls)


def calibration_sizes(limit: int) -> list[int]:
    """N = 1, 2, 4, ... up to limit, and limit itself."""
    sizes, n = [], 1
    while n < limit:
        sizes.append(n)
        n *= 2
    return [*sizes, limit]


def zero_feeds(spec: EngineSpec, n: int, arrays) -> dict | None:
    """Inputs of the engine's shapes at batch n (values do not change the work); None when a shape
    is not fixed apart from N (a decoder's latent size)."""
    feeds = {}
    for t in spec.inputs:
        if any(not isinstance(d, int) for d in t.shape if d != "N"):
            return None
        shape = [n if d == "N" else int(d) for d in t.shape]
        feeds[t.name] = arrays.from_numpy(np.zeros(shape, dtype=np.float32))
    return feeds


def best_chunk(runner, spec: EngineSpec, limit: int, arrays, reps: int = 3) -> tuple[int, dict[int, float]]:
    """The largest N (up to limit) whose time per row is within TOLERANCE of the fastest, and the
    measured seconds per row for each N tried. Engines whose shapes vary by request keep limit."""
    per_row: dict[int, float] = {}
    for n in calibration_sizes(limit):
        feeds = zero_feeds(spec, n, arrays)
        if feeds is None:
            return limit, {}
        runner.infer(feeds)  # warm-up: the first call at a new N allocates
        arrays.synchronize()
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            runner.infer(feeds)
            arrays.synchronize()
            best = min(best, time.perf_counter() - start)
        per_row[n] = best / n
    fastest = min(per_row.values())
    return max(n for n, t in per_row.items() if t <= TOLERANCE * fastest), per_row
