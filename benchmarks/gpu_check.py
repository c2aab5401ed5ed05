"""GPU latency check: PyTorch CUDA fp32 / fp16 / bf16 / CUDA graphs, full and skipped chain,
plus ONNX Runtime on this machine's CPU cores for scale. Run through benchmarks/gpu_check.sh.

Needs torch (with CUDA), numpy and click; onnx and onnxruntime for the ONNX Runtime row. Weights come from the
checkpoint when safetensors is installed, else the model is randomly initialised from the
checkpoint's config (latency does not depend on weight values; the output says which).

    benchmarks/gpu_check.sh [CHECKPOINT] [JSON_OUT]              # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --quick CHECKPOINT   # the same script on this CPU
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import one_line_errors, write_json  # noqa: E402

from lego_export.checkpoint import read_config  # noqa: E402
from lego_export.model import LegoModel  # noqa: E402

HEUN_EVALS = 99  # a 50-step Heun sample makes 99 denoiser evaluations


def load(ckpt: str) -> tuple[LegoModel, str]:
    try:
        from lego_export.checkpoint import load_model

        return load_model(ckpt), "checkpoint weights"
    except ImportError:
        return LegoModel(read_config(ckpt)).eval(), "random weights (safetensors not installed)"


def gpu_time(fn, reps: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of fn on the GPU (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def cuda_rows(model: LegoModel, batches, canvases) -> list[dict]:
    model = model.cuda()
    k_all = len(model.bricks)
    rows = []
    for h, w in canvases:
        for b in batches:
            x = torch.randn(b, model.cfg.img_channels, h, w, device="cuda")
            onehot = torch.nn.functional.one_hot(
                torch.arange(b, device="cuda") % max(model.cfg.num_classes, 1), max(model.cfg.num_classes, 1)
            ).float()
            onehot = onehot if model.cfg.num_classes else None
            sigma = torch.ones(b, device="cuda")
            for k, chain in ((k_all, "full"), (k_all - 1, "skip last")):
                if k < 1:
                    continue
                for mode in ("fp32", "fp16", "bf16", "fp16+graph"):
                    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp16+graph": torch.float16}.get(mode)

                    def step(k=k, dtype=dtype, x=x, sigma=sigma, onehot=onehot):
                        with (
                            torch.inference_mode(),
                            torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None),
                        ):
                            return model(x, sigma, onehot, num_bricks=k)

                    fn = step
                    if mode.endswith("graph"):
                        fn = _graphed(step)
                    ms = gpu_time(fn)
                    rows.append(
                        {
                            "device": "cuda",
                            "mode": mode,
                            "canvas": f"{h}x{w}",
                            "batch": b,
                            "chain": chain,
                            "ms_per_step": ms,
                            "images_per_s": b / (ms * HEUN_EVALS / 1e3),
                        }
                    )
    return rows


def _graphed(step):
    """Capture one denoiser evaluation in a CUDA graph; replaying it skips kernel-launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def ort_cpu_rows(model: LegoModel, batches, ckpt: str) -> list[dict]:
    """The same model exported to ONNX (no clean-up) and run by the runtime on the CPU."""
    try:
        import onnxruntime  # noqa: F401

        from lego_export.export.build import Manifest, engine_jobs
        from lego_export.export.onnx import export_module
        from lego_export.manifest import EngineFile, sha256_file
        from lego_export.plan import StepPlan
        from lego_export.runtime.pipeline import LegoPipeline
    except ImportError as e:
        print(f"ONNX Runtime row skipped: {e}")
        return []
    model = model.float().cpu()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jobs = engine_jobs(model, max(batches), 16)
        for job in jobs:
            path = folder / f"{job.spec.name}.onnx"
            example = tuple(torch.randn([2 if d == "N" else int(d) for d in t.shape]) for t in job.spec.inputs)
            export_module(
                job.module, example, [t.name for t in job.spec.inputs], [t.name for t in job.spec.outputs], path
            )
            job.spec.files["onnx"] = EngineFile(path.name, sha256_file(path), path.stat().st_size, "fp32")
        manifest = Manifest(
            model=model.cfg,
            source={"checkpoint": Path(ckpt).name, "sha256": sha256_file(Path(ckpt))},
            toolchain={},
            engines=[j.spec for j in jobs],
        )
        manifest.write(folder)
        pipe = LegoPipeline.from_engines(folder, "onnxruntime")
        res = model.cfg.img_resolution
        for b in batches:
            x = np.random.default_rng(0).standard_normal((b, model.cfg.img_channels, res, res)).astype(np.float32)
            onehot = np.eye(model.cfg.num_classes, dtype=np.float32)[np.arange(b) % model.cfg.num_classes]
            for k, chain in ((len(jobs) - 1, "full"), (len(jobs) - 2, "skip last")):
                plan = StepPlan(0, 1.0, k, (0, 0))
                pipe.denoise(x, 1.0, plan, onehot)
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    pipe.denoise(x, 1.0, plan, onehot)
                    times.append((time.perf_counter() - start) * 1e3)
                rows.append(cpu_row("onnxruntime fp32", f"{res}x{res}", b, chain, times))
    return rows


def cpu_row(mode: str, canvas: str, batch: int, chain: str, times_ms: list[float]) -> dict:
    """One CPU row: the median step time and the images/s of a Heun 50 trajectory at that pace."""
    ms = float(np.median(times_ms))
    return {"device": "cpu", "mode": mode, "canvas": canvas, "batch": batch, "chain": chain,
            "ms_per_step": ms, "images_per_s": batch / (ms * HEUN_EVALS / 1e3)}  # fmt: skip


def cpu_rows(model: LegoModel, batches, canvases, reps: int) -> list[dict]:
    """PyTorch eager fp32 on the CPU: the same steps as cuda_rows' fp32 rows, for a machine without a GPU."""
    k_all = len(model.bricks)
    classes = max(model.cfg.num_classes, 1)
    rows = []
    for h, w in canvases:
        for b in batches:
            x = torch.randn(b, model.cfg.img_channels, h, w)
            onehot = torch.nn.functional.one_hot(torch.arange(b) % classes, classes).float()
            onehot = onehot if model.cfg.num_classes else None
            sigma = torch.ones(b)
            for k, chain in ((k_all, "full"), (k_all - 1, "skip last")):
                if k < 1:
                    continue
                times = []
                with torch.inference_mode():
                    model(x, sigma, onehot, num_bricks=k)  # warm-up
                    for _ in range(reps):
                        start = time.perf_counter()
                        model(x, sigma, onehot, num_bricks=k)
                        times.append((time.perf_counter() - start) * 1e3)
                rows.append(cpu_row("torch fp32", f"{h}x{w}", b, chain, times))
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'device':6} {'mode':18} {'canvas':8} {'batch':>5} {'chain':10} {'ms/step':>9} {'images/s*':>10}"]
    for r in rows:
        lines.append(
            f"{r['device']:6} {r['mode']:18} {r['canvas']:8} {r['batch']:>5} {r['chain']:10} "
            f"{r['ms_per_step']:>9.3f} {r['images_per_s']:>10.1f}"
        )
    lines.append(f"* images/s of a 50-step Heun sample ({HEUN_EVALS} evaluations) at that batch")
    return "\n".join(lines)


@click.command()
@click.argument("ckpt", required=False, default=str(ROOT / "checkpoints" / "fmnist-pg-s.safetensors"))
@click.argument("json_out", required=False, default=None)
@click.option(
    "--device",
    type=click.Choice(["cuda", "cpu"]),
    default="cuda",
    show_default=True,
    help="cpu: PyTorch eager fp32 and ONNX Runtime on this machine's cores (a try of the script without a GPU).",
)
@click.option("--quick", is_flag=True, help="Batch 1 at the training canvas only, few repetitions.")
@one_line_errors
def main(ckpt: str, json_out: str | None, device: str, quick: bool) -> None:
    """GPU latency check of CKPT (default: the shipped model); writes JSON_OUT only when given."""
    res_batches = [1] if quick else [1, 64]
    if device == "cuda" and not torch.cuda.is_available():
        click.echo("gpu_check: no CUDA GPU visible to PyTorch; nothing to measure here (run it on a GPU machine)")
        return
    model, weights = load(ckpt)
    res = model.cfg.img_resolution
    canvases = [(res, res)] if quick else [(res, res), (2 * res, 2 * res)]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    click.echo(f"gpu_check: {name} (torch {torch.__version__}), model {model.cfg.name} with {weights}")
    if device == "cuda":
        rows = cuda_rows(model, res_batches, canvases)
    else:
        rows = cpu_rows(model, res_batches, canvases, reps=3 if quick else 10)
    rows += ort_cpu_rows(model, res_batches, ckpt)
    click.echo(table(rows))
    if json_out:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, {"device": name, "torch": torch.__version__, "weights": weights, "rows": rows})
        click.echo(f"wrote {out}", err=True)


if __name__ == "__main__":
    main()
