"""The LEGO model in PyTorch: DiT-style bricks over local tiles, chained, with EDM preconditioning.

Shared by training, export and the PyTorch runtime backend. A :class:`Brick` is a pure function
on a batch of fixed-size tiles, exactly what the exporter turns into one engine; everything that
touches the whole canvas (tiling, coordinates, chaining, preconditioning, guidance) is the one
outer denoiser of denoiser.py, which :class:`LegoModel` calls with its modules.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lego_export.config import BrickConfig, LegoConfig
from lego_export.denoiser import denoise


def sinusoidal_embedding(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(N,) -> (N, dim): cosines and sines of x at geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def sincos_position_embedding(width: int, grid: int, halves: str = "row-col") -> Tensor:
    """(grid*grid, width) fixed 2-D sin-cos embedding of the token grid inside one tile.

    Each half embeds one axis of the token's position; halves says which comes first ("row-col",
    or "col-row" as in the LEGO authors' network, see BrickConfig.pos_halves).
    """
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(pos, pos, indexing="ij")

    def embed(p: Tensor) -> Tensor:
        angles = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    first, second = (yy, xx) if halves == "row-col" else (xx, yy)
    return torch.cat([embed(first), embed(second)], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: per-sample affine transform of normalised tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class ConditionEmbedder(nn.Module):
    """c = MLP(sinusoidal(c_noise)) + W @ onehot(label) [+ b]; an all-zero one-hot is the null label.

    label_bias adds b (the LEGO authors' layout): the null label then embeds to b, and so does a
    missing one-hot, which means the null label everywhere.
    """

    def __init__(self, cond_dim: int, num_classes: int, freq_dim: int = 256, label_bias: bool = False):
        super().__init__()
        self.freq_dim = freq_dim
        self.noise_mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.label_embed = nn.Linear(num_classes, cond_dim, bias=label_bias) if num_classes else None

    def forward(self, c_noise: Tensor, class_onehot: Tensor | None = None) -> Tensor:
        c = self.noise_mlp(sinusoidal_embedding(c_noise, self.freq_dim))
        if self.label_embed is not None and class_onehot is not None:
            c = c + self.label_embed(class_onehot.to(c.dtype))
        elif self.label_embed is not None and self.label_embed.bias is not None:
            c = c + self.label_embed.bias
        return c


class Attention(nn.Module):
    """Multi-head self-attention over the tokens of one tile."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head width)) v, fused
        return self.proj(x.transpose(1, 2).reshape(n, t, w))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning sets shift, scale and gate of both halves."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, cond_dim: int):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada_ln(c).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    """adaLN, then a linear map from each token to its p x p x C patch of output pixels."""

    def __init__(self, width: int, patch: int, channels: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))
        self.linear = nn.Linear(width, patch * patch * channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada_ln(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class Brick(nn.Module):
    """One LEGO brick: tiles (N, C_in, r, r) and conditioning (N, D) -> output tiles (N, C, r, r).

    Only N varies between calls; this is the unit the exporter turns into one engine.
    """

    def __init__(self, cfg: BrickConfig, in_channels: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.cfg = cfg
        self.out_channels = out_channels
        self.patch_embed = nn.Conv2d(in_channels, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)
        pos_embed = sincos_position_embedding(cfg.width, cfg.grid, cfg.pos_halves)
        self.register_buffer("pos_embed", pos_embed, persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cond_dim) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.width, cfg.patch, out_channels, cond_dim)

    def forward(self, tiles: Tensor, c: Tensor) -> Tensor:
        x = self.patch_embed(tiles).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, width)
        for block in self.blocks:
            x = block(x, c)
        x = self.final(x, c)  # (N, T, p * p * C)
        n, g, p, ch = x.shape[0], self.cfg.grid, self.cfg.patch, self.out_channels
        x = x.reshape(n, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, ch, g * p, g * p)


def _init_brick(brick) -> None:
    """DiT's initialisation of one brick (untyped: ModuleList items read as plain Modules)."""
    w = brick.patch_embed.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(brick.patch_embed.bias)
    # adaLN-Zero: every block starts as the identity, every brick's output as zero.
    for layer in [block.ada_ln[-1] for block in brick.blocks] + [brick.final.ada_ln[-1], brick.final.linear]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


class LegoModel(nn.Module):
    """A stack of bricks. Brick 1 sees [c_in x, coords]; brick k > 1 sees [F_{k-1}, c_in x, coords].

    Every brick's D_k = c_skip x + c_out F_k is a complete denoised estimate, so a forward pass may
    stop after any brick.
    """

    def __init__(self, cfg: LegoConfig):
        super().__init__()
        self.cfg = cfg
        self.embedder = ConditionEmbedder(cfg.cond_dim, cfg.num_classes, label_bias=cfg.label_bias)
        self.bricks = nn.ModuleList(
            Brick(b, cfg.brick_in_channels(k), cfg.img_channels, cfg.cond_dim) for k, b in enumerate(cfg.bricks)
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for brick in self.bricks:
            _init_brick(brick)
        for layer in (self.embedder.noise_mlp[0], self.embedder.noise_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)  # type: ignore[arg-type]
        if self.embedder.label_embed is not None:
            nn.init.normal_(self.embedder.label_embed.weight, std=0.02)

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        class_onehot: Tensor | None = None,
        *,
        num_bricks: int | None = None,
        return_all: bool = False,
        shift: tuple[int, int] = (0, 0),
        guidance: float = 1.0,
        coords: Tensor | None = None,
    ) -> Tensor | list[Tensor]:
        """Denoise x (B, C, H, W) at noise level sigma (a float, or a tensor of one or B levels).

        class_onehot: (B, num_classes) one-hot rows; all-zero rows (or None) mean the null label.
        num_bricks: run only the first k bricks. return_all: return [D_1, ..., D_k] instead of D_k.
        shift: roll the canvas by (dy, dx) before the bricks and back after, moving the tile grid.
        guidance: classifier-free guidance scale (1 = none).
        coords: (B, 2, H, W) coordinate channels to use instead of the whole canvas's; training
        passes those of windows cut from larger canvases (see training/crops.py).
        """
        if isinstance(sigma, Tensor):
            sigma = sigma.to(x.device, torch.float32).reshape(-1).expand(x.shape[0])
        return denoise(
            x,
            sigma,
            class_onehot,
            embed=self.embedder,
            bricks=list(self.bricks),
            brick_sizes=[b.size for b in self.cfg.bricks],
            edm=self.cfg.edm,
            num_bricks=num_bricks,
            shift=shift,
            guidance=guidance,
            coords=coords,
            return_all=return_all,
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
