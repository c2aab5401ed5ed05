"""Prometheus text exposition (format 0.0.4), written by hand: no client library needed.

The service counts requests, images and latencies here; the batcher's own counters (engine calls,
tiles per call, fill ratio, tick time) are read from its stats when the page is rendered.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lego_export.serve.batcher import BatcherStats

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
TILE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
RATE_WINDOW_S = 60.0  # images/s is measured over this trailing window


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # cumulative: observations <= each bound
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        pairs = zip(self.buckets, self.counts, strict=True)
        out = [f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}' for b, c in pairs]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        return [*out, f"{name}_sum{braces} {_num(self.total)}", f"{name}_count{braces} {self.count}"]


class ServiceMetrics:
    """Request-level counters of one server process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}  # by outcome: ok, failed, cancelled, expired, refused, rejected, invalid
        self.rungs: dict[tuple[str, str], int] = {}  # requests started, by (rung, tuned); rung "asked": own options
        self.images = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self._recent: deque[tuple[float, int]] = deque()  # (finish time, images) in the rate window

    def count(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def count_rung(self, rung: int | None, tuned: bool | None) -> None:
        key = ("asked", "") if rung is None else (str(rung), str(bool(tuned)).lower())
        with self._lock:
            self.rungs[key] = self.rungs.get(key, 0) + 1

    def finished(self, images: int, seconds: float) -> None:
        """A request served: its images and its latency from arrival to result."""
        with self._lock:
            self.requests["ok"] = self.requests.get("ok", 0) + 1
            self.images += images
            self.latency.observe(seconds)
            self._recent.append((time.monotonic(), images))
            self._trim()

    def images_per_second(self) -> float:
        with self._lock:
            self._trim()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def _trim(self) -> None:
        while self._recent and self._recent[0][0] < time.monotonic() - RATE_WINDOW_S:
            self._recent.popleft()


# Per engine: name, type, help, the value from (its stats, its chunk rows).
ENGINE_METRICS = (
    ("lego_serve_engine_calls_total", "counter", "Engine calls (merged across requests).", lambda e, c: e.calls),
    ("lego_serve_engine_tiles_total", "counter", "Rows (tiles, or embeddings) run through each engine.",
     lambda e, c: e.tiles),
    ("lego_serve_engine_chunk_rows", "gauge",
     "Rows per call aimed at (the engine's fastest N per row, measured at startup, or its maximum).", lambda e, c: c),
    ("lego_serve_engine_fill_ratio", "gauge", "Tiles per call over the rows per call aimed at, over all calls so far.",
     lambda e, c: e.tiles / e.capacity if e.capacity else 0.0),
    ("lego_serve_requests_per_call", "gauge", "Requests whose rows shared each merged engine call, on average.",
     lambda e, c: e.group_requests / e.groups if e.groups else 0.0),
    ("lego_serve_engine_failures_total", "counter", "Engine calls that raised.", lambda e, c: e.failures),
    ("lego_serve_engine_seconds_total", "counter", "Time inside engines.", lambda e, c: e.seconds),
)  # fmt: skip


def render(metrics: ServiceMetrics, stats: BatcherStats, queued: int, in_flight: int, chunks: dict[str, int]) -> str:
    """The /metrics page; chunks: the rows per call the batcher aims at, per engine."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: float | None = None, samples: Sequence[str] = ()) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(samples if value is None else [f"{name} {_num(value)}"])

    rate = metrics.images_per_second()
    with metrics._lock:
        outcomes, rungs, images = dict(metrics.requests), dict(metrics.rungs), metrics.images
        latency = metrics.latency.lines("lego_serve_request_latency_seconds")
    metric("lego_serve_queue_depth", "gauge", "Requests waiting for a slot.", queued)
    metric("lego_serve_requests_in_flight", "gauge", "Requests sampling now.", in_flight)
    by_outcome = [f'lego_serve_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(outcomes.items())]
    metric("lego_serve_requests_total", "counter", "Requests by outcome.", samples=by_outcome)
    by_rung = [
        f'lego_serve_requests_by_rung_total{{{f"tuned={chr(34)}{t}{chr(34)}," if t else ""}rung="{k}"}} {v}'
        for (k, t), v in sorted(rungs.items())
    ]
    metric(
        "lego_serve_requests_by_rung_total",
        "counter",
        'Requests started, by the quality-ladder rung they ran ("asked": their own options) and whether '
        "lego-export tune measured it (tuned) or it was derived from the model.",
        samples=by_rung,
    )
    metric("lego_serve_images_total", "counter", "Images returned.", images)
    metric("lego_serve_images_per_second", "gauge", f"Images returned per second over the last {RATE_WINDOW_S:.0f} s.",
           rate)  # fmt: skip
    metric("lego_serve_request_latency_seconds", "histogram", "Arrival to result, per request.", samples=latency)
    engines = sorted(stats.engines.items())
    for name, kind, help_text, value in ENGINE_METRICS:
        samples = [f'{name}{{engine="{k}"}} {_num(value(e, chunks.get(k, 0)))}' for k, e in engines]
        metric(name, kind, help_text, samples=samples)
    per_call = [
        line for k, e in engines for line in e.tiles_per_call.lines("lego_serve_tiles_per_call", f'engine="{k}"')
    ]
    metric("lego_serve_tiles_per_call", "histogram", "Tiles per engine call.", samples=per_call)
    metric("lego_serve_ticks_total", "counter", "CallBatcher ticks.", stats.ticks)
    metric("lego_serve_slack_ticks_total", "counter", "Ticks not in arrival order: it would have made a request late.",
           stats.slack_ticks)  # fmt: skip
    metric("lego_serve_tick_seconds_total", "counter", "Wall time of the ticks (merging, engine calls, scattering).",
           stats.tick_seconds)  # fmt: skip
    metric("lego_serve_scheduler_overhead_ratio", "gauge",
           "Share of tick time spent merging and scattering, outside engines.", stats.overhead_fraction)  # fmt: skip
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    """A sample value or bucket bound as Prometheus writes it (counts as integers, in full)."""
    if isinstance(value, int):
        return str(value)
    return ("+Inf" if value > 0 else "-Inf") if math.isinf(value) else f"{value:.9g}"
