"""The two files `lego-export tune` needs for the shipped model, from the quality benchmark's classifier.

    python benchmarks/feature_files.py

Writes benchmarks/classifier/fmnist-features.onnx (the classifier: its 128-d feature layer, the
space quality.py and frontier.py measure FID in, and its 10 logits, for the tuner's class-accuracy
check) and benchmarks/classifier/fmnist-test.ref.npz (mean
and covariance of the 10k Fashion-MNIST test images' features). Then:

    lego-export tune --engines engines --features benchmarks/classifier/fmnist-features.onnx \\
        --reference benchmarks/classifier/fmnist-test.ref.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import features_and_logits, load_classifier, to_input  # noqa: E402

from lego_export.export.onnx import quiet_exporter  # noqa: E402
from lego_export.fid import FeatureStats  # noqa: E402
from lego_train.data import load_idx_dir  # noqa: E402

FOLDER = Path(__file__).resolve().parent / "classifier"


def main() -> None:
    classifier = load_classifier(False)
    features_path = FOLDER / "fmnist-features.onnx"
    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            classifier,
            (torch.zeros(2, 1, 32, 32),),
            str(features_path),
            input_names=["images"],
            output_names=["features", "logits"],
            dynamic_axes={"images": {0: "N"}, "features": {0: "N"}, "logits": {0: "N"}},
            opset_version=17,
            dynamo=False,
        )
    test = load_idx_dir(Path("/usr/share/datasets/fashion-mnist"), split="test")
    feats, _ = features_and_logits(classifier, to_input(test.images))
    stats = FeatureStats.of(feats)
    np.savez(FOLDER / "fmnist-test.ref.npz", mu=stats.mu, sigma=stats.sigma)
    print(f"wrote {features_path} and {FOLDER / 'fmnist-test.ref.npz'} ({len(feats)} test images)")


if __name__ == "__main__":
    main()
