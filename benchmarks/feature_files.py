"""The two files `lego-export tune` needs for the shipped model, from the quality benchmark's classifier.

    python benchmarks/feature_files.py --out benchmarks/classifier   # rewrite the committed files
    python benchmarks/feature_files.py --num 500                     # a try: into a temporary folder

Writes OUT/fmnist-features.onnx (the classifier: its 128-d feature layer, the space quality.py and
frontier.py measure FID in, and its 10 logits, for the tuner's class-accuracy check) and
OUT/fmnist-test.ref.npz (mean and covariance of the Fashion-MNIST test images' features). Without
--out, OUT is a new temporary folder (printed), so that a try never rewrites the committed files.
Then:

    lego-export tune --engines engines --features benchmarks/classifier/fmnist-features.onnx \\
        --reference benchmarks/classifier/fmnist-test.ref.npz
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import one_line_errors  # noqa: E402
from quality import features_and_logits, load_classifier, to_input  # noqa: E402

from lego_export.atomic import atomic_write  # noqa: E402
from lego_export.export.onnx import quiet_exporter  # noqa: E402
from lego_export.fid import FeatureStats  # noqa: E402
from lego_train.data import FASHION_MNIST_DIR, load_idx_dir  # noqa: E402

FEATURES, REFERENCE = "fmnist-features.onnx", "fmnist-test.ref.npz"


def export_classifier(classifier) -> bytes:
    """The classifier as ONNX: images (N, 1, 32, 32) in [-1, 1] -> features (N, 128), logits (N, 10)."""
    buffer = io.BytesIO()
    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            classifier,
            (torch.zeros(2, 1, 32, 32),),
            buffer,  # type: ignore[arg-type]  # torch.onnx.export writes to file objects too
            input_names=["images"],
            output_names=["features", "logits"],
            dynamic_axes={"images": {0: "N"}, "features": {0: "N"}, "logits": {0: "N"}},
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


@click.command()
@click.option(
    "--out",
    default=None,
    metavar="DIR",
    help="Folder for both files, e.g. benchmarks/classifier (the committed ones). Default: a new temporary folder.",
)
@click.option(
    "--data",
    default=str(FASHION_MNIST_DIR),
    show_default=True,
    help="Fashion-MNIST IDX folder (t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]).",
)
@click.option("--num", default=None, type=click.IntRange(2), help="Only the first NUM test images (default: all).")
@one_line_errors
def main(out: str | None, data: str, num: int | None) -> None:
    """Export the quality classifier's features to ONNX and the test images' feature statistics."""
    test = load_idx_dir(Path(data), split="test")  # first: a missing data set writes nothing
    classifier = load_classifier(False)
    feats, _ = features_and_logits(classifier, to_input(test.images[:num]))
    stats = FeatureStats.of(feats)
    onnx_bytes = export_classifier(classifier)
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="lego-feature-files-"))
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / FEATURES) as f:  # each file whole or not at all
        f.write(onnx_bytes)
    with atomic_write(folder / REFERENCE) as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma)
    click.echo(f"wrote {folder / FEATURES} and {folder / REFERENCE} ({len(feats)} test images)")


if __name__ == "__main__":
    main()
