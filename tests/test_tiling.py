import numpy as np
import pytest
import torch

from lego_export.errors import LegoError
from lego_export.tiling import canvas_coords, check_canvas, tile, untile


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 1, 16, 48), (3, 2, 48, 16), (1, 4, 32, 64)])
@pytest.mark.parametrize("size", [4, 8, 16])
def test_tile_untile_round_trip(shape, size):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    tiles = tile(x, size)
    b, c, h, w = shape
    assert tiles.shape == (b * (h // size) * (w // size), c, size, size)
    np.testing.assert_array_equal(untile(tiles, b, h, w), x)
    # torch and NumPy cut the same tiles in the same order
    np.testing.assert_array_equal(tile(torch.from_numpy(x), size).numpy(), tiles)


def test_tiles_are_contiguous_blocks_in_row_major_order():
    x = np.arange(16 * 32, dtype=np.float32).reshape(1, 1, 16, 32)
    tiles = tile(x, 8)
    np.testing.assert_array_equal(tiles[1, 0], x[0, 0, 0:8, 8:16])  # second tile: first row, second column
    np.testing.assert_array_equal(tiles[4, 0], x[0, 0, 8:16, 0:8])  # fifth: second row, first column


def test_coords_span_the_whole_canvas():
    coords = canvas_coords(32, 96)
    assert coords.shape == (2, 32, 96)
    assert coords[0, 0, 0] == -1 and coords[0, 0, -1] == 1  # x along the width
    assert coords[1, 0, 0] == -1 and coords[1, -1, 0] == 1  # y along the height


@pytest.mark.parametrize("h,w", [(30, 32), (32, 40), (0, 32)])
def test_canvas_not_a_multiple_is_refused(h, w):
    with pytest.raises(LegoError, match="not a multiple of the largest brick size 32"):
        check_canvas(h, w, 32)
