import numpy as np
import torch

from lego_export.tiling import canvas_coords
from lego_train.crops import CanvasWindows
from tests.test_model import inputs, make


def canvas_window(canvas: torch.Tensor, top: int, left: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference for what CanvasWindows cuts: the size x size window at (top, left) of a (C, H, W)
    canvas, wrapping around its edges, and its coordinate channels (2, size, size), i.e. the values
    the runtime gives those pixels when it rolls the whole canvas by (-top, -left)."""
    _, h, w = canvas.shape
    coords = torch.from_numpy(canvas_coords(h, w))
    window = torch.roll(canvas, (-top, -left), dims=(1, 2))[:, :size, :size]
    return window, torch.roll(coords, (-top, -left), dims=(1, 2))[:, :size, :size]


def test_a_window_is_what_the_bricks_see_of_the_shifted_canvas():
    # pg-tiny's largest brick is 16: a 16 x 16 window at (top, left) with its canvas coordinates
    # must give exactly the estimate the full canvas gives there when rolled by (-top, -left).
    model = make("pg-tiny")
    canvas, sigma, onehot = inputs(model, 1, 32, 48)
    for top, left in [(5, 21), (24, 40)]:  # the second wraps around both edges
        pixels, coords = canvas_window(canvas[0], top, left, 16)
        window = model(pixels[None], sigma, onehot, coords=coords[None])
        full = model(canvas, sigma, onehot, shift=(-top, -left))
        torch.testing.assert_close(window, torch.roll(full, (-top, -left), dims=(2, 3))[..., :16, :16])
        # and not the estimate of a whole 16 x 16 image: the coordinates matter
        assert (window - model(pixels[None], sigma, onehot)).abs().max() > 1e-3


def test_windows_are_wrapped_cuts_of_same_class_canvases_with_their_coordinates():
    # Every pixel value names its source: image id * 64 + y * 8 + x, on 8 x 8 images of 5 classes.
    r, n = 8, 5000
    labels = torch.arange(n) % 5
    yx = torch.arange(r)[:, None] * r + torch.arange(r)
    images = (torch.arange(n)[:, None, None] * r * r + yx).reshape(n, 1, r, r)
    index = torch.arange(300) * 7
    pixels, coords = CanvasWindows(images, labels, max_tiles=3)(index, torch.Generator().manual_seed(0))
    assert pixels.shape == (300, 1, r, r) and coords.shape == (300, 2, r, r) and coords.dtype == torch.float32
    shapes, shared = set(), 0
    for window, c, k in zip(pixels[:, 0], coords, labels[index], strict=True):
        source, y, x = window // (r * r), window % (r * r) // r, window % r
        assert (labels[source] == k).all()  # every pixel from an image of the requested class
        # the coordinate step gives the canvas size; the coordinates give each pixel's canvas position
        height, width = (round(2 / torch.diff(line).max().item()) + 1 for line in (c[1, :, 0], c[0, 0]))
        assert height % r == 0 and width % r == 0
        cy = torch.round((c[1] + 1) / 2 * (height - 1)).long()
        cx = torch.round((c[0] + 1) / 2 * (width - 1)).long()
        for row in range(r):  # coordinates are canvas_coords of that canvas, shifted and wrapped
            expected = canvas_coords(height, width)[:, cy[row, 0], cx[row]]
            np.testing.assert_allclose(c[:, row].numpy(), expected, atol=1e-6)
        # a pixel shows its canvas position within its cell, and one cell is one image
        assert torch.equal(y, cy % r) and torch.equal(x, cx % r)
        cell = (cy // r) * (width // r) + cx // r
        per_cell = [source[cell == i].unique() for i in cell.unique()]
        assert all(len(s) == 1 for s in per_cell)
        shared += len(torch.cat(per_cell).unique()) < len(per_cell)  # two cells, one image
        shapes.add((height // r, width // r))
    assert shared <= 3  # drawing from 1000 images per class, one image rarely fills two cells
    assert shapes == {(a, b) for a in (1, 2, 3) for b in (1, 2, 3)}  # every canvas shape is drawn
