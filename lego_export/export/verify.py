"""Parity of an exported engine against the PyTorch module it came from."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lego_export.manifest import EngineSpec

# Largest allowed error, as a fraction of the reference output's largest magnitude.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


def example_feeds(spec: EngineSpec, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs in the ranges the runtime feeds: c_noise over the sampling range of sigma, one-hot rows
    (some null), and unit-scale tiles and conditioning."""
    feeds = {}
    for t in spec.inputs:
        shape = [n if d == "N" else d for d in t.shape]
        if t.name == "c_noise":
            value = np.log(rng.uniform(0.002, 80.0, size=shape)) / 4
        elif t.name == "class_onehot":
            value = np.eye(shape[1])[rng.integers(0, shape[1], size=n)] * (rng.random((n, 1)) > 0.2)
        else:
            value = rng.standard_normal(shape)
        feeds[t.name] = value.astype(np.float32)
    return feeds


def verification_batches(batch: dict[str, int]) -> list[int]:
    """At least three sizes of N: 1, a small odd one, the optimisation point, and the largest."""
    return sorted({1, min(3, batch["max"]), batch["opt"], batch["max"]})


@torch.no_grad()
def measure_error(module: nn.Module, runner, spec: EngineSpec, precision: str, seed: int = 0) -> dict:
    """Run engine and module on the same inputs at several N; report the worst error."""
    rng = np.random.default_rng(seed)
    batches = verification_batches(spec.batch)
    worst_abs = worst_rel = 0.0
    for n in batches:
        feeds = example_feeds(spec, n, rng)
        reference = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs)).numpy()
        output = runner.infer(feeds)[spec.outputs[0].name]
        if output.shape != reference.shape:
            raise AssertionError(f"{spec.name}: engine output {output.shape} != PyTorch {reference.shape} at N={n}")
        error = float(np.abs(output.astype(np.float64) - reference).max())
        worst_abs = max(worst_abs, error)
        worst_rel = max(worst_rel, error / max(float(np.abs(reference).max()), 1e-6))
    return {
        "backend": "onnxruntime-cpu",
        "batches": batches,
        "max_abs_error": worst_abs,
        "relative_error": worst_rel,
        "tolerance": TOLERANCE[precision],
        "passed": worst_rel <= TOLERANCE[precision],
    }
