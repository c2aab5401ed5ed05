"""The one outer denoiser against a reference written independently from the LEGO equations, tile by
tile, with explicit loops (slow, obvious, and sharing no code with lego_export/denoiser.py)."""

import math

import numpy as np
import pytest
import torch

from lego_export.arrays import NumpyArrays
from lego_export.denoiser import BrickCache, denoise
from lego_export.errors import LegoError
from tests.test_model import make


def reference(model, x, sigma, onehot, num_bricks, shift, guidance):
    """D(x; sigma) by the equations: brick k at tile (i, j) sees [F_{k-1}, c_in x, X, Y] of that tile."""
    cfg, sd = model.cfg, model.cfg.edm.sigma_data
    b, c, h, w = x.shape
    ys, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
    coords = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])  # channel 0 is x, 1 is y

    def one(x_i, sigma_i, label_row):
        c_in = 1 / math.sqrt(sigma_i**2 + sd**2)
        c_skip = sd**2 / (sigma_i**2 + sd**2)
        c_out = sigma_i * sd / math.sqrt(sigma_i**2 + sd**2)
        cond = model.embedder(torch.tensor([math.log(sigma_i) / 4]), label_row[None])
        canvas = torch.cat([c_in * x_i, coords])
        canvas = torch.roll(canvas, shift, dims=(1, 2))
        feature = None
        for k in range(num_bricks):
            r = cfg.bricks[k].size
            inp = canvas if feature is None else torch.cat([feature, canvas])
            out = torch.zeros(c, h, w)
            for top in range(0, h, r):
                for left in range(0, w, r):
                    tile = inp[:, top : top + r, left : left + r]
                    out[:, top : top + r, left : left + r] = model.bricks[k](tile[None], cond)[0]
            feature = out
        feature = torch.roll(feature, (-shift[0], -shift[1]), dims=(1, 2))
        return c_skip * x_i + c_out * feature

    results = []
    for i in range(b):
        cond_d = one(x[i], float(sigma[i]), onehot[i])
        if guidance == 1.0:
            results.append(cond_d)
        else:
            uncond_d = one(x[i], float(sigma[i]), torch.zeros_like(onehot[i]))
            results.append(uncond_d + guidance * (cond_d - uncond_d))
    return torch.stack(results)


@pytest.mark.parametrize("name", ["pg-tiny", "pr-tiny", "u-tiny"])
@pytest.mark.parametrize(
    "num_bricks,shift,guidance,hw",
    [
        (None, (0, 0), 1.0, (16, 16)),
        (2, (5, 11), 1.0, (16, 32)),
        (None, (3, 0), 2.5, (32, 16)),
        (1, (0, 7), 1.5, (16, 16)),
    ],
)
@torch.no_grad()
def test_model_matches_the_equations(name, num_bricks, shift, guidance, hw):
    model = make(name)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, *hw, generator=g) * 3
    sigma = torch.tensor([0.3, 7.0])
    onehot = torch.nn.functional.one_hot(torch.tensor([1, 4]), model.cfg.num_classes).float()
    k = num_bricks or len(model.cfg.bricks)
    got = model(x, sigma, onehot, num_bricks=num_bricks, shift=shift, guidance=guidance)
    expected = reference(model, x, sigma, onehot, k, shift, guidance)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


@torch.no_grad()
def test_numpy_and_torch_arrays_give_the_same_estimate():
    model = make("pg-tiny")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 16, 32)).astype(np.float32)
    onehot = np.eye(10, dtype=np.float32)[[2, 7]]

    def np_embed(c_noise, label):
        return model.embedder(torch.from_numpy(c_noise), torch.from_numpy(label)).numpy()

    def np_brick(module):
        return lambda tiles, cond: module(torch.from_numpy(tiles), torch.from_numpy(cond)).numpy()

    kwargs = dict(brick_sizes=[b.size for b in model.cfg.bricks], edm=model.cfg.edm, shift=(3, 9), guidance=2.0)
    host = denoise(
        x, 1.3, onehot, embed=np_embed, bricks=[np_brick(b) for b in model.bricks], arrays=NumpyArrays(), **kwargs
    )
    dev = denoise(
        torch.from_numpy(x), 1.3, torch.from_numpy(onehot), embed=model.embedder, bricks=model.bricks, **kwargs
    )
    assert isinstance(host, np.ndarray)
    np.testing.assert_allclose(host, dev.numpy(), atol=1e-6)


def test_bad_prefix_and_canvas_are_refused():
    model = make("pg-tiny")
    x = torch.zeros(1, 1, 16, 16)
    with pytest.raises(LegoError, match="num_bricks must be between 1 and 3"):
        model(x, 1.0, num_bricks=4)
    with pytest.raises(LegoError, match="not a multiple"):
        model(torch.zeros(1, 1, 16, 20), 1.0)


@torch.no_grad()
def test_residual_reuse_restores_the_skipped_correction():
    """After a full-chain evaluation, a shorter chain on the same input with the stored corrections
    gives the full chain's estimate; without a stored correction it is plain skipping."""
    model = make("pg-tiny")
    x, sigma, onehot = torch.randn(2, 1, 16, 32), 0.8, torch.eye(10)[[1, 6]]
    kwargs = dict(embed=model.embedder, bricks=model.bricks, brick_sizes=[4, 8, 16], edm=model.cfg.edm, shift=(3, 5))
    reuse = BrickCache(residual=True)
    plain = denoise(x, sigma, onehot, num_bricks=2, cache=reuse, **kwargs)
    torch.testing.assert_close(plain, denoise(x, sigma, onehot, num_bricks=2, **kwargs))  # nothing stored yet
    full = denoise(x, sigma, onehot, cache=reuse, **kwargs)
    assert set(reuse.suffix) == {1, 2}
    for k in (1, 2):
        torch.testing.assert_close(denoise(x, sigma, onehot, num_bricks=k, cache=reuse, **kwargs), full)
    assert (plain - full).abs().max() > 1e-3  # the correction is not nothing


@torch.no_grad()
def test_residual_reuse_across_the_edge_of_a_guidance_interval():
    """A guided full chain stores corrections of both halves; an unguided skipped step after it
    uses the conditional half, as if the full chain had been unguided (and the other way round,
    the one correction serves both halves)."""
    model = make("pg-tiny")
    x, sigma, onehot = torch.randn(2, 1, 16, 16), 0.8, torch.eye(10)[[1, 6]]
    kwargs = dict(embed=model.embedder, bricks=model.bricks, brick_sizes=[4, 8, 16], edm=model.cfg.edm)
    guided, unguided = BrickCache(residual=True), BrickCache(residual=True)
    denoise(x, sigma, onehot, guidance=2.0, cache=guided, **kwargs)
    full = denoise(x, sigma, onehot, cache=unguided, **kwargs)
    assert guided.suffix[1].shape[0] == 4 and unguided.suffix[1].shape[0] == 2
    torch.testing.assert_close(denoise(x, sigma, onehot, num_bricks=1, cache=guided, **kwargs), full)
    skipped = denoise(x, sigma, onehot, num_bricks=1, guidance=2.0, cache=unguided, **kwargs)
    doubled = BrickCache(residual=True, suffix={k: torch.cat([r, r]) for k, r in unguided.suffix.items()})
    torch.testing.assert_close(skipped, denoise(x, sigma, onehot, num_bricks=1, guidance=2.0, cache=doubled, **kwargs))
