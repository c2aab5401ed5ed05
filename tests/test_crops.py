import numpy as np
import torch

from lego_export.tiling import canvas_coords
from tests.test_model import inputs, make
from training.crops import CanvasWindows, canvas_window


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


def test_windows_come_from_same_class_canvases_with_their_coordinates():
    labels = torch.arange(200) % 5
    images = (labels * 40 + 10).to(torch.uint8).reshape(-1, 1, 1, 1).expand(200, 1, 8, 8).contiguous()
    windows = CanvasWindows(images, labels, max_tiles=3)
    index = torch.arange(60)
    pixels, coords = windows(index, torch.Generator().manual_seed(0))
    assert pixels.shape == (60, 1, 8, 8) and coords.shape == (60, 2, 8, 8)
    assert torch.equal(pixels, images[index])  # every pixel from an image of the requested class
    widths = set()
    for c in coords:
        for axis, line in ((0, c[0, 0]), (1, c[1, :, 0])):
            assert torch.equal(c[axis], line[None].expand(8, 8) if axis == 0 else line[:, None].expand(8, 8))
            steps = torch.diff(line)
            size = round(2 / steps.max().item()) + 1  # canvas side, from the coordinate step
            assert size in (8, 16, 24)
            widths.add(size)
            # a wrapped linspace over the canvas: steps of 2 / (size - 1), at most one jump back
            assert (steps > 0).sum() >= 6 and (steps < 0).sum() <= 1
            expected = canvas_coords(1, size)[0, 0]
            position = int(np.argmin(np.abs(expected - line[0].item())))
            np.testing.assert_allclose(line.numpy(), np.roll(expected, -position)[:8], atol=1e-6)
    assert widths == {8, 16, 24}  # every canvas size is drawn
