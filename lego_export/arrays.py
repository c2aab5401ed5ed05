"""The array interface the denoiser is written over: NumPy on the host, or torch tensors on a device.

The outer denoiser (denoiser.py) does a handful of array operations around brick calls (concat,
roll, repeat, reshapes). A backend that computes on a GPU gives it :class:`TorchArrays` so that the
canvas, tiles and brick outputs stay in GPU memory for the whole sample; the PyTorch model uses
the same class with autograd. Host backends use :class:`NumpyArrays`, which needs no torch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from lego_export.tiling import canvas_coords


class NumpyArrays:
    """Host arrays (the ONNX Runtime CPU path; no torch needed)."""

    def __init__(self) -> None:
        self._coords: dict[tuple[int, int, int], np.ndarray] = {}

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

    def log(self, x: np.ndarray) -> np.ndarray:
        return np.log(x)

    def zeros_like(self, x: np.ndarray) -> np.ndarray:
        return np.zeros_like(x)

    def cast_like(self, x: np.ndarray, like: np.ndarray) -> np.ndarray:
        return x.astype(like.dtype, copy=False)

    def contiguous(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x)

    def all_finite(self, x: np.ndarray) -> bool:
        return bool(np.isfinite(x).all())

    def synchronize(self) -> None:
        pass

    def coords(self, height: int, width: int, n: int, like: np.ndarray) -> np.ndarray:
        """Coordinate channels (n, 2, H, W), made once per shape."""
        key = (height, width, n)
        if key not in self._coords:
            self._coords[key] = np.broadcast_to(canvas_coords(height, width), (n, 2, height, width))
        return self._coords[key]


class TorchArrays:
    """torch tensors on one device (autograd works through every operation)."""

    def __init__(self, device: str = "cpu"):
        import torch

        self.torch, self.device = torch, str(device)

    def from_numpy(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().float().cpu().numpy()

    def concat(self, xs, axis: int = 0):
        return self.torch.cat(list(xs), dim=axis)

    def roll(self, x, shift: tuple[int, int], axes: tuple[int, int]):
        return self.torch.roll(x, shifts=shift, dims=axes)

    def repeat(self, x, times: int):
        return self.torch.repeat_interleave(x, times, dim=0)

    def log(self, x):
        return self.torch.log(x)

    def zeros_like(self, x):
        return self.torch.zeros_like(x)

    def cast_like(self, x, like):
        return x.to(like.dtype)

    def contiguous(self, x):
        return x.contiguous()

    def all_finite(self, x):
        """A 0-d device tensor: reading it waits for the device, so callers read it only when needed."""
        return self.torch.isfinite(x).all()

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def coords(self, height: int, width: int, n: int, like):
        return _torch_coords(height, width, str(like.device), like.dtype).expand(n, 2, height, width)


@functools.lru_cache(maxsize=32)
def _torch_coords(height: int, width: int, device: str, dtype):
    import torch

    return torch.from_numpy(canvas_coords(height, width)).to(device, dtype)[None]


def arrays_for(x) -> NumpyArrays | TorchArrays:
    """The interface matching an array: NumPy for ndarrays, else torch on the tensor's device."""
    if isinstance(x, np.ndarray):
        return _NUMPY
    return _torch_arrays(str(x.device))


_NUMPY = NumpyArrays()


@functools.lru_cache(maxsize=8)
def _torch_arrays(device: str) -> TorchArrays:
    return TorchArrays(device)
