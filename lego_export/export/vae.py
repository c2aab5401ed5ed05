"""The decoder engine of a latent model: a diffusers AutoencoderKL's decoder, exported to ONNX.

The LEGO model samples latents z (the autoencoder's latents times a scale, 0.18215 for the Stable
Diffusion VAE); the decoder engine maps them to images: x = decode(z / scale), in [-1, 1]. Unlike
the bricks it is one graph over the whole latent canvas, with dynamic batch and latent size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lego_export import contract
from lego_export.errors import LegoError
from lego_export.manifest import EngineSpec, LatentSpace

# (N, latent height, latent width as multiples of the training size) the decoder is verified at:
# square and not, at the model's resolution and above.
VERIFY_SHAPES = ((1, 1, 1), (3, 1, 1.5), (1, 2, 2))


class DecoderGraph(nn.Module):
    """latents (N, C, H, W), scaled as the model samples them -> images (N, 3, f H, f W) in [-1, 1]."""

    vae: Any  # a diffusers AutoencoderKL (diffusers is optional: not imported for its type)

    def __init__(self, vae: nn.Module, scale: float):
        super().__init__()
        self.vae, self.scale = vae, scale

    def forward(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.scale).sample


def load_vae(folder: str | Path, latent_scale: float | None, latent_channels: int) -> tuple[nn.Module, LatentSpace]:
    """A local diffusers AutoencoderKL folder (config.json + weights) and the latent space it defines.

    Nothing is downloaded; the scale comes from --latent-scale or the folder's config (scaling_factor).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise LegoError(f"--vae {folder}: not a diffusers model folder (no config.json)")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise LegoError("--vae needs the diffusers package: pip install 'lego-export[latent]'") from None
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=None)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise LegoError(f"--vae {folder}: cannot load an AutoencoderKL ({str(e).splitlines()[0]})") from None
    vae = vae.float().eval()
    if vae.config.latent_channels != latent_channels:
        raise LegoError(
            f"--vae {folder} has {vae.config.latent_channels} latent channels; the model samples {latent_channels}"
        )
    scale = latent_scale if latent_scale is not None else float(getattr(vae.config, "scaling_factor", 0) or 0)
    if latent_scale is not None and not (math.isfinite(scale) and scale > 0):
        raise LegoError(f"--latent-scale must be a finite positive number, got {latent_scale}")
    if not (math.isfinite(scale) and scale > 0):
        raise LegoError(f"--vae {folder}: no scaling_factor in its config; give --latent-scale (SD VAE: 0.18215)")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae, LatentSpace(scale, factor, int(vae.config.out_channels))


def decoder_spec(latent_channels: int, latent: LatentSpace, max_batch: int, opt_batch: int) -> EngineSpec:
    inputs, outputs = contract.decoder_tensors(latent_channels, latent.image_channels, latent.factor)
    batch = {"min": 1, "opt": min(opt_batch, max_batch), "max": max_batch}
    return EngineSpec("decoder", "decoder", None, inputs, outputs, batch, {})


def export_decoder(graph: DecoderGraph, spec: EngineSpec, resolution: int, path: Path, opset: int) -> None:
    """Trace with dynamic batch and latent size (the TorchScript exporter; checked at several shapes)."""
    from lego_export.export.onnx import quiet_exporter

    example = torch.randn(contract.resolve_shape(spec.inputs[0].shape, 2, resolution, resolution))
    axes = {contract.LATENTS: {0: "N", 2: "H", 3: "W"}, contract.IMAGES: {0: "N", 2: "fH", 3: "fW"}}
    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[contract.LATENTS],
            output_names=[contract.IMAGES],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )


@torch.no_grad()
def measure_decoder_error(graph: DecoderGraph, runner, spec: EngineSpec, resolution: int, seed: int = 0) -> dict:
    """Engine against diffusers on unit-variance latents (scaled latents are about unit variance), at
    N = 1 and 3 and several latent sizes, non-square included."""
    from lego_export.export.verify import error_record

    gen = torch.Generator().manual_seed(seed)
    shapes = [(n, int(resolution * fh), int(resolution * fw)) for n, fh, fw in VERIFY_SHAPES]

    def pairs():
        for n, h, w in shapes:
            latents = torch.randn(contract.resolve_shape(spec.inputs[0].shape, n, h, w), generator=gen)
            yield runner.infer({contract.LATENTS: latents.numpy()})[contract.IMAGES], graph(latents).numpy()

    inputs = "unit Gaussian latents, N x H x W = " + ", ".join("x".join(map(str, s)) for s in shapes)
    return error_record(pairs(), "fp32", inputs, [1, 3])
