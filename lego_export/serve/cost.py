"""What a request costs, known when it arrives: its plan's engine calls priced by startup measurements.

A request's work is a list of denoiser evaluations, each a few engine calls of known row counts
(plan.engine_work). Each engine is timed at startup at N = 1, 2, 4, ... (:func:`best_chunk`), which
also picks the rows per call the batcher aims at: on a CPU the time per tile stops falling after a
modest N and rises again for large calls, on a GPU the fastest N is usually the largest. A call is
cut into the same near-equal chunks the runner cuts it into, and each chunk is priced by linear
interpolation between the sizes measured. What happens between engine calls (tiling, the sampler,
thread hand-offs) is priced per request, per evaluation and per tile of the first brick (which
grows with images times canvas pixels, as the host's array work does), fitted at startup on three
real runs (:meth:`CostModel.fit_host`). Only the ratio of requests' costs orders work; the absolute numbers
decide admission and deadlines, so the fit matters (benchmarks/serve_load.py reports its error).
"""

from __future__ import annotations

import bisect
import functools
import time
from dataclasses import dataclass, replace

import numpy as np

from lego_export.manifest import EngineSpec
from lego_export.runtime.runner import balanced_chunks

HOST_ROWS = "brick0"  # its tiles count images x canvas pixels: the host's work per evaluation follows them
TOLERANCE = 1.05  # any N within 5% of the best time per row is as good; the largest such N wins (fewer calls)


@dataclass(frozen=True)
class EngineCost:
    """One engine's measured seconds per row at some call sizes, and the runner's chunk size."""

    per_row: dict[int, float]
    max_rows: int

    @functools.cached_property
    def sizes(self) -> list[int]:
        """The call sizes measured, ascending (sorted once: every engine call is priced)."""
        return sorted(self.per_row)

    def call_seconds(self, rows: int) -> float:
        """Seconds for a call of `rows` rows, as the runner runs it (chunks of at most max_rows)."""
        return sum(self._chunk_seconds(hi - lo) for lo, hi in balanced_chunks(rows, self.max_rows)) if rows else 0.0

    def _chunk_seconds(self, n: int) -> float:
        sizes = self.sizes
        i = bisect.bisect_left(sizes, n)
        if i < len(sizes) and sizes[i] == n:
            return n * self.per_row[n]
        if i == 0 or i == len(sizes):  # outside what was measured: the nearest size's time per row
            return n * self.per_row[sizes[min(i, len(sizes) - 1)]]
        a, b = sizes[i - 1], sizes[i]
        ta, tb = a * self.per_row[a], b * self.per_row[b]
        return ta + (tb - ta) * (n - a) / (b - a)


@dataclass(frozen=True)
class CostModel:
    """Seconds of engine and host time for engine calls, evaluations and whole requests."""

    engines: dict[str, EngineCost]
    per_request_s: float = 0.0  # host time per request (fitted)
    per_evaluation_s: float = 0.0  # per denoiser evaluation (fitted)
    per_tile_s: float = 0.0  # and per tile of the first brick in an evaluation (fitted)

    @classmethod
    def from_calibration(cls, calibration: dict[str, dict[int, float]], chunks: dict[str, int]) -> CostModel:
        """From the batcher's startup measurements (engines without any, such as a decoder, are free)."""
        return cls({name: EngineCost(dict(per_row), chunks[name]) for name, per_row in calibration.items() if per_row})

    def call_seconds(self, engine: str, rows: int) -> float:
        cost = self.engines.get(engine)
        return cost.call_seconds(rows) if cost is not None else 0.0

    def evaluation_seconds(self, calls: dict[str, int]) -> float:
        return self.engine_seconds(calls) + self.host_seconds(calls)

    def engine_seconds(self, calls: dict[str, int]) -> float:
        return sum(self.call_seconds(name, rows) for name, rows in calls.items())

    def host_seconds(self, calls: dict[str, int]) -> float:
        """Time around the engines in one evaluation."""
        return sum(self.host_share(name, rows) for name, rows in calls.items())

    def host_share(self, engine: str, rows: int) -> float:
        """The host time counted with one engine call: an evaluation's with its embedder call (one per
        evaluation), the per-tile part with the first brick's."""
        return self.per_evaluation_s if engine == "embedder" else self.per_tile_s * rows if engine == HOST_ROWS else 0.0

    def seconds(self, work: list[dict[str, int]]) -> float:
        """A request's service time alone on the machine (plan.engine_work gives its work)."""
        return self.per_request_s + sum(self.evaluation_seconds(calls) for calls in work)

    def merge_pays(self, engine: str, rows: int, more: int, gain: float = 0.9) -> bool:
        """Whether one call of rows + more rows takes at most `gain` of two separate calls."""
        together = self.call_seconds(engine, rows + more)
        return together <= gain * (self.call_seconds(engine, rows) + self.call_seconds(engine, more))

    def fit_host(self, runs: list[tuple[list[dict[str, int]], float]]) -> CostModel:
        """A copy with the host terms fitted to measured runs [(work, seconds)]: least squares of
        (measured - engine time) on (1, evaluations, first-brick tiles), no term below zero (a term
        that would be is dropped and the rest fitted again)."""
        engine = [sum(self.engine_seconds(calls) for calls in work) for work, _ in runs]
        a = np.array([[1.0, len(work), sum(c.get(HOST_ROWS, 0) for c in work)] for work, _ in runs])
        b = np.array([s - e for (_, s), e in zip(runs, engine, strict=True)])
        keep = [0, 1, 2]
        while True:
            terms = np.zeros(3)
            terms[keep] = np.linalg.lstsq(a[:, keep], b, rcond=None)[0]
            if (terms >= 0).all() or len(keep) == 1:
                break
            keep.remove(int(np.argmin(terms)))
        per_request, per_eval, per_tile = (float(t) for t in np.maximum(terms, 0.0))
        return replace(self, per_request_s=per_request, per_evaluation_s=per_eval, per_tile_s=per_tile)


MAX_PRICES = 4096  # predictions remembered (request kinds)


class Prices:
    """The server's one cost model, with its predictions memoised per (options, canvas, images) for
    the model they were made with. Read by the service (admission) and the batcher (progress,
    merging) alike."""

    def __init__(self, model: CostModel | None):
        self._model = model
        self._memo: dict[tuple, float] = {}

    @property
    def model(self) -> CostModel | None:
        return self._model

    @model.setter
    def model(self, model: CostModel | None) -> None:
        self._model = model
        self._memo.clear()  # predictions of the model before

    def seconds(self, key: tuple, work) -> float:
        """A request's seconds alone; key: what determines it, work: a callable giving its engine work."""
        if self.model is None:
            return 0.0
        if key not in self._memo:
            if len(self._memo) >= MAX_PRICES:
                self._memo.clear()
            self._memo[key] = self.model.seconds(work())
        return self._memo[key]

    def call_done_s(self, engine: str, rows: int) -> float:
        """Predicted seconds of one engine call with its share of host time: a job's progress."""
        if self.model is None:
            return 0.0
        return self.model.call_seconds(engine, rows) + self.model.host_share(engine, rows)


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
