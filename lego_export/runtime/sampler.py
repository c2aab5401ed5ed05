"""EDM samplers over a Karras sigma schedule, for NumPy arrays and torch tensors alike.

The denoiser is any callable ``denoise(x, sigma, step) -> D(x; sigma)``; the step index lets a
runtime change which bricks run at each step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
    """steps + 1 noise levels, from sigma_max down to sigma_min, then a final 0."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
    inv_rho = 1.0 / rho
    sigmas = (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    return np.append(sigmas, 0.0)


def sample(denoise: Callable, noise, sigmas: np.ndarray, heun: bool = True, on_step: Callable | None = None):
    """Integrate the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigmas[0] to 0.

    noise: a standard normal array/tensor; it is scaled by sigmas[0]. Heun adds a second-order
    correction on every step but the last (EDM Algorithm 1 without churn).
    """
    x = noise * float(sigmas[0])
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - denoise(x, s, i)) / s
        x_next = x + (s_next - s) * d
        if heun and s_next > 0:
            d_next = (x_next - denoise(x_next, s_next, i)) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
        if on_step is not None:
            on_step(i)
    return x
