"""One engine's runner, owned: checked feeds, calls split along N, timing, and close().

Backends (backends.py) only load engines and run one call; what every caller needs around a call is
here, once, for the pipeline and the server's batcher alike (Polygraphy's split of loaders and
runners: the runner owns its lifecycle and its timing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from lego_export.errors import LegoError
from lego_export.manifest import EngineSpec
from lego_export.plan import describe_saving


@dataclass
class Timing:
    """Where the time went in one sampling call; engine times are summed over all calls of an engine."""

    engine_ms: dict[str, float] = field(default_factory=dict)
    engine_calls: dict[str, int] = field(default_factory=dict)
    total_s: float = 0.0
    steps: int = 0
    images: int = 0
    brick_evaluations: int = 0  # brick calls on one batch (one per brick per denoiser evaluation)
    bricks_skipped: int = 0
    flops_saved: float = 0.0  # fraction of brick FLOPs the plan saved (plan.flop_fraction_saved)
    per_engine: bool = True  # False on an asynchronous device unless profiling: engine_ms stays empty
    precision: str = "fp32"  # the runtime's compute precision (backends.COMPUTE_PRECISIONS)
    built: str = "fp32"  # the precision of the brick files it ran (manifest.FILE_PRECISIONS)
    brick_flops: float = 0.0  # brick FLOPs actually spent, all images (rows each brick ran x its FLOPs per row)
    full_chain_flops: float = 0.0  # one full-chain evaluation of one image (the unit of full_chain_evaluations)
    bricks_per_step: list = field(default_factory=list)  # per step: rows each brick ran / reused / forecast / skipped

    def add(self, name: str, seconds: float | None, rows: int = 0) -> None:
        """One engine call of `rows` rows; seconds None where it was not timed (an asynchronous device)."""
        self.engine_calls[name] = self.engine_calls.get(name, 0) + 1
        if seconds is not None:
            self.engine_ms[name] = self.engine_ms.get(name, 0.0) + seconds * 1e3

    @classmethod
    def merged(cls, parts: list[Timing]) -> Timing:
        """Several processes' timings of one run (torchrun): counts add up, the wall time is the longest."""
        total = cls(per_engine=parts[0].per_engine, precision=parts[0].precision, built=parts[0].built)
        for t in parts:
            for name, ms in t.engine_ms.items():
                total.engine_ms[name] = total.engine_ms.get(name, 0.0) + ms
            for name, calls in t.engine_calls.items():
                total.engine_calls[name] = total.engine_calls.get(name, 0) + calls
            total.images += t.images
            total.brick_evaluations += t.brick_evaluations
            total.bricks_skipped += t.bricks_skipped
            total.brick_flops += t.brick_flops
            total.add_steps(t.bricks_per_step)
        total.full_chain_flops = parts[0].full_chain_flops
        total.total_s = max(t.total_s for t in parts)
        total.steps, total.flops_saved = parts[0].steps, parts[0].flops_saved
        return total

    def add_step(self, step: int, sigma: float, record: dict) -> None:
        """Add one denoiser evaluation's rows per brick (denoiser record) to its step's entry."""
        while len(self.bricks_per_step) <= step:
            self.bricks_per_step.append({"step": len(self.bricks_per_step), "sigma": None, "evaluations": 0})
        entry = self.bricks_per_step[step]
        entry["sigma"] = sigma if entry["sigma"] is None else entry["sigma"]
        entry["evaluations"] += 1
        for key in ("rows", "run", "reused", "forecast", "skipped"):
            value = record[key]
            if key not in entry:
                entry[key] = list(value) if isinstance(value, list) else value
            elif isinstance(value, list):
                entry[key] = [x + y for x, y in zip(entry[key], value, strict=True)]
            else:
                entry[key] += value

    def add_steps(self, steps: list[dict]) -> None:
        """Another process's steps (torchrun): rows add up step by step."""
        for entry in steps:
            self.add_step(entry["step"], entry["sigma"], entry)
            self.bricks_per_step[entry["step"]]["evaluations"] += entry["evaluations"] - 1

    @property
    def full_chain_evaluations(self) -> float:
        """Brick FLOPs spent per image, in full-chain evaluations of one image."""
        per_image = self.brick_flops / self.images if self.images else 0.0
        return per_image / self.full_chain_flops if self.full_chain_flops else 0.0

    @property
    def overhead_fraction(self) -> float | None:
        """Share of the wall time spent outside engine calls (tiling, concatenation, sampler)."""
        total_ms = self.total_s * 1e3
        if not self.per_engine:
            return None
        return max(0.0, 1.0 - sum(self.engine_ms.values()) / total_ms) if total_ms else 0.0

    def summary(self) -> dict:
        per_step = {k: v / max(self.steps, 1) for k, v in self.engine_ms.items()}
        return {
            "total_s": self.total_s,
            "images": self.images,
            "images_per_s": self.images / self.total_s if self.total_s else 0.0,
            "s_per_image": self.total_s / self.images if self.images else 0.0,
            "steps": self.steps,
            "ms_per_step": self.total_s * 1e3 / max(self.steps, 1),
            "engine_ms_per_step": per_step,
            "engine_calls": dict(self.engine_calls),
            "overhead_fraction": self.overhead_fraction,
            "brick_evaluations": self.brick_evaluations,
            "bricks_skipped": self.bricks_skipped,
            "flops_saved": self.flops_saved,
            "precision": self.precision,
            "files_precision": self.built,
            "brick_flops": self.brick_flops,
            "full_chain_evaluations": self.full_chain_evaluations,
            "bricks_per_step": self.bricks_per_step,
        }

    def table(self) -> str:
        s = self.summary()
        lines = [f"{'engine':10} {'ms/step':>10} {'calls':>7}"]
        for name, calls in s["engine_calls"].items():
            ms = f"{s['engine_ms_per_step'][name]:>10.2f}" if self.per_engine else f"{'-':>10}"
            lines.append(f"{name:10} {ms} {calls:>7}")
        overhead = "not measured (--profile)" if not self.per_engine else f"{s['overhead_fraction']:.1%}"
        lines.append(
            f"total {s['total_s']:.2f} s for {s['images']} images over {s['steps']} steps: "
            f"{s['ms_per_step']:.1f} ms/step, {s['s_per_image']:.3f} s/image, {s['images_per_s']:.2f} images/s; "
            f"bricks skipped {s['bricks_skipped']}/{s['brick_evaluations']} ({describe_saving(s['flops_saved'])}); "
            f"brick FLOPs spent: {s['full_chain_evaluations']:.2f} full-chain evaluations per image; "
            f"runtime overhead {overhead}; brick files {self.built}, runtime precision {self.precision}"
        )
        return "\n".join(lines)


def balanced_chunks(total: int, chunk: int) -> list[tuple[int, int]]:
    """(start, stop) of the fewest chunks of at most chunk rows covering total rows, of near-equal
    sizes (70 rows at 64 -> 35 + 35, not 64 + 6: both run near the fastest size)."""
    count = -(-total // chunk)
    base, extra = divmod(total, count)
    bounds, start = [], 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class ChunkTiming(Protocol):
    """What EngineRunner.infer reports each chunk to: a Timing, or the server's per-engine counters."""

    def add(self, name: str, seconds: float | None, rows: int) -> None: ...


class EngineRunner:
    """A backend's runner for one engine, with the engine's contract checked on every call.

    ``infer(feeds, timing)`` checks that the feeds are exactly the engine's inputs with its row shape,
    runs them in near-equal chunks within ``max_rows`` (the engine's N range by default), reports
    each chunk to ``timing.add(name, seconds, rows)`` (seconds None unless ``timed``: on a GPU a
    call returns before its work is done, and timing it costs a device wait), and returns the
    outputs concatenated along N.
    """

    def __init__(self, spec: EngineSpec, runner, arrays, max_rows: int | None = None, timed: bool = True):
        self.spec, self.runner, self.arrays = spec, runner, arrays
        self.name = spec.name
        self.max_rows = spec.batch["max"] if max_rows is None else max_rows
        self.timed = timed  # False: count calls only (a GPU call returns before its work is done)
        self._closed = False

    def check(self, feeds: dict) -> int:
        """The call's N, after checking names and per-row shapes against the engine's spec."""
        names = {t.name for t in self.spec.inputs}
        if set(feeds) != names:
            raise LegoError(f"{self.name}: fed {sorted(feeds)}, the engine takes {sorted(names)}")
        n = None
        for t in self.spec.inputs:
            shape = tuple(feeds[t.name].shape)
            fixed = [d for d in t.shape[1:]]
            if len(shape) != len(t.shape) or any(
                isinstance(want, int) and got != want for got, want in zip(shape[1:], fixed, strict=True)
            ):
                raise LegoError(f"{self.name}: input {t.name} has shape {list(shape)}, the engine takes {t.shape}")
            if n is not None and shape[0] != n:
                raise LegoError(f"{self.name}: inputs disagree on N ({n} and {shape[0]})")
            n = shape[0]
        return int(n or 0)

    def infer(self, feeds: dict, timing: ChunkTiming | None = None) -> dict:
        if self._closed:
            raise LegoError(f"{self.name}: the runner was closed")
        n = self.check(feeds)
        parts: dict[str, list] = {}
        for lo, hi in balanced_chunks(n, self.max_rows) if n else [(0, 0)]:
            chunk = {k: self.arrays.contiguous(v[lo:hi]) for k, v in feeds.items()}
            start = time.perf_counter()
            out = self.runner.infer(chunk)
            if timing is not None:
                if self.timed:
                    self.arrays.synchronize()
                timing.add(self.name, time.perf_counter() - start if self.timed else None, hi - lo)
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        return {k: v[0] if len(v) == 1 else self.arrays.concat(v) for k, v in parts.items()}

    def close(self) -> None:
        """Release the backend's runner (sessions, contexts); later calls are refused."""
        self._closed = True
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()
        self.runner = None
