"""Sample a class-per-row grid from a checkpoint with PyTorch: the reference path.

python -m lego_export.preview --ckpt checkpoints/fmnist-pg-s.safetensors --out grid.png
"""

from __future__ import annotations

import time

import click
import numpy as np
import torch

from lego_export.edm import initial_noise, sample
from lego_export.errors import LegoError
from lego_export.images import make_grid, save_image
from lego_export.model import LegoModel


@torch.no_grad()
def sample_images(
    model: LegoModel,
    labels: list[int] | None,
    num: int,
    steps: int = 18,
    heun: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    guidance: float = 1.0,
) -> np.ndarray:
    """Generate num images (N, C, H, W) in [-1, 1] at the training resolution, full chain.

    Image i starts from the same noise as image i of lego-run / LegoPipeline with the same seed."""
    cfg = model.cfg
    shape = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
    noise = torch.from_numpy(initial_noise(seed, range(num), shape)).to(device)
    onehot = None
    if cfg.num_classes and labels is not None:
        onehot = torch.nn.functional.one_hot(torch.as_tensor(labels), cfg.num_classes).float().to(device)

    def denoise(x, sigma, _step):
        return model(x, sigma, onehot, guidance=guidance)

    x = sample(denoise, noise, cfg.edm.sigmas(steps), method="heun" if heun else "euler")
    return x.clamp(-1, 1).float().cpu().numpy()


def class_grid_labels(num_classes: int, per_class: int) -> list[int]:
    """Labels for a grid with one row per class."""
    return [k for k in range(num_classes) for _ in range(per_class)]


@click.command()
@click.option("--ckpt", required=True, help="LEGO checkpoint (.safetensors).")
@click.option("--out", default="grid.png", show_default=True, help="PNG file to write.")
@click.option("--per-class", default=8, show_default=True, help="Images per class row.")
@click.option("--steps", default=18, show_default=True, help="EDM Heun steps.")
@click.option("--seed", default=0, show_default=True)
def main(ckpt: str, out: str, per_class: int, steps: int, seed: int) -> None:
    """Sample a grid (one row per class) from a checkpoint with PyTorch on the CPU."""
    from lego_export.checkpoint import load_model

    try:
        model = load_model(ckpt)
    except LegoError as e:
        raise click.ClickException(str(e)) from None
    classes = model.cfg.num_classes
    labels = class_grid_labels(classes, per_class) if classes else None
    num = classes * per_class if classes else per_class * per_class
    start = time.perf_counter()
    images = sample_images(model, labels, num, steps=steps, seed=seed)
    save_image(make_grid(images, columns=per_class), out)
    click.echo(f"wrote {out}: {num} images, {steps} Heun steps, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
