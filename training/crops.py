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

from lego_export.tiling import canvas_coords


class CanvasWindows:
    """Draws windows of random same-class canvases built from a training set.

    images: (N, C, r, r); labels: (N,) or None (then any images share a canvas). Each canvas is
    rows x cols images, rows and cols uniform in 1..max_tiles; its window (r x r) sits at a uniform
    random position, wrapping around the edges, with the coordinates ``canvas_coords`` gives its
    pixels on that canvas. The canvases are never built: each window pixel is gathered straight from
    the image and pixel it shows.
    """

    def __init__(self, images: Tensor, labels: Tensor | None, max_tiles: int = 4):
        self.images, self.max_tiles = images, max_tiles
        # coordinate lines of every canvas side n * r, n = 1..max_tiles, zero-padded to one table
        r = images.shape[-1]
        self.x_lines, self.y_lines = torch.zeros(2, max_tiles, max_tiles * r)
        for n in range(1, max_tiles + 1):
            xy = torch.from_numpy(canvas_coords(n * r, n * r))
            self.x_lines[n - 1, : n * r], self.y_lines[n - 1, : n * r] = xy[0, 0], xy[1, :, 0]
        # the images of each class as one contiguous run of `order`: class k is order[start[k]:][:count[k]]
        labels = torch.zeros(len(images), dtype=torch.long) if labels is None else labels.long()
        self.labels, self.order = labels, torch.argsort(labels, stable=True)
        self.count = torch.bincount(labels)
        self.start = torch.cumsum(self.count, 0) - self.count

    def __call__(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Windows (B, C, r, r) in the dtype of images, and their coordinates (B, 2, r, r) float32,
        one per entry of index: each from a canvas of images of the class of images[index[i]]."""
        b, r, m = len(index), self.images.shape[-1], self.max_tiles
        rows, cols = torch.randint(1, m + 1, (2, b), generator=generator)
        height, width = rows * r, cols * r
        top = (torch.rand(b, generator=generator) * height).long()
        left = (torch.rand(b, generator=generator) * width).long()
        # canvas pixel of every window row / column, wrapping around the canvas
        ys = (top[:, None] + torch.arange(r)) % height[:, None]  # (B, r)
        xs = (left[:, None] + torch.arange(r)) % width[:, None]
        # the rows x cols cells of each canvas (m x m drawn, the first rows * cols used), same class
        k = self.labels[index]
        draw = (torch.rand(b, m * m, generator=generator) * self.count[k][:, None]).long()
        cells = self.order[self.start[k][:, None] + draw]  # (B, m * m) image indices
        cell = (ys // r)[:, :, None] * cols[:, None, None] + (xs // r)[:, None, :]  # (B, r, r)
        source = torch.gather(cells, 1, cell.flatten(1)).view(b, r, r)
        windows = self.images[source, :, (ys % r)[:, :, None], (xs % r)[:, None, :]]  # (B, r, r, C)
        x = self.x_lines[(cols - 1)[:, None], xs]  # (B, r): the coordinates of those canvas columns
        y = self.y_lines[(rows - 1)[:, None], ys]
        coords = torch.stack([x[:, None, :].expand(b, r, r), y[:, :, None].expand(b, r, r)], 1)
        return windows.permute(0, 3, 1, 2).contiguous(), coords
