"""EDM (Karras et al. 2022): the noise constants, preconditioning, the sigma schedule and samplers.

One module for training, the PyTorch preview, export verification and every runtime backend.
Written for NumPy arrays and torch tensors alike; imports neither torch nor a runtime.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lego_export.errors import LegoError


@dataclass(frozen=True)
class EDMConfig:
    """The noise constants a model is trained and sampled with; carried by the model config into
    checkpoints and the engines manifest, so every reader uses the same numbers."""

    sigma_data: float = 0.5  # standard deviation of the data
    sigma_min: float = 0.002  # sampling schedule: lowest noise level before the final 0
    sigma_max: float = 80.0  # sampling schedule: starting noise level
    rho: float = 7.0  # Karras schedule curvature
    p_mean: float = -1.2  # training: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2

    def validate(self) -> None:
        values = {k: getattr(self, k) for k in ("sigma_data", "sigma_min", "sigma_max", "rho", "p_std")}
        bad = [k for k, v in values.items() if not (isinstance(v, int | float) and math.isfinite(v) and v > 0)]
        if bad or not (isinstance(self.p_mean, int | float) and math.isfinite(self.p_mean)):
            raise LegoError(f"EDM constant {(bad or ['p_mean'])[0]} must be a finite positive number")
        if self.sigma_min >= self.sigma_max:
            raise LegoError(f"EDM sigma_min {self.sigma_min} must be below sigma_max {self.sigma_max}")

    # -- preconditioning ------------------------------------------------------------------------

    def scalings(self, sigma):
        """c_skip, c_out, c_in of D(x) = c_skip x + c_out F(c_in x; c_noise), for a float or an array."""
        sd2 = self.sigma_data**2
        norm = (sigma**2 + sd2) ** 0.5
        return sd2 / norm**2, sigma * self.sigma_data / norm, 1 / norm

    @staticmethod
    def c_noise(sigma: float) -> float:
        """The network's noise input: ln(sigma) / 4."""
        return math.log(sigma) / 4

    def loss_weight(self, sigma):
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2: unit loss at every noise level."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    # -- schedule -------------------------------------------------------------------------------

    def sigma_at(self, t: float) -> float:
        """The Karras schedule as a continuous function: t = 0 gives sigma_max, t = 1 sigma_min."""
        a, b = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return (a + t * (b - a)) ** self.rho

    def sigmas(self, steps: int) -> np.ndarray:
        """steps + 1 noise levels: the schedule at steps evenly spaced t, then a final 0."""
        if steps < 1:
            raise LegoError(f"steps must be at least 1, got {steps}")
        ts = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
        return np.append([self.sigma_at(t) for t in ts], 0.0)


def initial_noise(seed: int, indices, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise (len(indices), *shape) float32; image i's depends only on (seed, i), so
    any split of the indices (batches, processes, requests) gives the same images."""
    return np.stack([np.random.default_rng([seed, i]).standard_normal(shape) for i in indices]).astype(np.float32)


def churn_noise(seed: int, indices, shape: tuple[int, ...], step: int) -> np.ndarray:
    """The fresh noise churn adds at one step, per image from (seed, i, step) like initial_noise."""
    return np.stack([np.random.default_rng([seed, i, 1, step]).standard_normal(shape) for i in indices]).astype(
        np.float32
    )


@dataclass(frozen=True)
class Churn:
    """EDM's stochastic sampling (Karras et al. 2022, Algorithm 2): at each step with s_min <= sigma
    <= s_max, first raise the noise level by a factor 1 + gamma, gamma = min(s_churn / steps, sqrt(2) - 1),
    adding fresh noise scaled by s_noise. s_churn = 0 is the deterministic sampler."""

    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = math.inf
    s_noise: float = 1.0

    def gamma(self, sigma: float, steps: int) -> float:
        return min(self.s_churn / steps, math.sqrt(2) - 1) if self.s_min <= sigma <= self.s_max else 0.0


SAMPLERS = ("heun", "euler", "dpm2m")


def evaluations(sampler: str, steps: int) -> int:
    """Denoiser evaluations per image: Heun's last step is a plain Euler step (EDM, Algorithm 1)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def _check_sample_arguments(denoise, sigmas, method, on_step, churn, fresh_noise) -> None:
    """TypeErrors naming the argument of :func:`sample` given a value of the wrong type."""
    for name, fn in (("denoise", denoise), ("on_step", on_step), ("fresh_noise", fresh_noise)):
        if not callable(fn) and (fn is not None or name == "denoise"):
            raise TypeError(f"{name} must be a function, got {type(fn).__name__}")
    if np.ndim(sigmas) != 1 or len(sigmas) < 2:
        raise TypeError(f"sigmas must be a 1-D array of at least 2 noise levels, got {type(sigmas).__name__}")
    if not isinstance(method, str):
        raise TypeError(f"method must be a sampler name (str), got {type(method).__name__}")
    if churn is not None and not isinstance(churn, Churn):
        raise TypeError(f"churn must be a Churn or None, got {type(churn).__name__}")
    if churn is not None and churn.s_churn > 0 and method != "dpm2m" and fresh_noise is None:
        raise TypeError("fresh_noise is needed with churn: a function of the step returning standard normal noise")


def sample(
    denoise: Callable,
    noise,
    sigmas: np.ndarray,
    *,
    method: str = "heun",
    on_step: Callable | None = None,
    churn: Churn | None = None,
    fresh_noise: Callable | None = None,
):
    """Solve the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigmas[0] to 0.

    denoise(x, sigma, step) -> D(x; sigma); the step index lets a runtime change which bricks run.
    noise: a standard normal array/tensor; it is scaled by sigmas[0].
      - heun: EDM Algorithm 1, a second-order correction on every step but the last (2 evaluations);
      - euler: first order, 1 evaluation per step;
      - dpm2m: DPM-Solver++(2M) (Lu et al. 2022), second order from the previous step's estimate,
        1 evaluation per step.
    With churn (heun and euler), each step first moves x to a higher noise level with
    fresh_noise(step), a standard normal like x (EDM Algorithm 2).
    """
    _check_sample_arguments(denoise, sigmas, method, on_step, churn, fresh_noise)
    if method not in SAMPLERS:
        raise LegoError(f"unknown sampler {method!r}; use one of {', '.join(SAMPLERS)}")
    if method == "dpm2m":
        if churn is not None and churn.s_churn > 0:
            raise LegoError("churn works with the heun and euler samplers, not dpm2m")
        return _dpm_solver_2m(denoise, noise, sigmas, on_step)
    steps = len(sigmas) - 1
    x = noise * float(sigmas[0])
    for i in range(steps):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = churn.gamma(s, steps) if churn is not None else 0.0
        if gamma > 0:
            s_hat = s * (1 + gamma)
            x = x + math.sqrt(s_hat**2 - s**2) * churn.s_noise * fresh_noise(i)
            s = s_hat
        d = (x - denoise(x, s, i)) / s
        x_next = x + (s_next - s) * d
        if method == "heun" and s_next > 0:
            d_next = (x_next - denoise(x_next, s_next, i)) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
        if on_step is not None:
            on_step(i)
    return x


def _dpm_solver_2m(denoise: Callable, noise, sigmas: np.ndarray, on_step: Callable | None):
    """DPM-Solver++(2M) in EDM's parameterisation: with lambda = -ln(sigma) and h the step in lambda,
    x_next = (sigma_next / sigma) x + (1 - e^-h) D', where D' extrapolates the denoised estimate
    linearly in lambda from this step and the previous one (first order on the first step; the last
    step to sigma = 0 returns the estimate itself)."""
    x = noise * float(sigmas[0])
    previous, h_previous = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, s, i)
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            estimate = denoised
            if previous is not None:
                r = h_previous / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
            x = (s_next / s) * x - math.expm1(-h) * estimate
            h_previous = h
        previous = denoised
        if on_step is not None:
            on_step(i)
    return x
