"""Prometheus text exposition (format 0.0.4), written by hand: no client library needed.

The service counts requests, images and latencies here; the batcher's own counters (engine calls,
tiles per call, fill ratio, tick time) are read from its stats when the page is rendered.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from lego_export.serve.batcher import TILE_BUCKETS, BatcherStats

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 60.0  # images/s is measured over this trailing window


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
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
        out += [f"{name}_sum{braces} {_num(self.total)}", f"{name}_count{braces} {self.count}"]
        return out


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
        with self._lock:
            key = ("asked", "") if rung is None else (str(rung), str(bool(tuned)).lower())
            self.rungs[key] = self.rungs.get(key, 0) + 1

    def finished(self, images: int, seconds: float) -> None:
        """A request served: its images and its latency from arrival to result."""
        now = time.monotonic()
        with self._lock:
            self.requests["ok"] = self.requests.get("ok", 0) + 1
            self.images += images
            self.latency.observe(seconds)
            self._recent.append((now, images))
            self._trim(now)

    def images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()


def render(metrics: ServiceMetrics, stats: BatcherStats, queued: int, in_flight: int, chunks: dict[str, int]) -> str:
    """The /metrics page; chunks: the rows per call the batcher aims at, per engine."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

    metric("lego_serve_queue_depth", "gauge", "Requests waiting for a slot.", [f"lego_serve_queue_depth {queued}"])
    metric(
        "lego_serve_requests_in_flight",
        "gauge",
        "Requests sampling now.",
        [f"lego_serve_requests_in_flight {in_flight}"],
    )
    with metrics._lock:
        outcomes = dict(metrics.requests)
        rungs = dict(metrics.rungs)
        images, latency = metrics.images, metrics.latency
        latency_lines = latency.lines("lego_serve_request_latency_seconds")
    metric(
        "lego_serve_requests_total",
        "counter",
        "Requests by outcome.",
        [f'lego_serve_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(outcomes.items())],
    )
    metric(
        "lego_serve_requests_by_rung_total",
        "counter",
        'Requests started, by the quality-ladder rung they ran ("asked": their own options) and whether '
        "lego-export tune measured it (tuned) or it was derived from the model.",
        [
            f'lego_serve_requests_by_rung_total{{{f"tuned={chr(34)}{t}{chr(34)}," if t else ""}rung="{k}"}} {v}'
            for (k, t), v in sorted(rungs.items())
        ],
    )
    metric("lego_serve_images_total", "counter", "Images returned.", [f"lego_serve_images_total {images}"])
    metric(
        "lego_serve_images_per_second",
        "gauge",
        f"Images returned per second over the last {RATE_WINDOW_S:.0f} s.",
        [f"lego_serve_images_per_second {_num(metrics.images_per_second())}"],
    )
    metric("lego_serve_request_latency_seconds", "histogram", "Arrival to result, per request.", latency_lines)

    engines = dict(stats.engines)
    per_engine = (  # name, type, help, value of one engine (name, its stats)
        ("lego_serve_engine_calls_total", "counter", "Engine calls (merged across requests).", lambda k, e: e.calls),
        (
            "lego_serve_engine_tiles_total",
            "counter",
            "Rows (tiles, or embeddings) run through each engine.",
            lambda k, e: e.tiles,
        ),
        (
            "lego_serve_engine_chunk_rows",
            "gauge",
            "Rows per call aimed at (the engine's fastest N per row, measured at startup, or its maximum).",
            lambda k, e: chunks.get(k, 0),
        ),
        (
            "lego_serve_engine_fill_ratio",
            "gauge",
            "Tiles per call over the rows per call aimed at, over all calls so far.",
            lambda k, e: e.tiles / e.capacity if e.capacity else 0.0,
        ),
        (
            "lego_serve_requests_per_call",
            "gauge",
            "Requests whose rows shared each merged engine call, on average.",
            lambda k, e: e.group_requests / e.groups if e.groups else 0.0,
        ),
        ("lego_serve_engine_failures_total", "counter", "Engine calls that raised.", lambda k, e: e.failures),
        ("lego_serve_engine_seconds_total", "counter", "Time inside engines.", lambda k, e: e.seconds),
    )
    for name, kind, help_text, value in per_engine:
        samples = [f'{name}{{engine="{k}"}} {_num(value(k, e))}' for k, e in sorted(engines.items())]
        metric(name, kind, help_text, samples)
    samples = []
    for k, e in sorted(engines.items()):
        counts = dict(e.tiles_per_call)
        cumulative = 0
        for bound in TILE_BUCKETS:
            cumulative += counts.get(bound, 0)
            samples.append(f'lego_serve_tiles_per_call_bucket{{engine="{k}",le="{bound}"}} {cumulative}')
        samples += [
            f'lego_serve_tiles_per_call_bucket{{engine="{k}",le="+Inf"}} {e.calls}',
            f'lego_serve_tiles_per_call_sum{{engine="{k}"}} {e.tiles}',
            f'lego_serve_tiles_per_call_count{{engine="{k}"}} {e.calls}',
        ]
    metric("lego_serve_tiles_per_call", "histogram", "Tiles per engine call.", samples)
    metric("lego_serve_ticks_total", "counter", "CallBatcher ticks.", [f"lego_serve_ticks_total {stats.ticks}"])
    metric(
        "lego_serve_slack_ticks_total",
        "counter",
        "Ticks not in arrival order: it would have made a request late.",
        [f"lego_serve_slack_ticks_total {stats.slack_ticks}"],
    )
    metric(
        "lego_serve_tick_seconds_total",
        "counter",
        "Wall time of the ticks (merging, engine calls, scattering).",
        [f"lego_serve_tick_seconds_total {_num(stats.tick_seconds)}"],
    )
    metric(
        "lego_serve_scheduler_overhead_ratio",
        "gauge",
        "Share of tick time spent merging and scattering, outside engines.",
        [f"lego_serve_scheduler_overhead_ratio {_num(stats.overhead_fraction)}"],
    )
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    """A sample value or bucket bound as Prometheus writes it (counts as integers, in full)."""
    if isinstance(value, int):
        return str(value)
    return ("+Inf" if value > 0 else "-Inf") if math.isinf(value) else f"{value:.9g}"
