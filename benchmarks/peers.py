"""One full-chain denoiser step of the same model on every CPU peer, each in its own process.

    python benchmarks/peers.py --engines engines --ckpt checkpoints/fmnist-pg-s.safetensors \\
        --out benchmarks/results/peers

Peers in fp32: the project's default (`auto`, as it chooses on this machine: autoselect.py),
PyTorch eager, torch.compile, ONNX Runtime on the portable and on the fused graphs, OpenVINO through
the project's backend, and OpenVINO used directly on the same portable ONNX files (`openvino-direct`:
its default settings, `compiled(feeds)`, the same denoiser around the calls). In lower precision:
OpenVINO in bf16 (its default on CPUs with bf16 units), and the int8 graphs of `lego-export build
--int8` on ONNX Runtime and OpenVINO (skipped when the engines have none). Each peer lives in its own
worker process (one runtime's spinning thread pool slows the next by up to 10x when they share a
process), and every worker but the one being timed is stopped (SIGSTOP), so no idle pool spins
meanwhile; the coordinator asks them in turn, round after round (the order reversed every other
round), to time a few calls on the same inputs, so that the machine's drift hits every peer alike.

Reports per peer the median, its spread (interquartile range of the calls, and the range of the
per-round medians), its ratio to the fastest, its speed-up over the fastest fp32 peer, GFLOP/s
against this machine's measured matmul rate; and the ratio of the default (`auto`) to the fastest
other fp32 peer with a 95% bootstrap interval over rounds (rounds resampled, both peers' calls of a
round together). The load average before and after is recorded: the machine may be shared.
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

from lego_export.arrays import NumpyArrays  # noqa: E402
from lego_export.runtime.backends import Backend  # noqa: E402

PEERS = (
    "auto",
    "eager",
    "compile",
    "openvino",
    "openvino-direct",
    "ort-portable",
    "ort-fused",
    "openvino-bf16",
    "ort-int8",
    "openvino-int8",
)
DEFAULT = "auto"
BOOTSTRAP = 2000
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
    if peer == "auto":
        from lego_export.runtime.backends import make_backend

        backend = make_backend("auto", Path(engines), manifest, threads=threads)
    elif peer == "openvino-direct":
        backend = DirectOpenVino(Path(engines), manifest, threads)
    elif peer.startswith("openvino"):
        from lego_export.runtime.backends import OpenVinoBackend

        backend = OpenVinoBackend(Path(engines), manifest, threads, precision)
    else:
        from lego_export.runtime.backends import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(Path(engines), manifest, threads=threads, precision=precision)
        if peer == "ort-portable":
            backend.formats = ("onnx",)
    pipe = LegoPipeline(manifest, backend)
    step = lambda: pipe.denoise(x, 1.0, plan, onehot)  # noqa: E731
    step.choice = backend.choice  # type: ignore[attr-defined]
    return step


class DirectOpenVino(Backend):
    """OpenVINO used directly: each engine's .onnx file compiled with OpenVINO's defaults (the thread
    count aside) and called as ``compiled(feeds)``, no checks, under the same denoiser."""

    name = "openvino-direct"

    def __init__(self, folder: Path, manifest, threads: int):
        import openvino as ov

        self.core, self.folder, self.threads = ov.Core(), folder, threads
        self.arrays = NumpyArrays()

    def runner(self, spec):
        config = {"INFERENCE_NUM_THREADS": self.threads} if self.threads else {}
        compiled = self.core.compile_model(str(self.folder / spec.files["onnx"].path), "CPU", config)
        ports = [(t.name, compiled.output(t.name)) for t in spec.outputs]

        class Direct:
            def infer(self, feeds: dict) -> dict:
                result = compiled(feeds)
                return {name: result[port] for name, port in ports}

        return Direct()


def worker(peer: str, engines: str, ckpt: str, batch: int, threads: int) -> None:
    """Answer 'run K' lines with the K call times in milliseconds, one JSON line each."""
    step = make_step(peer, engines, ckpt, batch, threads)
    for _ in range(3):  # warm-up (torch.compile compiles here)
        step()
    print(json.dumps({"ready": peer, "choice": getattr(step, "choice", "")}), flush=True)
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


def start_worker(peer: str, engines: str, ckpt: str, batch: int, threads: int) -> tuple[subprocess.Popen, str] | None:
    """A worker process for one peer, warmed up (its 'ready' line read), and how its backend was
    chosen; None if it did not start."""
    cmd = [sys.executable, __file__, "--worker", peer, "--engines", engines, "--ckpt", ckpt]
    cmd += ["--batch", str(batch), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # one peer warms up at a time: compilation is not timed
    if line:
        return proc, json.loads(line).get("choice", "")
    proc.wait()
    return None


def time_peers(
    workers: dict, skipped: dict, choices: dict, engines, ckpt, batch, threads, rounds, reps
) -> dict[str, list[list[float]]]:
    """Start a worker per available peer (into workers, for the caller to stop; how each backend was
    chosen into choices), then time them in rounds: per peer, per round, milliseconds per call."""
    for peer, why in skipped.items():
        if why:
            print(f"{peer}: skipped ({why})")
            continue
        started = start_worker(peer, engines, ckpt, batch, threads)
        if started is None:
            print(f"{peer}: failed to start")
            skipped[peer] = "failed to start"
            continue
        workers[peer], choices[peer] = started
        os.kill(started[0].pid, signal.SIGSTOP)  # quiet while the next peer warms up
    times: dict[str, list[list[float]]] = {p: [] for p in workers}
    order = list(workers)
    for r in range(rounds):
        for peer in order if r % 2 == 0 else order[::-1]:  # no peer always runs right after the same one
            proc = workers[peer]
            # Only the peer being timed runs: the others are stopped, so no thread pool of theirs can
            # spin on the cores in the meantime.
            os.kill(proc.pid, signal.SIGCONT)
            proc.stdin.write(f"run {reps}\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise click.ClickException(f"peer {peer}'s worker stopped (exit {proc.wait()})")
            times[peer].append(json.loads(line)["ms"])
            os.kill(proc.pid, signal.SIGSTOP)
    return times


def ratio_interval(num: list[list[float]], den: list[list[float]], seed: int = 0) -> tuple[float, float, float]:
    """median(num) / median(den) over all calls, and its 95% bootstrap interval: rounds drawn with
    replacement, each drawn round bringing both peers' calls of that round (drift is shared)."""
    rng = np.random.default_rng(seed)
    ratio = float(np.median(np.concatenate(num)) / np.median(np.concatenate(den)))
    if len(num) < 2:
        return ratio, ratio, ratio
    draws = []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, len(num), len(num))
        top, bottom = (np.median(np.concatenate([rounds[i] for i in pick])) for rounds in (num, den))
        draws.append(top / bottom)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return ratio, float(lo), float(hi)


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


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages ([] where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def default_vs_fastest(rounds_ms: dict[str, list[list[float]]], choices: dict[str, str]) -> dict | None:
    """The default's median time over the fastest other fp32 peer's, with its interval (None when
    the default or every other fp32 peer is missing)."""
    others = {p: float(np.median(np.concatenate(r))) for p, r in rounds_ms.items() if p not in LOW_PRECISION}
    others.pop(DEFAULT, None)
    if DEFAULT not in rounds_ms or not others:
        return None
    best = min(others, key=others.__getitem__)
    ratio, lo, hi = ratio_interval(rounds_ms[DEFAULT], rounds_ms[best])
    choice = choices.get(DEFAULT, "")
    return {
        "runs": choice.split(":", 1)[0],
        "choice": choice,
        "fastest_fp32_peer": best,
        "ratio": ratio,
        "interval": [lo, hi],
        "at_or_below": lo <= 1.0,
    }


def available(peer: str, engines: str) -> str | None:
    """Why a peer cannot run here, or None."""
    import importlib.util

    from lego_export.manifest import Manifest

    if LOW_PRECISION.get(peer) == "int8" and any("onnx-int8" not in e.files for e in Manifest.read(engines).bricks):
        return "no int8 files: build with lego-export build --int8"
    if peer == "openvino-bf16" and importlib.util.find_spec("openvino"):
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        if flags and not any(f in flags.split() for f in ("avx512_bf16", "amx_bf16")):
            return "this CPU has no bf16 units"
    if peer == DEFAULT:
        runtimes = ("onnxruntime", "openvino")
        return (
            None
            if any(importlib.util.find_spec(r) for r in runtimes)
            else "neither onnxruntime nor openvino is installed"
        )
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
    choices: dict[str, str] = {}
    load_before = load_average()
    try:
        rounds_ms = time_peers(workers, skipped, choices, engines, ckpt, batch, threads, rounds, reps)
    finally:
        stop_workers(workers)
    load_after = load_average()
    if not rounds_ms:
        raise click.ClickException("no peer ran: " + "; ".join(f"{p}: {why}" for p, why in skipped.items()))
    peak = matmul_peak_gflops(threads)["peak"]
    times = {p: np.concatenate(r) for p, r in rounds_ms.items()}
    medians = {p: float(np.median(t)) for p, t in times.items()}
    fastest = min(medians.values())
    fastest_fp32 = min(ms for p, ms in medians.items() if p not in LOW_PRECISION)
    rows = []
    for p, ms in sorted(medians.items(), key=lambda kv: kv[1]):
        per_round = [float(np.median(r)) for r in rounds_ms[p]]
        rows.append(
            {
                "peer": p,
                "median_ms": ms,
                "iqr_ms": [float(np.percentile(times[p], 25)), float(np.percentile(times[p], 75))],
                "round_medians_ms": [min(per_round), max(per_round)],
                "p90_ms": float(np.percentile(times[p], 90)),
                "precision": LOW_PRECISION.get(p, "fp32"),
                "vs_fastest": ms / fastest,
                "speedup_vs_fastest_fp32": fastest_fp32 / ms,
                "gflops": gflop / (ms / 1e3),
                "of_peak": gflop / (ms / 1e3) / peak,
            }
        )
    for row in rows:
        row["spread"] = "{:.1f}-{:.1f}".format(*row["iqr_ms"])
        row["round_spread"] = "{:.1f}-{:.1f}".format(*row["round_medians_ms"])
    command = " ".join(["python", "benchmarks/peers.py", *sys.argv[1:]])
    result = {"command": command, "machine": machine(), "batch": batch, "gflop_per_step": gflop, "peak_gflops": peak}
    result["load_average"] = {"before": load_before, "after": load_after}
    result["rows"] = rows
    default = default_vs_fastest(rounds_ms, choices)
    if default is not None:
        result["default"] = default
    columns = [
        ("peer", "peer", ""),
        ("median_ms", "ms / step (median)", ".1f"),
        ("spread", "IQR ms", ""),
        ("round_spread", "round medians ms", ""),
        ("precision", "precision", ""),
        ("vs_fastest", "x fastest", ".2f"),
        ("speedup_vs_fastest_fp32", "speed-up vs fastest fp32", ".2f"),
        ("gflops", "GFLOP/s", ".0f"),
        ("of_peak", "of matmul peak", ".0%"),
    ]
    table = markdown_table(rows, columns)
    load = f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after" if load_before else ""
    text = (
        f"# One full-chain step, batch {batch}, {cfg.img_resolution}x{cfg.img_resolution}\n\n`{command}`\n\n"
        f"{gflop:.2f} GFLOP per step; matmul peak {peak:.0f} GFLOP/s; {rounds} rounds x {reps} calls per peer"
        f"{'; ' + load if load else ''}.\n\n{table}\n"
    )
    if default is not None:
        text += (
            f"\nThe default (`auto`) ran {default['runs']} ({default['choice']}). Against the fastest other fp32 "
            f"peer, {default['fastest_fp32_peer']}: {default['ratio']:.3f}x its median time (95% bootstrap "
            f"interval over rounds {default['interval'][0]:.3f}-{default['interval'][1]:.3f}).\n"
        )
    save_results(out, result, text)


if __name__ == "__main__":
    main()
