"""Where the pipeline's arrays live: NumPy on the host, or torch tensors on the backend's device.

The pipeline does a handful of array operations between engine calls (tiling, concatenation,
rolls, repeats). A backend that computes on a GPU gives it :class:`TorchArrays` so that the canvas,
tiles and brick outputs stay in GPU memory for the whole sample; the host sees only the noise going
in and the images coming out. Host backends use :class:`NumpyArrays`, which needs no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NumpyArrays:
    """Host arrays (the ONNX Runtime CPU path; no torch needed)."""

    def from_numpy(self, a: np.ndarray) -> np.ndarray:
        return a

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def concat(self, xs: Sequence[np.ndarray], axis: int = 0) -> np.ndarray:
        return np.concatenate(xs, axis=axis)

    def roll(self, x: np.ndarray, shift: tuple[int, int], axes: tuple[int, int]) -> np.ndarray:
        return np.roll(x, shift, axis=axes)

    def repeat(self, x: np.ndarray, times: int) -> np.ndarray:
        """Each row `times` times in a row (along axis 0)."""
        return np.repeat(x, times, axis=0)

    def contiguous(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x)

    def synchronize(self) -> None:
        pass


class TorchArrays:
    """torch tensors on one device; on CUDA, engine calls are timed after a synchronize."""

    def __init__(self, device: str = "cpu"):
        import torch

        self.torch, self.device = torch, device

    def from_numpy(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def to_numpy(self, x) -> np.ndarray:
        return x.float().cpu().numpy()

    def concat(self, xs, axis: int = 0):
        return self.torch.cat(list(xs), dim=axis)

    def roll(self, x, shift: tuple[int, int], axes: tuple[int, int]):
        return self.torch.roll(x, shifts=shift, dims=axes)

    def repeat(self, x, times: int):
        return self.torch.repeat_interleave(x, times, dim=0)

    def contiguous(self, x):
        return x.contiguous()

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()
