"""Shared helpers of the benchmark scripts: timing statistics, machine description, peak matmul rate."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lego_export.atomic import atomic_write


def random_feeds(spec, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of an engine's shapes for timing (values do not change the work): unit Gaussians,
    c_noise over the sampling range, one-hot labels."""
    feeds = {}
    for t in spec.inputs:
        shape = [n if d == "N" else d for d in t.shape]
        if t.name == "c_noise":
            value = np.log(rng.uniform(0.002, 80.0, size=shape)) / 4
        elif t.name == "class_onehot":
            value = np.eye(shape[1])[rng.integers(0, shape[1], size=n)]
        else:
            value = rng.standard_normal(shape)
        feeds[t.name] = value.astype(np.float32)
    return feeds


def time_calls(fn: Callable[[], object], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median / p90 / p99 / min of reps calls, in milliseconds, after warm-up calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    a = np.array(samples)
    return {
        "median_ms": float(np.median(a)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "min_ms": float(a.min()),
        "reps": reps,
    }


def matmul_peak_gflops(threads: int, size: int = 1024, reps: int = 10) -> dict[str, float]:
    """Measured fp32 matmul rate of this machine: NumPy (its BLAS) and torch, best of both."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size)).astype(np.float32) for _ in range(2))
    flops = 2.0 * size**3
    result = {"numpy": flops / time_calls(lambda: a @ b, reps)["median_ms"] / 1e6}
    try:
        import torch

        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        result["torch"] = flops / time_calls(lambda: ta @ tb, reps)["median_ms"] / 1e6
    except ImportError:
        pass
    result["peak"] = max(result.values())
    return result


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("numpy", "torch", "onnxruntime", "onnx"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def write_text(path: Path, text: str) -> None:
    """A result file, whole or not at all (an exclusive temporary file, then an atomic replace)."""
    with atomic_write(path) as f:
        f.write(text.encode())


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG, whole or not at all (as write_text)."""
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join(format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns) + " |" for r in rows
    ]
    return "\n".join([head, rule, *body])
