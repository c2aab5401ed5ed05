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

Brick caching: what brick k adds at an evaluation, its correction C_k = F_k - F_{k-1} (C_0 = F_0), is an
image-space array that changes slowly between steps at some noise levels and for some images. With a
:class:`BrickCache` (one per batch, kept by the caller across its evaluations), a brick may take its
cached correction instead of running: the last one (reuse) or one extrapolated from its last runs in
log sigma (forecast), per image. A brick that does not run hands F_{k-1} + C_k on to the bricks after
it, so any brick may be cached, brick 0 too. A per-image gate runs the bricks after brick 0 only for
the images whose brick-0 estimate moved enough since their last full evaluation; those rows go to
the engines as one smaller call. A guided evaluation may run the conditional half only and reuse
the last difference between the halves (guidance cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lego_export.arrays import arrays_for
from lego_export.edm import EDMConfig
from lego_export.errors import LegoError
from lego_export.tiling import check_canvas, tile, untile

Array = Any  # a NumPy array or a torch tensor (arrays.py)
Embed = Callable[[Array, Array], Array]
BrickCall = Callable[[Array, Array], Array]


@dataclass
class BrickHistory:
    """One brick's corrections at its last runs, per row, newest first (unrolled canvas), with the
    log sigma of each; rows are a batch's images, then their null-label halves."""

    values: list  # depth arrays (rows, C, H, W)
    log_sigma: np.ndarray  # (depth, rows)
    count: np.ndarray  # (rows,) corrections held per row

    @classmethod
    def empty(cls, like, rows: int, depth: int, a) -> BrickHistory:
        blank = a.repeat(a.zeros_like(like[:1]), rows)
        values = [blank] + [a.zeros_like(blank) for _ in range(depth - 1)]
        return cls(values, np.zeros((depth, rows)), np.zeros(rows, dtype=np.int64))

    def push(self, rows: np.ndarray, value, log_sigma: float, a) -> None:
        """Store this evaluation's correction of `rows`. A row already holding one at this sigma
        (Heun's second evaluation and the next step share a sigma) has it replaced: extrapolating
        needs distinct nodes."""
        same = (self.count[rows] > 0) & np.isclose(self.log_sigma[0, rows], log_sigma, rtol=0, atol=1e-9)
        new = rows[~same]
        if len(new):
            shifted = _index(new, a)
            for j in range(len(self.values) - 1, 0, -1):
                self.values[j][shifted] = self.values[j - 1][shifted]
                self.log_sigma[j, new] = self.log_sigma[j - 1, new]
            self.count[new] = np.minimum(self.count[new] + 1, len(self.values))
        self.values[0][_index(rows, a)] = value
        self.log_sigma[0, rows] = log_sigma

    def sources(self, rows: np.ndarray, images: int) -> np.ndarray:
        """The row whose corrections serve each row: its own, or for a null-label row that never ran,
        its image's conditional row (what an unguided evaluation stores)."""
        src = rows.copy()
        empty = (self.count[src] == 0) & (src >= images)
        src[empty] -= images
        return src

    def forecast(self, rows: np.ndarray, log_sigma: float, order: int, images: int, a):
        """The correction of `rows` at log_sigma: Lagrange extrapolation in log sigma through each row's
        last min(order, held - 1) + 1 corrections (order 0: the last one). Returns it and, per row,
        the number of corrections it used (1: reused)."""
        src = self.sources(rows, images)
        used = np.minimum(order, self.count[src] - 1) + 1
        if (used == 1).all():
            return self.values[0][_index(src, a)], used
        weights = np.zeros((len(src), len(self.values)))
        for i, (row, m) in enumerate(zip(src, used, strict=True)):
            weights[i, :m] = lagrange_weights(self.log_sigma[:m, row], log_sigma)
        idx = _index(src, a)
        out = None
        for j in range(int(used.max())):
            w = a.cast_like(a.from_numpy(weights[:, j].astype(np.float32).reshape(-1, 1, 1, 1)), self.values[j])
            term = w * self.values[j][idx]
            out = term if out is None else out + term
        return out, used


def lagrange_weights(nodes: np.ndarray, t: float) -> np.ndarray:
    """w_j with sum_j w_j f(nodes_j) = p(t), p the polynomial through the points (nodes_j, f_j)."""
    w = np.ones(len(nodes))
    for j in range(len(nodes)):
        for m in range(len(nodes)):
            if m != j:
                w[j] *= (t - nodes[m]) / (nodes[j] - nodes[m])
    return w


@dataclass
class BrickCache:
    """What one batch's evaluations remember between steps. The caller owns it (a pipeline call per
    batch, a server request per request) and passes it to every :func:`denoise` of that batch.

    order: a cached correction is the last one (0) or extrapolated linearly (1) or quadratically (2)
    in log sigma. gate: a relative L1 change of brick 0's estimate (per image, against the image's
    last full evaluation) below which the later bricks take their cache; None: no gate. residual:
    residual reuse of a skipped suffix of bricks (options.reuse_residual). guidance: keep the
    difference between the halves of a guided evaluation (options.guidance_cache). record: per
    evaluation, how many rows each brick ran, reused or forecast, and skipped.
    """

    order: int = 0
    gate: float | None = None
    gate_signal: str = "brick0"  # or "input": the change of c_in x gates every brick, brick 0 too
    residual: bool = False
    track: bool = False  # keep each brick's corrections (cache rules or the gate need them)
    guidance: bool = False
    suffix: dict = field(default_factory=dict)  # prefix length j -> F_K - F_j of the last full chain
    history: dict[int, BrickHistory] = field(default_factory=dict)
    reference: Array = None  # (images, C, H, W): brick 0's estimate at each image's last full evaluation
    guidance_delta: Array = None  # (images, C, H, W): F_cond - F_uncond at the last guided evaluation
    record: list[dict] = field(default_factory=list)

    @classmethod
    def for_options(cls, options) -> BrickCache | None:
        """The cache a batch sampled with these SamplingOptions needs; None when nothing is kept."""
        track = options.caches
        guidance = options.guidance_cache is not None
        if not (track or guidance or options.reuse_residual):
            return None
        return cls(options.forecast, options.gate, options.gate_signal, options.reuse_residual, track, guidance)


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
    cache: BrickCache | None = None,
    cached: Sequence[int] = (),
    guidance_cached: bool = False,
    arrays=None,
):
    """D(x; sigma) for x (B, C, H, W) from the first num_bricks bricks (default all).

    sigma: a float, or an array of B noise levels (training). class_onehot: (B, K) one-hot rows,
    all-zero rows or None meaning the null label. shift (dy, dx) rolls the canvas before the bricks
    and back after, moving the tile grid. guidance != 1 runs the conditional and null-label halves
    as one batch through the same bricks and returns uncond + guidance (cond - uncond).
    coords (B, 2, H, W) replaces the whole canvas's coordinate channels (training windows).
    return_all gives [D_1, ..., D_k] instead of D_k.
    cache (one per batch, see BrickCache): with cache.residual, a full-chain evaluation stores, for
    each shorter prefix j, what the remaining bricks added to the raw output (F_K - F_j); an
    evaluation that stops after j bricks adds back the most recent such correction instead of
    dropping it. cached: bricks of the prefix that take their cached correction at this evaluation.
    guidance_cached: a guided evaluation runs the conditional half only, with the halves' last
    difference (when the cache holds one).
    """
    a = arrays or arrays_for(x)
    b, _, h, w = x.shape
    check_canvas(h, w, int(np.lcm.reduce(list(brick_sizes))))
    k = len(brick_sizes) if num_bricks is None else num_bricks
    if not 1 <= k <= len(brick_sizes):
        raise LegoError(f"num_bricks must be between 1 and {len(brick_sizes)}, got {num_bricks}")

    scalar = isinstance(sigma, int | float | np.floating)
    guided = guidance != 1.0 and class_onehot is not None
    dynamic = cache is not None and (cache.track or cache.guidance or bool(cached))
    if dynamic and (return_all or not scalar):
        raise LegoError("brick caching works on one noise level per evaluation, returning its last estimate")
    half = guided and guidance_cached and cache is not None and cache.guidance_delta is not None
    x_image = x
    if guided and not half:
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
    if dynamic:
        features = _cached_chain(
            x_in, cond, x_image, float(sigma), edm, bricks, brick_sizes, k, shift, cached, cache, a
        )
        features = features[-1:] if not (cache.residual and k == len(brick_sizes)) else features
    else:
        features, feature = [], None
        for size, brick in zip(brick_sizes[:k], bricks[:k], strict=True):
            inp = x_in if feature is None else a.concat([feature, x_in], axis=1)
            tiles = tile(inp, size)
            feature = untile(brick(tiles, a.repeat(cond, tiles.shape[0] // n)), n, h, w)
            features.append(feature)
        if cache is not None:
            cache.record.append(_plain_record(n, k, len(brick_sizes)))
    full_chain = k == len(brick_sizes)
    suffix = cache.suffix if cache is not None and cache.residual else None
    if not return_all and not (suffix is not None and full_chain):
        features = features[-1:]
    if shift != (0, 0):
        features = [a.roll(f, (-shift[0], -shift[1]), (2, 3)) for f in features]
    if suffix is not None:  # corrections live on the unrolled canvas: tile-grid shifts differ per step
        if full_chain:
            suffix.update({j + 1: features[-1] - f for j, f in enumerate(features[:-1])})
            features = features if return_all else features[-1:]
        elif k in suffix:
            features[-1] = features[-1] + _rows_for(suffix[k], n, a)

    estimates = [c_skip * x + c_out * a.cast_like(f, x) for f in features]
    if half:  # uncond + w (cond - uncond) = cond + (w - 1) (cond - uncond), the difference from the cache
        delta = a.cast_like(cache.guidance_delta, x)
        estimates = [d + (guidance - 1.0) * (c_out * delta) for d in estimates]
    elif guided:
        if cache is not None and cache.guidance:
            cache.guidance_delta = features[-1][:b] - features[-1][b:]
        estimates = [d[b:] + guidance * (d[:b] - d[b:]) for d in estimates]
    return estimates if return_all else estimates[0]


def _cached_chain(x_in, cond, x_image, sigma: float, edm, bricks, brick_sizes, k: int, shift, cached, cache, a) -> list:
    """The raw outputs F_0..F_{k-1} (rolled canvas) where bricks may take their cache, per row."""
    n, h, w = x_in.shape[0], x_in.shape[2], x_in.shape[3]
    images = x_image.shape[0]
    log_sigma = float(np.log(sigma))
    record = {"rows": n, "run": [], "reused": [], "forecast": [], "skipped": [n if j >= k else 0 for j in
              range(len(brick_sizes))]}  # fmt: skip
    every = np.arange(n)
    gated = None  # rows that run the gated bricks (the gate's choice), or None: every row
    if cache.gate is not None and cache.gate_signal == "input":  # every brick, brick 0 too
        gated = _gate(edm.scalings(sigma)[2] * x_image, cache, n, a)
    features, feature = [], None
    for j, (size, brick) in enumerate(zip(brick_sizes[:k], bricks[:k], strict=True)):
        history = cache.history.get(j)
        held = np.zeros(n, bool) if history is None else history.count[history.sources(every, images)] > 0
        if j in cached:
            run = ~held
        elif gated is not None and (j > 0 or cache.gate_signal == "input"):
            run = gated | ~held
        else:
            run = np.ones(n, bool)
        inp = x_in if feature is None else a.concat([feature, x_in], axis=1)
        if run.all():
            tiles = tile(inp, size)
            out = untile(brick(tiles, a.repeat(cond, tiles.shape[0] // n)), n, h, w)
            forecast_used = np.zeros(0, np.int64)
        else:
            rest = np.flatnonzero(~run)
            guess, forecast_used = history.forecast(rest, log_sigma, cache.order, images, a)
            guess = a.roll(guess, shift, (2, 3)) if shift != (0, 0) else guess
            out = _blank(x_in, a)
            rest_idx = _index(rest, a)
            out[rest_idx] = guess if feature is None else feature[rest_idx] + a.cast_like(guess, feature)
            ran = np.flatnonzero(run)
            if len(ran):
                idx = _index(ran, a)
                sub = inp[idx]
                tiles = tile(sub, size)
                out[idx] = untile(brick(tiles, a.repeat(cond[idx], tiles.shape[0] // len(ran))), len(ran), h, w)
        record["run"].append(int(run.sum()))
        record["reused"].append(int((forecast_used == 1).sum()))
        record["forecast"].append(int((forecast_used > 1).sum()))
        if cache.track and run.any():
            correction = out if feature is None else out - feature
            if shift != (0, 0):
                correction = a.roll(correction, (-shift[0], -shift[1]), (2, 3))
            ran = np.flatnonzero(run)
            if history is None:
                history = cache.history[j] = BrickHistory.empty(correction, 2 * images, cache.order + 1, a)
            history.push(ran, correction if run.all() else correction[_index(ran, a)], log_sigma, a)
        feature = out
        features.append(feature)
        if j == 0 and cache.gate is not None and cache.gate_signal == "brick0" and k > 1 and run.all():
            f0 = feature[:images]
            f0 = a.roll(f0, (-shift[0], -shift[1]), (2, 3)) if shift != (0, 0) else f0
            c_skip, c_out, _ = edm.scalings(sigma)
            gated = _gate(c_skip * x_image + c_out * a.cast_like(f0, x_image), cache, n, a)
    for key in ("run", "reused", "forecast"):
        record[key] += [0] * (len(brick_sizes) - k)
    cache.record.append(record)
    return features


def _gate(signal, cache: BrickCache, n: int, a) -> np.ndarray:
    """Which rows run the gated bricks: the images whose signal (brick 0's estimate D_0, or the
    bricks' input c_in x) moved, in mean absolute value relative to the image's signal at its last
    full evaluation, by at least cache.gate (both halves of an image go together). Updates the
    reference of the images that run."""
    images = signal.shape[0]
    d0 = signal
    if cache.reference is None:
        change = np.full(images, np.inf)
        cache.reference = a.zeros_like(d0)
    else:
        moved = a.to_numpy(abs(d0 - cache.reference).reshape(images, -1).mean(1))
        scale = a.to_numpy(abs(cache.reference).reshape(images, -1).mean(1))
        change = moved / np.maximum(scale, 1e-12)
    run = change >= cache.gate
    ran = np.flatnonzero(run)
    if len(ran):
        cache.reference[_index(ran, a)] = d0[_index(ran, a)]
    return np.concatenate([run] * (n // images))


def _blank(x_in, a):
    """A zero raw-output array of n rows (the image channels of x_in, which carries 2 coordinate channels)."""
    return a.zeros_like(x_in[:, : x_in.shape[1] - 2])


def _index(rows: np.ndarray, a):
    """Row indices in the arrays' own kind (a device tensor for torch)."""
    return a.from_numpy(np.asarray(rows, dtype=np.int64))


def _plain_record(n: int, k: int, num_bricks: int) -> dict:
    return {"rows": n, "run": [n if j < k else 0 for j in range(num_bricks)], "reused": [0] * num_bricks,
            "forecast": [0] * num_bricks, "skipped": [n if j >= k else 0 for j in range(num_bricks)]}  # fmt: skip


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
