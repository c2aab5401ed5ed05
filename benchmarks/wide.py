"""Canvases larger than the training size: does each part hold a whole object, and are there seams?

    python benchmarks/wide.py --engines engines/ --num 300 --canvases 32x96,64x64 --out benchmarks/results/wide

For every canvas, with the moving tile grid on and off, images are generated with one class each
and cut into cells of the training size. Reported per setting:
  - cell FID: the cells against the 10k test images, in the feature space of quality.py's
    classifier (a cell holding one whole garment looks like a test image; fragments do not), on
    the same number of cells for every row, with the training-size canvas as the yardstick;
  - cell accuracy: how often a cell is classified as the class the canvas was asked for;
  - seam ratio: mean |difference| between the two pixel columns (rows) that meet at a cell border,
    over the same mean for every pair of neighbouring columns (rows). Above 1, the borders stand
    out; a seam-free picture is near or below 1 (real garments on a black background give 0 there).
Prints the report; with --out PREFIX also writes PREFIX.json and PREFIX.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, one_line_errors, out_option, save_results  # noqa: E402
from quality import features_and_logits, fid, load_classifier, to_input  # noqa: E402

from lego_export.runtime.pipeline import LegoPipeline  # noqa: E402
from lego_export.tiling import tile  # noqa: E402
from lego_train.data import FASHION_MNIST_DIR, load_idx_dir  # noqa: E402


def seam_ratio(images: np.ndarray, size: int) -> float:
    """Mean jump across cell borders over the mean jump between any two neighbouring pixels, per axis
    that has borders (columns for wide canvases, rows for tall ones), averaged over those axes."""
    ratios = []
    for axis in (2, 3):
        if images.shape[axis] > size:
            jumps = np.abs(np.diff(images, axis=axis))  # index j: between pixels j and j + 1
            borders = np.take(jumps, np.arange(size - 1, jumps.shape[axis], size), axis=axis)
            ratios.append(borders.mean() / jumps.mean())
    return float(np.mean(ratios))


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--num", default=300, show_default=True, help="Images per canvas and setting.")
@click.option("--steps", default=18, show_default=True, help="EDM Heun steps.")
@click.option("--canvases", default="32x96,64x64", show_default=True)
@click.option("--batch", default=16, show_default=True)
@click.option(
    "--data", default=str(FASHION_MNIST_DIR), show_default=True, help="Fashion-MNIST IDX folder (its test images)."
)
@out_option("benchmarks/results/wide")
@one_line_errors
def main(engines, num, steps, canvases, batch, data, out) -> None:
    """Cell FID, cell class accuracy and seam ratio of canvases larger than the training size."""
    torch.set_num_threads(2)
    classifier = load_classifier(retrain=False)
    test = load_idx_dir(Path(data), split="test")
    test_feats, _ = features_and_logits(classifier, to_input(test.images))
    pipe = LegoPipeline.from_engines(engines, "onnxruntime")
    size = pipe.resolution

    # The training size first: the same measures on ordinary samples are the yardstick. FID on a few
    # hundred samples is biased upwards, so every row's cell FID uses the same number of cells (num,
    # a fixed random subset) and is comparable with the other rows, not with quality.py's FID.
    settings = [(f"{size}x{size}", False)]
    settings += [(canvas, shift) for canvas in canvases.split(",") for shift in (True, False)]
    rows = []
    for canvas, shift in settings:
        h, w = (int(v) for v in canvas.split("x"))
        start = time.perf_counter()
        result = pipe(num=num, steps=steps, batch=batch, resolution=(h, w), tile_shift=shift, seed=0)
        seconds = time.perf_counter() - start
        parts = tile(result.images, size)  # the cells of each image, in row order
        per_image = parts.shape[0] // num
        feats, logits = features_and_logits(classifier, torch.from_numpy(parts))
        wanted = np.repeat(result.labels, per_image)
        rows.append(
            {
                "canvas": canvas,
                "tile_shift": "on" if shift else "off",
                "images": num,
                "cells": len(parts),
                "cell_fid": fid(feats[np.random.default_rng(0).permutation(len(feats))[:num]], test_feats),
                "cell_accuracy": float((logits.argmax(1) == wanted).mean()),
                "seam_ratio": seam_ratio(result.images, size) if (h, w) != (size, size) else None,
                "s_per_image": seconds / num,
            }
        )
        click.echo(
            f"{canvas} tile shift {rows[-1]['tile_shift']}: cell FID {rows[-1]['cell_fid']:.2f}, cell accuracy "
            f"{rows[-1]['cell_accuracy']:.3f}, seam ratio {rows[-1]['seam_ratio']}",
            err=True,
        )

    results = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "source": pipe.manifest.source,
        "steps": steps,
        "rows": rows,
    }
    text = "\n".join(
        [
            f"# Larger canvases ({results['machine']['cpu']})",
            "",
            f"Command: `{results['command']}`",
            "",
            f"Checkpoint {pipe.manifest.source['checkpoint']} (sha256 {pipe.manifest.source['sha256'][:12]}); "
            f"EDM Heun {steps} steps, no skipping; cells of {size} x {size}.",
            "",
            markdown_table(
                rows,
                [
                    ("canvas", "canvas", "s"),
                    ("tile_shift", "tile shift", "s"),
                    ("cells", "cells", "d"),
                    ("cell_fid", "cell FID", ".2f"),
                    ("cell_accuracy", "cell class acc.", ".3f"),
                    ("seam_ratio", "seam ratio", ".2f"),
                    ("s_per_image", "s/image", ".3f"),
                ],
            ),
        ]
    )
    save_results(out, results, text + "\n")


if __name__ == "__main__":
    main()
