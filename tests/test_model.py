import pytest
import torch

from lego_export.config import PRESETS, get_preset
from lego_export.errors import LegoError
from lego_export.model import LegoModel

TINY = ["pg-tiny", "pr-tiny", "u-tiny", "dit-tiny"]


def make(name, seed=0):
    torch.manual_seed(seed)
    model = LegoModel(get_preset(name)).eval()
    # Zero-initialised outputs would make every comparison trivially pass: randomise all weights.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def inputs(model, b, h, w):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, model.cfg.img_channels, h, w, generator=g)
    sigma = torch.rand(b, generator=g) * 5 + 0.1
    onehot = torch.nn.functional.one_hot(torch.arange(b) % model.cfg.num_classes, model.cfg.num_classes).float()
    return x, sigma, onehot


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("hw", [(16, 16), (16, 48), (32, 16)])
def test_every_brick_returns_a_full_canvas(name, hw):
    model = make(name)
    x, sigma, onehot = inputs(model, 2, *hw)
    outs = model(x, sigma, onehot, return_all=True)
    assert len(outs) == len(model.cfg.bricks)
    for d in outs:
        assert d.shape == x.shape and torch.isfinite(d).all()
    # bricks differ: later bricks refine, they do not copy
    assert not torch.allclose(outs[0], outs[-1]) or len(outs) == 1


@pytest.mark.parametrize("name", TINY)
def test_stopping_after_brick_k_equals_first_k_outputs(name):
    model = make(name)
    x, sigma, onehot = inputs(model, 3, 16, 32)
    full = model(x, sigma, onehot, return_all=True)
    for k in range(1, len(full) + 1):
        torch.testing.assert_close(model(x, sigma, onehot, num_bricks=k), full[k - 1], rtol=0, atol=0)
        prefix = model(x, sigma, onehot, num_bricks=k, return_all=True)
        assert len(prefix) == k


def test_bricks_are_chained_on_the_previous_output():
    model = make("pg-tiny")
    x, sigma, onehot = inputs(model, 2, 16, 16)
    base = model(x, sigma, onehot, return_all=True)
    with torch.no_grad():
        model.bricks[0].final.linear.bias.add_(1.0)  # change only brick 1's output
    changed = model(x, sigma, onehot, return_all=True)
    assert not torch.allclose(base[1], changed[1])  # brick 2 sees brick 1's output


def test_tiles_see_only_their_own_pixels_and_coordinates():
    # PG tiny bricks are 4 / 8 / 16: at 16 x 32 the two 16 x 16 halves never exchange information,
    # so changing the right half leaves the left half of every estimate unchanged.
    model = make("pg-tiny")
    x, sigma, onehot = inputs(model, 1, 16, 32)
    y = x.clone()
    y[..., 16:] += 1
    a, b = model(x, sigma, onehot), model(y, sigma, onehot)
    torch.testing.assert_close(a[..., :16], b[..., :16])
    assert not torch.allclose(a[..., 16:], b[..., 16:])


def test_tile_shift_moves_the_grid_and_rolls_back():
    model = make("pg-tiny")
    x, sigma, onehot = inputs(model, 2, 32, 32)
    base = model(x, sigma, onehot)
    # A shift by whole tiles of every brick regroups the same pixels with the same coordinates.
    torch.testing.assert_close(model(x, sigma, onehot, shift=(16, 16)), base, rtol=1e-5, atol=1e-5)
    shifted = model(x, sigma, onehot, shift=(3, 5))
    assert shifted.shape == base.shape
    assert (shifted - base).abs().max() > 1e-3


def test_class_label_and_null_label_change_the_output():
    model = make("pg-tiny")
    x, sigma, onehot = inputs(model, 2, 16, 16)
    cond = model(x, sigma, onehot)
    assert not torch.allclose(cond, model(x, sigma, None))
    assert not torch.allclose(cond, model(x, sigma, onehot.roll(1, dims=1)))
    torch.testing.assert_close(model(x, sigma, None), model(x, sigma, torch.zeros_like(onehot)))


def test_fresh_model_outputs_the_skip_term_only():
    # adaLN-Zero and the zero final layer: at init, F_k = 0 so D_k = c_skip * x.
    model = LegoModel(get_preset("pg-tiny"))
    x, sigma, onehot = inputs(model, 2, 16, 16)
    c_skip = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(model(x, sigma, onehot), c_skip.reshape(-1, 1, 1, 1) * x)


def test_bad_canvas_and_brick_count_are_one_line_errors():
    model = make("pg-tiny")
    x, sigma, onehot = inputs(model, 1, 16, 24)
    with pytest.raises(LegoError, match="canvas 16x24 is not a multiple of the largest brick size 16"):
        model(x, sigma, onehot)
    x, sigma, onehot = inputs(model, 1, 16, 16)
    with pytest.raises(LegoError, match="num_bricks must be between 1 and 3"):
        model(x, sigma, onehot, num_bricks=4)


def test_unknown_preset():
    with pytest.raises(LegoError, match="unknown preset 'pg-huge'"):
        get_preset("pg-huge")


def test_paper_presets_have_the_published_geometry():
    xl = PRESETS["pg-paper-xl"]
    assert [b.size for b in xl.bricks] == [4, 16, 32]
    assert [b.patch for b in xl.bricks] == [2, 8, 2]
    assert [b.depth for b in xl.bricks] == [4, 12, 14]
    assert {b.width for b in xl.bricks} == {1152}
    assert [b.size for b in PRESETS["u-paper-l"].bricks] == [32, 16, 4, 16, 32]
    assert [b.depth for b in PRESETS["dit-paper-xl"].bricks] == [28]
