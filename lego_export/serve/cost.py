"""What a request costs, known when it arrives: its plan's engine calls priced by startup measurements.

A request's work is a list of denoiser evaluations, each a few engine calls of known row counts
(plan.engine_work). Each engine's time per call size was measured at startup (calibrate.py); a call
is cut into the same near-equal chunks the runner cuts it into, and each chunk is priced by linear
interpolation between the sizes measured. What happens between engine calls (tiling, the sampler,
thread hand-offs) is priced per request, per evaluation and per image row, fitted at startup on
three real runs (:meth:`CostModel.fit_host`). Only the ratio of requests' costs orders work; the absolute numbers
decide admission and deadlines, so the fit matters (benchmarks/serve.py reports its error).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace

import numpy as np

from lego_export.runtime.runner import balanced_chunks


@dataclass(frozen=True)
class EngineCost:
    """One engine's measured seconds per row at some call sizes, and the runner's chunk size."""

    per_row: dict[int, float]
    max_rows: int

    def call_seconds(self, rows: int) -> float:
        """Seconds for a call of `rows` rows, as the runner runs it (chunks of at most max_rows)."""
        return sum(self._chunk_seconds(hi - lo) for lo, hi in balanced_chunks(rows, self.max_rows)) if rows else 0.0

    def _chunk_seconds(self, n: int) -> float:
        sizes = sorted(self.per_row)
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
    per_row_s: float = 0.0  # and per image row of an evaluation (fitted)
    fitted: list = field(default_factory=list)  # (predicted engine s, measured s) of the fit's runs

    @classmethod
    def from_calibration(cls, calibration: dict[str, dict[int, float]], chunks: dict[str, int]) -> CostModel:
        """From the batcher's startup measurements (engines without any, such as a decoder, are free)."""
        return cls({name: EngineCost(dict(per_row), chunks[name]) for name, per_row in calibration.items() if per_row})

    def call_seconds(self, engine: str, rows: int) -> float:
        cost = self.engines.get(engine)
        return cost.call_seconds(rows) if cost is not None else 0.0

    def evaluation_seconds(self, calls: dict[str, int]) -> float:
        engines = sum(self.call_seconds(name, rows) for name, rows in calls.items())
        return engines + self.per_evaluation_s + self.per_row_s * calls.get("embedder", 0)

    def seconds(self, work: list[dict[str, int]]) -> float:
        """A request's service time alone on the machine (plan.engine_work gives its work)."""
        return self.per_request_s + sum(self.evaluation_seconds(calls) for calls in work)

    def merge_pays(self, engine: str, rows: int, more: int, gain: float = 0.9) -> bool:
        """Whether one call of rows + more rows takes at most `gain` of two separate calls."""
        together = self.call_seconds(engine, rows + more)
        return together <= gain * (self.call_seconds(engine, rows) + self.call_seconds(engine, more))

    def fit_host(self, runs: list[tuple[list[dict[str, int]], float]]) -> CostModel:
        """A copy with the host terms fitted to measured runs [(work, seconds)]: least squares of
        (measured - engine time) on (1, evaluations, image rows), no term below zero (a term that
        would be is dropped and the rest fitted again)."""
        engine = [sum(self.call_seconds(n, r) for calls in work for n, r in calls.items()) for work, _ in runs]
        a = np.array([[1.0, len(work), sum(c.get("embedder", 0) for c in work)] for work, _ in runs])
        b = np.array([s - e for (_, s), e in zip(runs, engine, strict=True)])
        keep = [0, 1, 2]
        while True:
            terms = np.zeros(3)
            terms[keep] = np.linalg.lstsq(a[:, keep], b, rcond=None)[0]
            if (terms >= 0).all() or len(keep) == 1:
                break
            keep.remove(int(np.argmin(terms)))
        terms = np.maximum(terms, 0.0)
        fitted = [(e, s) for e, (_, s) in zip(engine, runs, strict=True)]
        per_request, per_eval, per_row = (float(t) for t in terms)
        return replace(self, per_request_s=per_request, per_evaluation_s=per_eval, per_row_s=per_row, fitted=fitted)
