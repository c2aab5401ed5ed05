"""Cutting a canvas into brick tiles and back, and the coordinate channels.

Written once for NumPy arrays and torch tensors alike (only reshape and a permutation are used),
so the PyTorch model and the torch-free runtime tile identically.
"""

from __future__ import annotations

import numpy as np

from lego_export.errors import LegoError


def _permute(x, axes: tuple[int, ...]):
    return x.permute(*axes) if hasattr(x, "permute") else x.transpose(axes)


def check_canvas(height: int, width: int, multiple: int) -> None:
    """Refuse a canvas that the bricks cannot tile exactly."""
    if height < 1 or width < 1 or height % multiple or width % multiple:
        raise LegoError(
            f"canvas {height}x{width} is not a multiple of the largest brick size {multiple}; "
            f"use sides like {multiple}, {2 * multiple}, {3 * multiple}"
        )


def tile(x, size: int):
    """(B, C, H, W) -> (B * H/size * W/size, C, size, size), tiles in (batch, row, column) order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // size, size, w // size, size)
    return _permute(x, (0, 2, 4, 1, 3, 5)).reshape(-1, c, size, size)


def untile(tiles, batch: int, height: int, width: int):
    """Inverse of :func:`tile`: (B * nh * nw, C, r, r) -> (B, C, H, W)."""
    _, c, r, _ = tiles.shape
    x = tiles.reshape(batch, height // r, width // r, c, r, r)
    return _permute(x, (0, 3, 1, 4, 2, 5)).reshape(batch, c, height, width)


def canvas_coords(height: int, width: int) -> np.ndarray:
    """(2, H, W) float32: x and y of every pixel, normalised to [-1, 1] over the whole canvas.

    These two channels tell a brick where its tile sits, since attention never leaves the tile.
    """
    ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)
    xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx, yy])
