"""The LEGO denoiser D(x; sigma), written once around any way of calling the bricks.

Everything between brick calls lives here: EDM preconditioning, the coordinate channels, tiling,
chaining of brick outputs, the tile-grid roll and classifier-free guidance. The PyTorch model
(training, export reference) passes its modules; the runtime passes engine runners of any backend;
the arrays are NumPy or torch (arrays.py). A brick call is the only thing a caller supplies:

    embed(c_noise (N,), class_onehot (N, K) or None) -> cond (N, D)
    bricks[k](tiles (N, C_in, r, r), cond (N, D)) -> out (N, C, r, r)

Brick 1 sees [c_in x, coords]; brick k > 1 sees [F_{k-1}, c_in x, coords], where F_{k-1} is the
previous brick's raw output. Every brick gives a complete estimate D_k = c_skip x + c_out F_k, so
the chain may stop after any brick.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lego_export.arrays import arrays_for
from lego_export.edm import EDMConfig
from lego_export.errors import LegoError
from lego_export.tiling import check_canvas, tile, untile

Embed = Callable[[object, object], object]
BrickCall = Callable[[object, object], object]


def denoise(
    x,
    sigma,
    class_onehot=None,
    *,
    embed: Embed,
    bricks: Sequence[BrickCall],
    brick_sizes: Sequence[int],
    edm: EDMConfig,
    num_bricks: int | None = None,
    shift: tuple[int, int] = (0, 0),
    guidance: float = 1.0,
    coords=None,
    return_all: bool = False,
    reuse: dict | None = None,
    arrays=None,
):
    """D(x; sigma) for x (B, C, H, W) from the first num_bricks bricks (default all).

    sigma: a float, or an array of B noise levels (training). class_onehot: (B, K) one-hot rows,
    all-zero rows or None meaning the null label. shift (dy, dx) rolls the canvas before the bricks
    and back after, moving the tile grid. guidance != 1 runs the conditional and null-label halves
    as one batch through the same bricks and returns uncond + guidance (cond - uncond).
    coords (B, 2, H, W) replaces the whole canvas's coordinate channels (training windows).
    return_all gives [D_1, ..., D_k] instead of D_k.
    reuse (residual reuse): a dict the caller keeps across the evaluations of one sample. A full-chain
    evaluation stores, for each shorter prefix j, what the remaining bricks added to the raw output
    (F_K - F_j); an evaluation that stops after j bricks adds back the most recent such correction
    instead of dropping it.
    """
    a = arrays or arrays_for(x)
    b, _, h, w = x.shape
    check_canvas(h, w, int(np.lcm.reduce(list(brick_sizes))))
    k = len(brick_sizes) if num_bricks is None else num_bricks
    if not 1 <= k <= len(brick_sizes):
        raise LegoError(f"num_bricks must be between 1 and {len(brick_sizes)}, got {num_bricks}")

    scalar = isinstance(sigma, int | float | np.floating)
    guided = guidance != 1.0 and class_onehot is not None
    if guided:
        x = a.concat([x, x])
        class_onehot = a.concat([class_onehot, a.zeros_like(class_onehot)])
        sigma = sigma if scalar else a.concat([sigma, sigma])
        coords = None if coords is None else a.concat([coords, coords])
    n = x.shape[0]

    if scalar:
        c_skip, c_out, c_in = edm.scalings(float(sigma))
        c_noise = a.from_numpy(np.full(n, edm.c_noise(float(sigma)), dtype=np.float32))
    else:
        c_noise = a.log(sigma) / 4
        c_skip, c_out, c_in = edm.scalings(sigma.reshape(n, 1, 1, 1))
    cond = embed(c_noise, class_onehot)

    if coords is None:
        coords = a.coords(h, w, n, x)
    x_in = a.concat([c_in * x, coords], axis=1)
    if shift != (0, 0):
        x_in = a.roll(x_in, shift, (2, 3))
    features, feature = [], None
    for size, brick in zip(brick_sizes[:k], bricks[:k], strict=True):
        inp = x_in if feature is None else a.concat([feature, x_in], axis=1)
        tiles = tile(inp, size)
        feature = untile(brick(tiles, a.repeat(cond, tiles.shape[0] // n)), n, h, w)
        features.append(feature)
    full_chain = k == len(brick_sizes)
    if not return_all and not (reuse is not None and full_chain):
        features = features[-1:]
    if shift != (0, 0):
        features = [a.roll(f, (-shift[0], -shift[1]), (2, 3)) for f in features]
    if reuse is not None:  # corrections live on the unrolled canvas: tile-grid shifts differ per step
        if full_chain:
            reuse.update({j + 1: features[-1] - f for j, f in enumerate(features[:-1])})
            features = features if return_all else features[-1:]
        elif k in reuse:
            features[-1] = features[-1] + _rows_for(reuse[k], n, a)

    estimates = [c_skip * x + c_out * a.cast_like(f, x) for f in features]
    if guided:
        estimates = [d[b:] + guidance * (d[:b] - d[b:]) for d in estimates]
    return estimates if return_all else estimates[0]


def _rows_for(correction, n: int, a):
    """A stored correction for a batch of n rows. A guided evaluation stores 2b rows (conditional
    half first) and an unguided one b; the guidance interval can make the last full-chain step
    guided and the skipped steps after it not, or the other way round. An unguided step takes the
    conditional half, which is what an unguided full chain would have stored; a guided one takes
    the correction for both halves (the unconditional one was never computed)."""
    rows = correction.shape[0]
    if rows == 2 * n:
        return correction[:n]
    if 2 * rows == n:
        return a.concat([correction, correction])
    return correction
