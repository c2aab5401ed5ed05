"""The engine contract: the tensors every engine takes and returns, named once.

The exporter traces with these names and records these shapes in the manifest, the verifier feeds
them, and the runtime's brick calls use them. "N" is the dynamic batch; only a latent model's decoder
also takes any latent size (H, W).

    embedder:  c_noise (N,), class_onehot (N, K) [conditional models only]  ->  cond (N, D)
    brick k:   tiles (N, C_in_k, r_k, r_k), cond (N, D)                       ->  out (N, C, r_k, r_k)
    decoder:   latents (N, C, H, W) [latent models only]                      ->  images (N, 3, f H, f W)

C_in_k is [previous brick's output (C, k > 0), c_in x (C), x and y coordinates (2)], in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

from lego_export.config import LegoConfig


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: list[int | str]  # "N" marks the dynamic batch; "H", "W" (or "8H", ...) a decoder's latent size


C_NOISE, CLASS_ONEHOT, COND = "c_noise", "class_onehot", "cond"
TILES, OUT = "tiles", "out"
LATENTS, IMAGES = "latents", "images"


def embedder_tensors(cfg: LegoConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the conditioning embedder engine."""
    inputs = [TensorSpec(C_NOISE, "float32", ["N"])]
    if cfg.num_classes:
        inputs.append(TensorSpec(CLASS_ONEHOT, "float32", ["N", cfg.num_classes]))
    return inputs, [TensorSpec(COND, "float32", ["N", cfg.cond_dim])]


def brick_tensors(cfg: LegoConfig, k: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of brick k's engine."""
    r = cfg.bricks[k].size
    inputs = [
        TensorSpec(TILES, "float32", ["N", cfg.brick_in_channels(k), r, r]),
        TensorSpec(COND, "float32", ["N", cfg.cond_dim]),
    ]
    return inputs, [TensorSpec(OUT, "float32", ["N", cfg.img_channels, r, r])]


def decoder_tensors(
    latent_channels: int, image_channels: int, factor: int
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of a latent model's decoder: any batch and latent size, images factor x larger."""
    inputs = [TensorSpec(LATENTS, "float32", ["N", latent_channels, "H", "W"])]
    return inputs, [TensorSpec(IMAGES, "float32", ["N", image_channels, f"{factor}H", f"{factor}W"])]


def resolve_shape(shape: list[int | str], n: int, height: int = 0, width: int = 0) -> tuple[int, ...]:
    """A contract shape with its symbolic dimensions ("N", "H", "8W", ...) replaced by sizes."""
    sizes = {"N": n, "H": height, "W": width}
    return tuple(d if isinstance(d, int) else int(d[:-1] or 1) * sizes[d[-1]] for d in shape)
