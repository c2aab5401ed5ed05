"""lego-train: train a LEGO diffusion model (EDM, per-brick loss, EMA; torchrun for several processes)."""

from __future__ import annotations

import click
from click.core import ParameterSource

from lego_export.cli_common import CONTEXT, one_line_errors
from lego_export.config import preset_names
from lego_train.loop import TrainConfig, train


@click.command(context_settings=CONTEXT)
@click.option(
    "--data",
    required=True,
    help="'fashion-mnist' (Debian package dataset-fashion-mnist), a folder of IDX files, a folder of "
    "PNG/JPEG images (one sub-folder per class for labels), or an .npz with 'images' (uint8 "
    "N x H x W [x C]) and optional 'labels' (N ints).",
)
@click.option(
    "--preset",
    default="pg-s",
    show_default=True,
    help=f"Model preset: {', '.join(preset_names())}. Channels, resolution and class count come from the data.",
)
@click.option("--batch", default=64, show_default=True, help="Global batch size (split across torchrun processes).")
@click.option(
    "--kimg",
    default=1000.0,
    show_default=True,
    help="Train until this many thousand images have been seen (in total, across resumes).",
)
@click.option("--lr", default=5e-4, show_default=True, help="Adam learning rate, reached after a linear warm-up.")
@click.option(
    "--warmup-kimg", default=10.0, show_default=True, help="Length of the LR warm-up, in thousands of images."
)
@click.option(
    "--lr-decay",
    type=click.Choice(["none", "linear", "cosine"]),
    default=None,
    help="Decay the learning rate after the warm-up, down to --lr-final x --lr at --kimg. A resumed run "
    "keeps its own decay unless this is given; given on a resume, the decay starts where the resume starts.  "
    "[default: none]",
)
@click.option(
    "--decay-kimg",
    type=float,
    default=None,
    help="Decay only over the last this many thousand images before --kimg.  [default: all of this run]",
)
@click.option(
    "--lr-final",
    type=float,
    default=None,
    help="Where the decay ends, as a fraction of --lr (0 to 1).  [default: 0]",
)
@click.option(
    "--ema",
    "ema_halflife_kimg",
    default=20.0,
    show_default=True,
    help="EMA half-life in thousands of images (ramped up early in training).",
)
@click.option("--out", required=True, help="Run folder: model.safetensors, train-state.pt, samples.png, log.jsonl.")
@click.option("--resume", default=None, help="Continue a run: its folder or its train-state.pt.")
@click.option("--seed", default=0, show_default=True, help="Seed for weights, data order and noise.")
@click.option(
    "--cond/--no-cond",
    default=True,
    show_default=True,
    help="Class-conditional (labels dropped 10% of the time, for classifier-free guidance) or not.",
)
@click.option(
    "--canvas-windows",
    default=0.5,
    show_default=True,
    help="Fraction of each batch cut as windows from larger canvases of same-class images (with their "
    "true coordinates), so the model learns to generate at resolutions above the training size. 0 trains "
    "on whole images only.",
)
@click.option(
    "--canvas-max-tiles",
    default=4,
    show_default=True,
    help="Those canvases are 1 to this many training images high and wide (4: up to 4x the training size).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "cpu", "cuda"]),
    help="Where to train; auto picks CUDA when PyTorch sees a GPU.",
)
@click.option("--bf16", is_flag=True, help="bf16 autocast (CUDA only; ignored on the CPU).")
@click.option(
    "--snapshot-kimg",
    default=25.0,
    show_default=True,
    help="Write checkpoint, resumable state and sample grid every this many thousand images.",
)
@click.version_option(package_name="lego-export", prog_name="lego-train")
@one_line_errors(interrupted="interrupted; the last snapshot can be resumed with --resume")
def main(**kwargs) -> None:
    """Train a LEGO diffusion model.

    \b
    One process:   lego-train --data fashion-mnist --preset pg-s --out runs/pg-s
    Several:       torchrun --nproc_per_node 2 -m lego_train.cli --data ... --out ...
    Continue:      lego-train --data fashion-mnist --out runs/pg-s --resume runs/pg-s --kimg 2000
    Cool down:     lego-train ... --resume runs/pg-s --kimg 1600 --lr-decay linear
    """
    given = click.get_current_context().get_parameter_source("preset") is not ParameterSource.DEFAULT
    path = train(TrainConfig(**kwargs, preset_given=given))
    click.echo(f"done: {path}")


if __name__ == "__main__":
    main()
