"""Floating-point operations of one brick call, from the model config alone (no torch)."""

from __future__ import annotations


def brick_flops_per_tile(brick: dict, in_channels: int, out_channels: int, cond_dim: int) -> float:
    """Multiply-adds x 2 for one r x r tile through one brick: patch embedding, blocks, final layer."""
    w, p = brick["width"], brick["patch"]
    tokens = (brick["size"] // p) ** 2
    hidden = int(w * brick.get("mlp_ratio", 4.0))
    patch_embed = tokens * (in_channels * p * p) * w
    per_block = (
        tokens * (3 * w * w + w * w)  # qkv and output projection
        + 2 * tokens * tokens * w  # scores and weighted sum
        + tokens * 2 * w * hidden  # MLP
        + cond_dim * 6 * w  # adaLN modulation
    )
    final = tokens * w * p * p * out_channels + cond_dim * 2 * w
    return 2.0 * (patch_embed + brick["depth"] * per_block + final)


def model_brick_flops(model: dict) -> list[float]:
    """FLOPs per image at the training resolution, for each brick of a manifest's model dict."""
    c, res, d = model["img_channels"], model["img_resolution"], model["cond_dim"]
    flops = []
    for k, brick in enumerate(model["bricks"]):
        in_channels = (c if k else 0) + c + 2
        tiles = (res // brick["size"]) ** 2
        flops.append(tiles * brick_flops_per_tile(brick, in_channels, c, d))
    return flops
