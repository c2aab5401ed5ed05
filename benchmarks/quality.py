"""Sample quality of exported LEGO engines: FID / KID in a small classifier's feature space.

    python benchmarks/quality.py --engines engines/ --num 2000 --steps 18 --out benchmarks/results/quality
    python benchmarks/quality.py --quick

No Inception weights are available offline, so the features are those of a small Fashion-MNIST CNN
trained by this script (deterministic seed; weights kept in benchmarks/classifier/). Reported:
  - the real-vs-real floor: FID / KID of train images against the 10k test images;
  - per-class accuracy of generated images for the class they were asked for (does conditioning work?);
  - a sweep of --t-break (fraction of the trajectory without the last brick): FID, KID and seconds per
    image, with the same noise for every point, the shape of the paper's skip figure.
Prints the report; with --out PREFIX also writes PREFIX.json, PREFIX.md and PREFIX.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, one_line_errors, out_option, save_figure, save_results  # noqa: E402

from lego_export.fid import fid  # noqa: E402
from lego_export.runtime.pipeline import LegoPipeline  # noqa: E402
from lego_train.data import FASHION_MNIST_DIR, load_idx_dir  # noqa: E402

CLASSIFIER = Path(__file__).resolve().parent / "classifier" / "fmnist-cnn.safetensors"


class Classifier(nn.Module):
    """Three conv layers and a 128-d fully connected layer (the features), then 10 logits."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 x 16
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 x 8
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4 x 4
            nn.Flatten(),
            nn.Linear(64 * 16, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


def to_input(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8).float() / 127.5 - 1


def train_classifier(epochs: int = 3, seed: int = 0, data_dir: Path = FASHION_MNIST_DIR) -> Classifier:
    data = load_idx_dir(data_dir, split="train")
    torch.manual_seed(seed)
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = to_input(data.images), torch.from_numpy(data.labels)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 256):
            idx = order[i : i + 256]
            loss = nn.functional.cross_entropy(model(x[idx])[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        click.echo(f"classifier epoch {epoch + 1}: loss {loss.item():.3f}", err=True)
    return model.eval()


def load_classifier(retrain: bool, data_dir: Path = FASHION_MNIST_DIR) -> Classifier:
    """The committed classifier (benchmarks/classifier/), or with retrain one trained on data_dir
    and saved there (the committed weights replaced: only when asked)."""
    from safetensors.torch import load_file, save_file

    if CLASSIFIER.is_file() and not retrain:
        model = Classifier()
        model.load_state_dict(load_file(str(CLASSIFIER)))
        return model.eval()
    model = train_classifier(data_dir=data_dir)
    CLASSIFIER.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(CLASSIFIER))
    return model


@torch.inference_mode()
def features_and_logits(model: Classifier, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    feats, logits = zip(*(model(images[i : i + 500]) for i in range(0, len(images), 500)), strict=True)
    return torch.cat(feats).double().numpy(), torch.cat(logits).numpy()


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 50, size: int = 1000, seed: int = 0) -> float:
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel, mean over subsets."""
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    size = min(size, len(a), len(b))
    values = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        m = size
        values.append(
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
        )
    return float(np.mean(values))


def plot(rows: list[dict], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    # FLOPs, not seconds, on the x axis: exact, where one timing on a shared machine is not
    saved = [100 * r["flops_saved"] for r in rows]
    ax.plot(saved, [r["fid"] for r in rows], "o-")
    for x, r in zip(saved, rows, strict=True):
        ax.annotate(f"t-break {r['t_break']:.1f}", (x, r["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(floor, color="gray", ls="--", lw=0.8, label="real vs real")
    ax.set(
        xlabel="brick FLOPs saved (%)",
        ylabel="FID (classifier features)",
        title="skipping the last brick: t-break sweep",
    )
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--num", default=2000, show_default=True, help="Generated images per sweep point.")
@click.option("--steps", default=18, show_default=True, help="EDM Heun steps.")
@click.option("--t-breaks", default="0,0.2,0.3,0.4,0.5,0.7,1", show_default=True)
@click.option("--batch", default=64, show_default=True)
@click.option("--quick", is_flag=True, help="200 images, 3 sweep points.")
@click.option(
    "--retrain-classifier", is_flag=True, help="Train the classifier again and replace benchmarks/classifier/'s."
)
@click.option(
    "--data", default=str(FASHION_MNIST_DIR), show_default=True, help="Fashion-MNIST IDX folder (train and test)."
)
@out_option("benchmarks/results/quality")
@one_line_errors
def main(engines, num, steps, t_breaks, batch, quick, retrain_classifier, data, out) -> None:
    """FID / KID and class accuracy of generated images against a --t-break sweep, and the real floor."""
    torch.set_num_threads(2)
    if quick:
        num, t_breaks = 200, "0,0.3,1"
    train = load_idx_dir(Path(data), split="train")  # first: a missing data set costs nothing
    test = load_idx_dir(Path(data), split="test")
    classifier = load_classifier(retrain_classifier, Path(data))
    test_feats, test_logits = features_and_logits(classifier, to_input(test.images))
    accuracy = float((test_logits.argmax(1) == test.labels).mean())
    rng = np.random.default_rng(0)
    real_idx = rng.choice(len(train.images), min(max(num, 2000), len(train.images)), replace=False)
    real_feats, _ = features_and_logits(classifier, to_input(train.images[real_idx]))
    floor = {"fid": fid(real_feats, test_feats), "kid": kid(real_feats, test_feats), "num": len(real_idx)}
    click.echo(f"classifier test accuracy {accuracy:.3f}; real-vs-real FID {floor['fid']:.3f}", err=True)

    pipe = LegoPipeline.from_engines(engines, "onnxruntime")
    rows = []
    for t_break in (float(t) for t in t_breaks.split(",")):
        start = time.perf_counter()
        result = pipe(num=num, steps=steps, batch=batch, skip="late", t_break=t_break, seed=0)
        seconds = time.perf_counter() - start
        images = torch.from_numpy(result.images)
        feats, logits = features_and_logits(classifier, images)
        per_class = [float((logits.argmax(1)[result.labels == k] == k).mean()) for k in range(pipe.num_classes)]
        rows.append(
            {
                "t_break": t_break,
                "num": num,
                "steps": steps,
                "fid": fid(feats, test_feats),
                "kid": kid(feats, test_feats),
                "s_per_image": seconds / num,
                "flops_saved": result.timing.flops_saved,
                "class_accuracy": float(np.mean(per_class)),
                "per_class_accuracy": per_class,
            }
        )
        click.echo(
            f"t_break {t_break}: FID {rows[-1]['fid']:.3f}, class accuracy {rows[-1]['class_accuracy']:.3f}, "
            f"{seconds / num:.3f} s/image",
            err=True,
        )

    results: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "engines": str(engines),
        "source": pipe.manifest.source,
        "classifier_test_accuracy": accuracy,
        "real_vs_real": floor,
        "sweep": rows,
    }
    full = next((r for r in rows if r["t_break"] == 0), None)
    lines = [
        f"# Quality ({results['machine']['cpu']})",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Checkpoint {pipe.manifest.source['checkpoint']} (sha256 {pipe.manifest.source['sha256'][:12]}); "
        f"classifier test accuracy {accuracy:.3f}; real-vs-real (train vs test) FID {floor['fid']:.3f}, "
        f"KID {floor['kid']:.4f}.",
        "",
        markdown_table(
            rows,
            [
                ("t_break", "t-break", ".1f"),
                ("num", "images", "d"),
                ("steps", "steps", "d"),
                ("fid", "FID", ".3f"),
                ("kid", "KID", ".4f"),
                ("class_accuracy", "class acc.", ".3f"),
                ("flops_saved", "FLOPs saved", ".1%"),
                ("s_per_image", "s/image", ".3f"),
            ],
        ),
    ]
    if full:
        lines += [
            "",
            "FID relative to the full chain: "
            + ", ".join(f"t-break {r['t_break']:.1f}: {r['fid'] / full['fid']:.2f}x" for r in rows),
        ]
    save_results(out, results, "\n".join(lines) + "\n", lambda path: plot(rows, floor["fid"], path))


if __name__ == "__main__":
    main()
