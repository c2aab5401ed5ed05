"""Command-line entry points of the library: lego-export and lego-run."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def export_main() -> None:
    """Export a LEGO checkpoint as one ONNX / TensorRT engine per brick (not implemented yet)."""


@export_main.command()
def build() -> None:
    """Not implemented yet: the per-brick exporter is the next milestone."""
    raise click.ClickException("lego-export build is not implemented yet")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def run_main() -> None:
    """Sample images from exported engines (not implemented yet; for now use
    `python -m lego_export.preview --ckpt CKPT` for PyTorch sampling)."""
    raise click.ClickException("lego-run is not implemented yet; use python -m lego_export.preview --ckpt CKPT")
