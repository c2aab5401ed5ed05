"""Training windows cut from larger canvases, so the bricks learn canvases they never see whole.

Every brick sees a canvas only through its tiles and two coordinate channels. On a 32 x 96 canvas
the tiles carry coordinates from a 96-pixel-wide range, and with tile-grid shifting they straddle
the borders between neighbouring objects (and, since the runtime rolls the canvas, wrap around
its edge). A model trained only on whole 32 x 32 images has seen none of this.

So part of each batch is replaced by windows of a larger canvas: a grid of rows x cols training
images of the same class, treated as a torus exactly as the runtime's roll treats it. A window of
the training size is cut at a random pixel offset and carries the coordinates its pixels have on
that canvas. The model still trains on 32 x 32 inputs (same cost per image), but every tile it
sees is one it will meet on a larger, shifted canvas; there it then draws a row of whole objects
instead of fragments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lego_export.tiling import canvas_coords, untile


def canvas_window(canvas: Tensor, top: int, left: int, size: int) -> tuple[Tensor, Tensor]:
    """The size x size window at (top, left) of a (C, H, W) canvas, wrapping around its edges.

    Returns the pixels (C, size, size) and their coordinate channels (2, size, size): the values
    the runtime gives those pixels when it rolls the whole canvas by (-top, -left).
    """
    _, h, w = canvas.shape
    coords = torch.from_numpy(canvas_coords(h, w))
    window = torch.roll(canvas, (-top, -left), dims=(1, 2))[:, :size, :size]
    return window, torch.roll(coords, (-top, -left), dims=(1, 2))[:, :size, :size]


class CanvasWindows:
    """Draws windows of random same-class canvases built from a training set.

    images: (N, C, r, r); labels: (N,) or None (then any images share a canvas). Each canvas is
    rows x cols images, rows and cols uniform in 1..max_tiles; its window (r x r) sits at a uniform
    random position, wrapping around the edges.
    """

    def __init__(self, images: Tensor, labels: Tensor | None, max_tiles: int = 4):
        self.images, self.labels, self.max_tiles = images, labels, max_tiles
        self.everything = torch.arange(len(images))
        self.pools = None if labels is None else {int(k): torch.nonzero(labels == k).flatten() for k in labels.unique()}

    def __call__(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Windows (B, C, r, r) in the dtype of images, and their coordinates (B, 2, r, r) float32,
        one per entry of index: each from a canvas of images of the class of images[index[i]]."""
        images = self.images
        b, (c, r) = len(index), images.shape[1:3]
        windows, coords = torch.empty(b, c, r, r, dtype=images.dtype), torch.empty(b, 2, r, r)
        for i, k in enumerate(index.tolist()):
            rows, cols = torch.randint(1, self.max_tiles + 1, (2,), generator=generator).tolist()
            pool = self.pools[int(self.labels[k])] if self.pools is not None else self.everything
            cells = pool[torch.randint(0, len(pool), (rows * cols,), generator=generator)]
            canvas = untile(images[cells], 1, rows * r, cols * r)[0]  # cells in row order
            top = int(torch.randint(0, rows * r, (1,), generator=generator))
            left = int(torch.randint(0, cols * r, (1,), generator=generator))
            windows[i], coords[i] = canvas_window(canvas, top, left, r)
        return windows, coords
