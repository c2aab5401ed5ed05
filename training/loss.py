"""EDM joint loss: the same x0 loss for every brick's estimate, same sigma, same noise."""

from __future__ import annotations

import torch
from torch import Tensor

from lego_export.model import LegoModel


def edm_loss(
    model: LegoModel, images: Tensor, class_onehot: Tensor | None, coords: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Return (scalar loss to minimise, per-brick losses detached); coords as in LegoModel.forward.

    ln(sigma) ~ N(p_mean, p_std^2) and the weight lambda(sigma) come from the model's EDM config.
    model may be wrapped (DistributedDataParallel): its config is read from the module inside.
    """
    edm = getattr(model, "module", model).cfg.edm
    b = images.shape[0]
    sigma = (torch.randn(b, device=images.device) * edm.p_std + edm.p_mean).exp()
    weight = edm.loss_weight(sigma).reshape(b, 1, 1, 1)
    noisy = images + torch.randn_like(images) * sigma.reshape(b, 1, 1, 1)
    estimates = model(noisy, sigma, class_onehot, return_all=True, coords=coords)
    per_brick = torch.stack([(weight * (d.float() - images) ** 2).mean() for d in estimates])
    return per_brick.mean(), per_brick.detach()
