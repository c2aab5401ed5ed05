"""Frechet distance between Gaussians fitted to feature sets (FID, in whatever feature space is given).

NumPy only, so the skip tuner runs in the torch-free runtime. The reference side is usually kept as
statistics (mean and covariance), as EDM's and pytorch-fid's reference files are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureStats:
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D) covariance

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        features = np.asarray(features, dtype=np.float64)
        return cls(features.mean(0), np.cov(features, rowvar=False))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a S_b))."""
    # tr(sqrt(S_a S_b)) from the eigenvalues of sqrt(S_a) S_b sqrt(S_a), which is symmetric: no complex sqrtm.
    w, v = np.linalg.eigh(a.sigma)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root_a @ b.sigma @ root_a)
    mean_term = float(((a.mu - b.mu) ** 2).sum())
    return mean_term + float(np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (N x D each)."""
    return frechet_distance(FeatureStats.of(a), FeatureStats.of(b))
