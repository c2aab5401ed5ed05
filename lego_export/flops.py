"""Floating-point operations of one brick call, from the model config alone (no torch)."""

from __future__ import annotations

from lego_export.config import BrickConfig, LegoConfig


def brick_flops_per_tile(brick: BrickConfig, in_channels: int, out_channels: int, cond_dim: int) -> float:
    """Multiply-adds x 2 for one r x r tile through one brick: patch embedding, blocks, final layer."""
    w, p = brick.width, brick.patch
    tokens = brick.grid**2
    hidden = int(w * brick.mlp_ratio)
    patch_embed = tokens * (in_channels * p * p) * w
    per_block = (
        tokens * (3 * w * w + w * w)  # qkv and output projection
        + 2 * tokens * tokens * w  # scores and weighted sum
        + tokens * 2 * w * hidden  # MLP
        + cond_dim * 6 * w  # adaLN modulation
    )
    final = tokens * w * p * p * out_channels + cond_dim * 2 * w
    return 2.0 * (patch_embed + brick.depth * per_block + final)


def model_brick_flops(cfg: LegoConfig) -> list[float]:
    """FLOPs per image at the training resolution, for each brick of the model."""
    flops = []
    for k, brick in enumerate(cfg.bricks):
        tiles = (cfg.img_resolution // brick.size) ** 2
        flops.append(tiles * brick_flops_per_tile(brick, cfg.brick_in_channels(k), cfg.img_channels, cfg.cond_dim))
    return flops
