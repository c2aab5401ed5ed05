"""EDM joint loss: the same x0 loss for every brick's estimate, same sigma, same noise."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lego_export.model import LegoModel


@dataclass(frozen=True)
class EDMLoss:
    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(
        self, model: LegoModel, images: Tensor, class_onehot: Tensor | None, coords: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return (scalar loss to minimise, per-brick losses detached); coords as in LegoModel.forward."""
        sd = model.cfg.sigma_data if not hasattr(model, "module") else model.module.cfg.sigma_data
        b = images.shape[0]
        sigma = (torch.randn(b, device=images.device) * self.p_std + self.p_mean).exp()
        weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2).reshape(b, 1, 1, 1)
        noisy = images + torch.randn_like(images) * sigma.reshape(b, 1, 1, 1)
        estimates = model(noisy, sigma, class_onehot, return_all=True, coords=coords)
        per_brick = torch.stack([(weight * (d.float() - images) ** 2).mean() for d in estimates])
        return per_brick.mean(), per_brick.detach()
