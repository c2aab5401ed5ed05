"""Latency of LEGO brick engines and of whole sampling runs, backends side by side in one run.

    python benchmarks/latency.py --out benchmarks/results/latency   # full run, a few minutes on 2 cores
    python benchmarks/latency.py --quick         # under 2 minutes; prints the report, writes nothing

Measures, on this machine, in one process:
  - the fp32 matmul peak (NumPy and torch, best of both);
  - every brick engine by N (median / p90 / p99): FLOPs per call, GFLOP/s, fraction of peak,
    ONNX Runtime against the same brick in PyTorch eager;
  - one diffusion step with every prefix of the chain (each skip plan), canvases 32x32, 64x64,
    32x96 and batches 1, 16, 64, ONNX Runtime against PyTorch eager, and the runtime overhead
    (share of the ONNX Runtime step spent outside engine calls);
  - whole samples with and without --skip-late-bricks: wall-time saving against the FLOP fraction.
Prints the report; with --out PREFIX also writes PREFIX.json, PREFIX.md and PREFIX.png.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    machine,
    markdown_table,
    matmul_peak_gflops,
    one_evaluation,
    one_line_errors,
    out_option,
    random_feeds,
    save_figure,
    save_results,
    time_calls,
)

from lego_export.checkpoint import load_model  # noqa: E402
from lego_export.edm import sample  # noqa: E402
from lego_export.flops import brick_flops_per_tile  # noqa: E402
from lego_export.options import SamplingOptions  # noqa: E402
from lego_export.plan import StepPlan  # noqa: E402
from lego_export.runtime.pipeline import LegoPipeline  # noqa: E402


def brick_rows(pipe: LegoPipeline, model, batches, reps, peak) -> list[dict]:
    """Each brick engine alone, ONNX Runtime vs PyTorch eager, by N."""
    rows: list[dict[str, Any]] = []
    m = pipe.manifest.model
    for spec, timed in zip(pipe.manifest.bricks, pipe.bricks, strict=True):
        brick_cfg = m.bricks[spec.index]
        per_tile = brick_flops_per_tile(brick_cfg, int(spec.inputs[0].shape[1]), m.img_channels, m.cond_dim)
        tiles = (m.img_resolution // brick_cfg.size) ** 2
        for b in batches:
            n = b * tiles
            feeds = random_feeds(spec, n, np.random.default_rng(0))
            args = [torch.from_numpy(feeds[t.name]) for t in spec.inputs]
            module = model.bricks[spec.index]
            with torch.inference_mode():
                t_torch = time_calls(functools.partial(module, *args), reps)
            t_ort = time_calls(functools.partial(timed.runner.infer, feeds), reps)
            gflops = per_tile * n / t_ort["median_ms"] / 1e6
            rows.append(
                {
                    "brick": spec.name,
                    "size": brick_cfg.size,
                    "images": b,
                    "N": n,
                    "gflop_per_call": per_tile * n / 1e9,
                    "ort_ms": t_ort["median_ms"],
                    "ort_p90_ms": t_ort["p90_ms"],
                    "ort_p99_ms": t_ort["p99_ms"],
                    "torch_ms": t_torch["median_ms"],
                    "torch_p90_ms": t_torch["p90_ms"],
                    "torch_p99_ms": t_torch["p99_ms"],
                    "ort_over_torch": t_ort["median_ms"] / t_torch["median_ms"],
                    "ort_gflops": gflops,
                    "fraction_of_peak": gflops / peak,
                }
            )
    return rows


def skip_pair(pipe: LegoPipeline, reps: int, batch: int = 16) -> dict:
    """One step with and without the top brick, calls alternating so that both see the same machine
    (this machine's speed drifts over seconds): median milliseconds of each and the FLOP share."""
    rng = np.random.default_rng(0)
    res, k = pipe.resolution, len(pipe.brick_sizes)
    x = rng.standard_normal((batch, pipe.channels, res, res)).astype(np.float32)
    onehot = np.eye(pipe.num_classes, dtype=np.float32)[np.arange(batch) % pipe.num_classes]
    plans = {k: StepPlan(0, 1.0, k, (0, 0)), k - 1: StepPlan(0, 1.0, k - 1, (0, 0))}
    times: dict[int, list[float]] = {k: [], k - 1: []}
    for i in range(reps + 2):
        for bricks, plan in plans.items():
            start = time.perf_counter()
            pipe.denoise(x, 1.0, plan, onehot)
            if i >= 2:  # warm-up
                times[bricks].append((time.perf_counter() - start) * 1e3)
    full, skipped = float(np.median(times[k])), float(np.median(times[k - 1]))
    return {
        "canvas": f"{res}x{res}",
        "batch": batch,
        "full_ms": full,
        "skipped_ms": skipped,
        "time_saved": 1 - skipped / full,
        "flop_share": pipe.brick_flops[-1] / sum(pipe.brick_flops),
    }


def step_rows(pipe: LegoPipeline, model, canvases, batches, reps) -> list[dict]:
    """One denoiser evaluation at sigma = 1 with each prefix of the chain; the runtime overhead from
    the Timing of reps one-evaluation sampling calls (engine time against the call's wall time)."""
    rows: list[dict[str, Any]] = []
    k_all = len(pipe.brick_sizes)
    for h, w in canvases:
        for b in batches:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((b, pipe.channels, h, w)).astype(np.float32)
            onehot = np.eye(pipe.num_classes, dtype=np.float32)[np.arange(b) % pipe.num_classes]
            tx, toh = torch.from_numpy(x), torch.from_numpy(onehot)
            for k in range(k_all, 0, -1):
                plan = StepPlan(0, 1.0, k, (0, 0))
                t_ort = time_calls(functools.partial(pipe.denoise, x, 1.0, plan, onehot), reps)
                timings = [one_evaluation(pipe, k, b, (h, w)).timing for _ in range(reps)]
                engine_s = sum(sum(t.engine_ms.values()) for t in timings) / 1e3
                wall = sum(t.total_s for t in timings)
                with torch.inference_mode():
                    t_torch = time_calls(functools.partial(model, tx, 1.0, toh, num_bricks=k), reps)
                rows.append(
                    {
                        "canvas": f"{h}x{w}",
                        "batch": b,
                        "bricks": k,
                        "ort_ms": t_ort["median_ms"],
                        "ort_p90_ms": t_ort["p90_ms"],
                        "torch_ms": t_torch["median_ms"],
                        "torch_p90_ms": t_torch["p90_ms"],
                        "ort_over_torch": t_ort["median_ms"] / t_torch["median_ms"],
                        "overhead_fraction": max(0.0, 1 - engine_s / wall),
                    }
                )
    return rows


def sample_rows(pipe: LegoPipeline, model, steps: int, batch: int) -> list[dict]:
    """Whole samples (batch images, all steps), full chain and --skip-late-bricks, both backends."""
    rows: list[dict[str, Any]] = []
    onehot = torch.eye(pipe.num_classes)[torch.arange(batch) % pipe.num_classes]
    sigmas = pipe.edm.sigmas(steps)
    for skip in ("none", "late"):
        plan = pipe.plan(SamplingOptions(steps=steps, skip=skip))
        start = time.perf_counter()
        pipe(num=batch, steps=steps, batch=batch, skip=skip)
        t_ort = time.perf_counter() - start
        noise = torch.randn(batch, pipe.channels, pipe.resolution, pipe.resolution)
        start = time.perf_counter()
        with torch.inference_mode():
            sample(lambda x, s, i, plan=plan: model(x, s, onehot, num_bricks=plan[i].bricks), noise, sigmas)
        t_torch = time.perf_counter() - start
        rows.append(
            {
                "skip": skip or "none",
                "steps": steps,
                "batch": batch,
                "flops_saved": pipe.flops_saved(plan),
                "ort_s_per_image": t_ort / batch,
                "torch_s_per_image": t_torch / batch,
                "ort_over_torch": t_ort / t_torch,
            }
        )
    full, skipped = rows
    for backend in ("ort", "torch"):
        saved = 1 - skipped[f"{backend}_s_per_image"] / full[f"{backend}_s_per_image"]
        skipped[f"{backend}_time_saved"] = saved
        skipped[f"{backend}_saving_vs_flops"] = saved / skipped["flops_saved"] if skipped["flops_saved"] else None
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    bricks = results["bricks"]
    for name in sorted({r["brick"] for r in bricks}):
        rs = [r for r in bricks if r["brick"] == name]
        axes[0].plot([r["N"] for r in rs], [r["ort_gflops"] for r in rs], "o-", label=f"{name} ONNX Runtime")
        axes[0].plot(
            [r["N"] for r in rs], [r["gflop_per_call"] / r["torch_ms"] * 1e3 for r in rs], "x--", label=f"{name} torch"
        )
    axes[0].axhline(results["peak_gflops"]["peak"], color="k", lw=0.8, label="matmul peak")
    axes[0].set(xscale="log", xlabel="tiles per call (N)", ylabel="GFLOP/s", title="brick engines")
    axes[0].legend(fontsize=7)
    steps = [r for r in results["steps"] if r["canvas"] == "32x32"]
    for b in sorted({r["batch"] for r in steps}):
        rs = sorted((r for r in steps if r["batch"] == b), key=lambda r: r["bricks"])
        axes[1].plot([r["bricks"] for r in rs], [r["ort_ms"] / b for r in rs], "o-", label=f"ORT batch {b}")
        axes[1].plot([r["bricks"] for r in rs], [r["torch_ms"] / b for r in rs], "x--", label=f"torch batch {b}")
    axes[1].set(
        xlabel="bricks run (prefix length)", ylabel="ms per image per step", yscale="log", title="one step, 32x32"
    )
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def report(results: dict) -> str:
    lines = [
        f"# Latency ({results['machine']['cpu']}, {results['threads']} threads)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Measured fp32 matmul peak: {results['peak_gflops']['peak']:.1f} GFLOP/s "
        f"(NumPy {results['peak_gflops']['numpy']:.1f}, torch {results['peak_gflops'].get('torch', 0):.1f}).",
        "",
        "## Brick engines",
        "",
    ]
    lines.append(
        markdown_table(
            results["bricks"],
            [
                ("brick", "brick", "s"),
                ("size", "tile", "d"),
                ("images", "images", "d"),
                ("N", "N", "d"),
                ("gflop_per_call", "GFLOP/call", ".3f"),
                ("ort_ms", "ORT ms", ".2f"),
                ("ort_p90_ms", "p90", ".2f"),
                ("ort_p99_ms", "p99", ".2f"),
                ("torch_ms", "torch ms", ".2f"),
                ("ort_over_torch", "ORT/torch", ".2f"),
                ("ort_gflops", "GFLOP/s", ".1f"),
                ("fraction_of_peak", "of peak", ".0%"),
            ],
        )
    )
    lines += ["", "## One step (sigma = 1), each prefix of the chain", ""]
    lines.append(
        markdown_table(
            results["steps"],
            [
                ("canvas", "canvas", "s"),
                ("batch", "batch", "d"),
                ("bricks", "bricks run", "d"),
                ("ort_ms", "ORT ms", ".1f"),
                ("ort_p90_ms", "p90", ".1f"),
                ("torch_ms", "torch ms", ".1f"),
                ("ort_over_torch", "ORT/torch", ".2f"),
                ("overhead_fraction", "runtime overhead", ".1%"),
            ],
        )
    )
    lines += ["", "## Whole samples", ""]
    lines.append(
        markdown_table(
            results["samples"],
            [
                ("skip", "skip", "s"),
                ("steps", "steps", "d"),
                ("batch", "batch", "d"),
                ("flops_saved", "FLOPs saved", ".1%"),
                ("ort_s_per_image", "ORT s/image", ".3f"),
                ("torch_s_per_image", "torch s/image", ".3f"),
                ("ort_time_saved", "ORT time saved", ".1%"),
                ("ort_saving_vs_flops", "saved/FLOPs", ".2f"),
                ("torch_time_saved", "torch time saved", ".1%"),
            ],
        )
    )
    pair = results["skip_pair"]
    lines += [
        "",
        f"Top brick skipped, one step at {pair['canvas']} batch {pair['batch']}, calls alternating: full chain "
        f"{pair['full_ms']:.1f} ms, without the top brick {pair['skipped_ms']:.1f} ms, so {pair['time_saved']:.1%} "
        f"of the time saved for {pair['flop_share']:.1%} of the brick FLOPs.",
    ]
    lines += ["", "## Targets (batch 16, 32x32)", ""]
    lines.append(
        markdown_table(results["targets"], [("target", "target", "s"), ("value", "measured", "s"), ("met", "met", "s")])
    )
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[dict]:
    step = {r["bricks"]: r for r in results["steps"] if r["canvas"] == "32x32" and r["batch"] == 16}
    k = max(step)
    largest = max((r for r in results["bricks"] if r["images"] == 16), key=lambda r: r["size"])
    # Skipping, judged per step with alternating calls (see skip_pair). The whole-sample rows are one
    # run each way; at small skip fractions the machine's drift is larger than the saving.
    pair = results["skip_pair"]
    skip_ratio = pair["time_saved"] / pair["flop_share"]
    rows = [
        (
            "ONNX Runtime step <= 0.6x PyTorch eager",
            step[k]["ort_over_torch"],
            step[k]["ort_over_torch"] <= 0.6,
            "{:.2f}x",
        ),
        (
            "skipping the top brick saves >= 90% of its FLOP share in step time",
            skip_ratio,
            skip_ratio >= 0.9,
            "{:.0%}",
        ),
        (
            "runtime overhead <= 5% of step time",
            step[k]["overhead_fraction"],
            step[k]["overhead_fraction"] <= 0.05,
            "{:.1%}",
        ),
        (
            "largest brick >= 40% of matmul peak",
            largest["fraction_of_peak"],
            largest["fraction_of_peak"] >= 0.4,
            "{:.0%}",
        ),
    ]
    return [{"target": t, "value": f.format(v), "met": "yes" if ok else "no"} for t, v, ok, f in rows]


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--ckpt", default="checkpoints/fmnist-pg-s.safetensors", show_default=True)
@click.option("--quick", is_flag=True, help="Fewer sizes and repetitions: under 2 minutes.")
@click.option("--threads", default=2, show_default=True)
@out_option("benchmarks/results/latency")
@one_line_errors
def main(engines: str, ckpt: str, quick: bool, threads: int, out: str | None) -> None:
    """Latency of the brick engines, one step and whole samples, ONNX Runtime against PyTorch eager."""
    torch.set_num_threads(threads)
    pipe = LegoPipeline.from_engines(engines, "onnxruntime", threads=threads)
    model = load_model(ckpt)
    if quick:
        batches, canvases, reps, steps = [16], [(32, 32)], 5, 10
    else:
        batches, canvases, reps, steps = [1, 16, 64], [(32, 32), (64, 64), (32, 96)], 10, 50
    results: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "threads": threads,
        "peak_gflops": matmul_peak_gflops(threads),
    }
    peak = results["peak_gflops"]["peak"]
    click.echo(f"matmul peak {peak:.1f} GFLOP/s", err=True)
    results["bricks"] = brick_rows(pipe, model, batches, 3 * reps, peak)
    click.echo("bricks done", err=True)
    results["steps"] = step_rows(pipe, model, canvases, batches if not quick else [16], reps)
    click.echo("steps done", err=True)
    results["skip_pair"] = skip_pair(pipe, 4 * reps)
    results["samples"] = sample_rows(pipe, model, steps, 16)
    results["targets"] = targets(results)
    save_results(out, results, report(results), lambda path: plot(results, path))


if __name__ == "__main__":
    main()
