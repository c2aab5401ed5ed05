"""What ONNX Runtime's fusions buy, per brick: portable graph vs fused graph (vs PyTorch eager).

    python benchmarks/fusions.py --engines engines/ --ckpt checkpoints/fmnist-pg-s.safetensors \\
        --out benchmarks/results/fusions

Each brick runs on the tiles of --images images; the variants are timed in interleaved rounds
(one untimed call, then three timed) so that machine noise hits them alike; medians are reported.
Prints the table; with --out PREFIX also writes PREFIX.json and PREFIX.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import one_line_errors, out_option, random_feeds, save_results  # noqa: E402

from lego_export.checkpoint import load_model  # noqa: E402
from lego_export.manifest import Manifest  # noqa: E402
from lego_export.runtime.backends import OnnxRuntimeRunner  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--ckpt", default="checkpoints/fmnist-pg-s.safetensors", show_default=True)
@click.option("--images", default=16, show_default=True, help="Images per call (bricks see their tiles).")
@click.option("--rounds", default=30, show_default=True, type=click.IntRange(1))
@click.option("--threads", default=2, show_default=True)
@out_option("benchmarks/results/fusions")
@one_line_errors
def main(engines: str, ckpt: str, images: int, rounds: int, threads: int, out: str | None) -> None:
    """Each brick: the portable ONNX graph against ONNX Runtime's fused graph, and PyTorch eager."""
    torch.set_num_threads(threads)
    manifest = Manifest.read(engines)
    model = load_model(ckpt)
    res = manifest.model.img_resolution
    rows = []
    for spec in manifest.bricks:
        n = images * (res // manifest.model.bricks[spec.index].size) ** 2
        feeds = random_feeds(spec, n, np.random.default_rng(0))
        tensors = [torch.from_numpy(feeds[t.name]) for t in spec.inputs]
        brick = model.bricks[spec.index]
        variants = {"torch": lambda b=brick, t=tensors: b(*t)}
        for fmt in ("onnx", "onnx-ort"):
            if fmt in spec.files:
                runner = OnnxRuntimeRunner(Path(engines) / spec.files[fmt].path, threads=threads)
                variants[fmt] = lambda r=runner, f=feeds: r.infer(f)
        times: dict[str, list[float]] = {k: [] for k in variants}
        with torch.no_grad():
            for fn in variants.values():  # warm-up
                fn(), fn()
            for _ in range(rounds):
                for k, fn in variants.items():
                    fn()  # absorbs the previous variant's threads winding down
                    times[k].extend(timed(fn) for _ in range(3))
        med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        row = {"brick": spec.name, "N": n, **{f"{k}_ms": round(v, 3) for k, v in med.items()}}
        if "onnx-ort" in med:
            row["fusion_speedup"] = round(med["onnx"] / med["onnx-ort"], 3)
        rows.append(row)
    lines = [f"{'brick':8} {'N':>6} {'torch ms':>10} {'onnx ms':>10} {'fused ms':>10} {'fusion speed-up':>16}"]
    for r in rows:
        lines.append(
            f"{r['brick']:8} {r['N']:>6} {r['torch_ms']:>10.2f} {r.get('onnx_ms', float('nan')):>10.2f} "
            f"{r.get('onnx-ort_ms', float('nan')):>10.2f} {r.get('fusion_speedup', float('nan')):>15.2f}x"
        )
    save_results(out, {"images": images, "rounds": rounds, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
