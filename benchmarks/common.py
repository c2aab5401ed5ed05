"""Shared helpers of the benchmark scripts: timing statistics, machine description, peak matmul rate,
and the one way every script keeps its results and reports its failures.

Results: a script prints its report; it writes files only when given ``--out PREFIX`` (PREFIX.json,
PREFIX.md and, where it draws one, PREFIX.png), so that a try never overwrites the committed results
in benchmarks/results/ (the Makefile's ``bench`` target passes their names explicitly).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np

from lego_export.atomic import atomic_write
from lego_export.errors import LegoError


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


def out_option(example: str):
    """The --out PREFIX option of every benchmark; example names the committed results' prefix."""
    return click.option(
        "--out",
        default=None,
        metavar="PREFIX",
        help=f"Write PREFIX.json, PREFIX.md (and PREFIX.png where drawn), e.g. {example}. "
        "Default: print the report only, write no file.",
    )


def save_results(out: str | None, data: dict, text: str, plot: Callable[[Path], None] | None = None) -> list[Path]:
    """Print the report; with out, also write OUT.json, OUT.md and (plot given, matplotlib installed)
    OUT.png, each whole or not at all. Returns the paths written."""
    click.echo(text)
    if out is None:
        click.echo("results not written (pass --out PREFIX to keep them)", err=True)
        return []
    written = [Path(f"{out}.json"), Path(f"{out}.md")]
    written[0].parent.mkdir(parents=True, exist_ok=True)
    write_json(written[0], data)
    write_text(written[1], text)
    if plot is not None:
        try:
            plot(Path(f"{out}.png"))
            written.append(Path(f"{out}.png"))
        except ImportError:
            click.echo("matplotlib not installed: no plot (pip install -e '.[bench]')", err=True)
    click.echo("wrote " + ", ".join(str(p) for p in written), err=True)
    return written


def one_line_errors(main: Callable) -> Callable:
    """A benchmark's failure as one line and a non-zero exit (click's "Error: ..." and exit 1), not a
    traceback: usage errors stay click's own, exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 -- whatever failed, the script says what in one line
            raise click.ClickException(f"{Path(sys.argv[0]).name} failed: {one_line(e)}") from None

    return wrapper


def one_line(e: BaseException) -> str:
    """An exception as one line: the first line of its message, after its type unless it is the
    project's own LegoError (written for people already)."""
    lines = str(e).strip().splitlines()
    if isinstance(e, LegoError) and lines:
        return lines[0]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def one_evaluation(pipe, bricks: int, batch: int, canvas: tuple[int, int] | None = None, seed: int = 0):
    """One denoiser evaluation with the first `bricks` bricks, through the pipeline's public sampling
    call so that its Timing (result.timing) records every engine call: one Euler step from sigma_max
    to 0 is exactly one evaluation (x + (0 - s)(x - D) / s = D), and the rule "k@:sigma_max/2" keeps
    brick k and every later brick out of it. The tile grid stays put, as in a StepPlan with shift (0, 0)."""
    from lego_export.options import SamplingOptions

    top = len(pipe.brick_sizes)
    skip = "none" if bricks >= top else f"{bricks}@:{pipe.edm.sigma_max / 2:g}"
    options = SamplingOptions(sampler="euler", steps=1, skip=skip, tile_shift=False)
    result = pipe(options, num=batch, batch=batch, resolution=canvas, seed=seed)
    if result.plan[0].bricks != min(bricks, top):
        raise RuntimeError(f"asked for {bricks} bricks, the plan ran {result.plan[0].bricks}")
    return result
