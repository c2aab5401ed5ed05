"""One full-chain denoiser step of the same model on every CPU peer, each in its own process.

    python benchmarks/peers.py --engines engines --ckpt checkpoints/fmnist-pg-s.safetensors \\
        --out benchmarks/results/peers

Peers in fp32: PyTorch eager, torch.compile, ONNX Runtime on the portable and on the fused graphs,
and OpenVINO reading the portable ONNX files (if installed). In lower precision: OpenVINO in bf16
(its default on CPUs with bf16 units), and the int8 graphs of `lego-export build --int8` on ONNX
Runtime and OpenVINO (skipped when the engines have none). Each
peer lives in its own worker process (one runtime's spinning thread pool slows the next by up to
10x when they share a process), and every worker but the one being timed is stopped (SIGSTOP), so
no idle pool spins meanwhile; the coordinator asks them in turn, round after round, to time a few
calls on the same inputs, so that the machine's drift hits every peer alike. Reports the median per
peer, its ratio to the fastest, its speed-up over the fastest fp32 peer, and GFLOP/s against this
machine's measured matmul rate.
Prints the table; with --out PREFIX also writes PREFIX.json and PREFIX.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, matmul_peak_gflops, one_line_errors, out_option, save_results  # noqa: E402

PEERS = ("eager", "compile", "openvino", "ort-portable", "ort-fused", "openvino-bf16", "ort-int8", "openvino-int8")
LOW_PRECISION = {"openvino-bf16": "bf16", "ort-int8": "int8", "openvino-int8": "int8"}


# -- worker side --------------------------------------------------------------------------------------


def make_step(peer: str, engines: str, ckpt: str, batch: int, threads: int):
    """A zero-argument callable running one full-chain evaluation of `batch` images on this peer."""
    from lego_export.manifest import Manifest
    from lego_export.plan import StepPlan
    from lego_export.runtime.pipeline import LegoPipeline

    manifest = Manifest.read(engines)
    cfg = manifest.model
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, cfg.img_channels, cfg.img_resolution, cfg.img_resolution)).astype(np.float32)
    onehot = np.eye(cfg.num_classes, dtype=np.float32)[np.arange(batch) % cfg.num_classes]
    plan = StepPlan(0, 1.0, len(cfg.bricks), (0, 0))

    if peer in ("eager", "compile"):
        import torch

        from lego_export.checkpoint import load_model

        torch.set_num_threads(threads)
        model = load_model(ckpt)
        forward = torch.compile(model) if peer == "compile" else model
        tx, toh, sigma = torch.from_numpy(x), torch.from_numpy(onehot), torch.ones(batch)

        def step():
            with torch.inference_mode():
                forward(tx, sigma, toh)

        return step

    precision = LOW_PRECISION.get(peer, "fp32")
    if peer.startswith("openvino"):
        from lego_export.runtime.backends import OpenVinoBackend

        backend: OpenVinoBackend | OnnxRuntimeBackend = OpenVinoBackend(Path(engines), manifest, threads, precision)
    else:
        from lego_export.runtime.backends import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(Path(engines), manifest, threads=threads, precision=precision)
        if peer == "ort-portable":
            backend.formats = ("onnx",)
    pipe = LegoPipeline(manifest, backend)
    return lambda: pipe.denoise(x, 1.0, plan, onehot)


def worker(peer: str, engines: str, ckpt: str, batch: int, threads: int) -> None:
    """Answer 'run K' lines with the K call times in milliseconds, one JSON line each."""
    step = make_step(peer, engines, ckpt, batch, threads)
    for _ in range(3):  # warm-up (torch.compile compiles here)
        step()
    print(json.dumps({"ready": peer}), flush=True)
    for line in sys.stdin:
        reps = int(line.split()[1])
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        print(json.dumps({"ms": times}), flush=True)


# -- coordinator ----------------------------------------------------------------------------------------


def peer_list(ctx, param, value: str) -> list[str]:
    """--peers: names from PEERS, comma-separated."""
    chosen = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PEERS]
    if unknown or not chosen:
        raise click.BadParameter(f"{value!r}: a comma-separated list of {', '.join(PEERS)}")
    return chosen


def start_worker(peer: str, engines: str, ckpt: str, batch: int, threads: int) -> subprocess.Popen | None:
    """A worker process for one peer, warmed up (its 'ready' line read), or None if it did not start."""
    cmd = [sys.executable, __file__, "--worker", peer, "--engines", engines, "--ckpt", ckpt]
    cmd += ["--batch", str(batch), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline():  # one peer warms up at a time: compilation is not timed
        return proc
    proc.wait()
    return None


def time_peers(workers: dict, skipped: dict, engines, ckpt, batch, threads, rounds, reps) -> dict[str, list[float]]:
    """Start a worker per available peer (into workers, for the caller to stop), then time them in
    rounds: milliseconds per call, per peer."""
    for peer, why in skipped.items():
        if why:
            print(f"{peer}: skipped ({why})")
            continue
        proc = start_worker(peer, engines, ckpt, batch, threads)
        if proc is None:
            print(f"{peer}: failed to start")
            skipped[peer] = "failed to start"
            continue
        workers[peer] = proc
        os.kill(proc.pid, signal.SIGSTOP)  # quiet while the next peer warms up
    times: dict[str, list[float]] = {p: [] for p in workers}
    for _ in range(rounds):
        for peer, proc in workers.items():
            # Only the peer being timed runs: the others are stopped, so no thread pool of theirs can
            # spin on the cores in the meantime.
            os.kill(proc.pid, signal.SIGCONT)
            proc.stdin.write(f"run {reps}\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise click.ClickException(f"peer {peer}'s worker stopped (exit {proc.wait()})")
            times[peer] += json.loads(line)["ms"]
            os.kill(proc.pid, signal.SIGSTOP)
    return times


def stop_workers(workers: dict) -> None:
    """Let every worker go on and end: its stdin closed (it returns), killed if it does not within a minute."""
    for proc in workers.values():
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.close()
    for proc in workers.values():
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def available(peer: str, engines: str) -> str | None:
    """Why a peer cannot run here, or None."""
    import importlib.util

    from lego_export.manifest import Manifest

    if LOW_PRECISION.get(peer) == "int8" and any("onnx-int8" not in e.files for e in Manifest.read(engines).bricks):
        return "no int8 files: build with lego-export build --int8"
    need = "openvino" if peer.startswith("openvino") else "torch" if peer in ("eager", "compile") else "onnxruntime"
    return None if importlib.util.find_spec(need) else f"{need} is not installed"


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--ckpt", default="checkpoints/fmnist-pg-s.safetensors", show_default=True)
@click.option("--batch", default=16, show_default=True, help="Images per step.")
@click.option(
    "--rounds",
    default=12,
    show_default=True,
    type=click.IntRange(1),
    help="Rounds; every peer runs --reps calls per round.",
)
@click.option("--reps", default=5, show_default=True, type=click.IntRange(1))
@click.option("--threads", default=2, show_default=True)
@click.option("--peers", default=",".join(PEERS), show_default=True, callback=peer_list)
@out_option("benchmarks/results/peers")
@click.option("--worker", "worker_peer", default=None, hidden=True)
@one_line_errors
def main(engines, ckpt, batch, rounds, reps, threads, peers, out, worker_peer) -> None:
    """One full-chain denoiser step on every CPU peer, each in its own process, timed in turn."""
    if worker_peer:
        worker(worker_peer, engines, ckpt, batch, threads)
        return
    from lego_export.flops import model_brick_flops
    from lego_export.manifest import Manifest

    cfg = Manifest.read(engines).model
    gflop = sum(model_brick_flops(cfg)) * batch / 1e9
    skipped = {p: available(p, engines) for p in peers}
    workers: dict[str, subprocess.Popen] = {}
    try:
        times = time_peers(workers, skipped, engines, ckpt, batch, threads, rounds, reps)
    finally:
        stop_workers(workers)
    if not times:
        raise click.ClickException("no peer ran: " + "; ".join(f"{p}: {why}" for p, why in skipped.items()))
    peak = matmul_peak_gflops(threads)["peak"]
    medians = {p: float(np.median(t)) for p, t in times.items()}
    fastest = min(medians.values())
    fastest_fp32 = min(ms for p, ms in medians.items() if p not in LOW_PRECISION)
    rows = [
        {
            "peer": p,
            "median_ms": ms,
            "p90_ms": float(np.percentile(times[p], 90)),
            "precision": LOW_PRECISION.get(p, "fp32"),
            "vs_fastest": ms / fastest,
            "speedup_vs_fastest_fp32": fastest_fp32 / ms,
            "gflops": gflop / (ms / 1e3),
            "of_peak": gflop / (ms / 1e3) / peak,
        }
        for p, ms in sorted(medians.items(), key=lambda kv: kv[1])
    ]
    command = " ".join(["python", "benchmarks/peers.py", *sys.argv[1:]])
    result = {"command": command, "machine": machine(), "batch": batch, "gflop_per_step": gflop, "peak_gflops": peak}
    result["rows"] = rows
    columns = [
        ("peer", "peer", ""),
        ("median_ms", "ms / step (median)", ".1f"),
        ("p90_ms", "p90 ms", ".1f"),
        ("precision", "precision", ""),
        ("vs_fastest", "x fastest", ".2f"),
        ("speedup_vs_fastest_fp32", "speed-up vs fastest fp32", ".2f"),
        ("gflops", "GFLOP/s", ".0f"),
        ("of_peak", "of matmul peak", ".0%"),
    ]
    table = markdown_table(rows, columns)
    text = (
        f"# One full-chain step, batch {batch}, {cfg.img_resolution}x{cfg.img_resolution}\n\n`{command}`\n\n"
        f"{gflop:.2f} GFLOP per step; matmul peak {peak:.0f} GFLOP/s; {rounds} rounds x {reps} calls per peer.\n\n"
        f"{table}\n"
    )
    save_results(out, result, text)


if __name__ == "__main__":
    main()
