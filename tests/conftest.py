import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def tiny_npz(tmp_path):
    """A labelled 16 x 16 data set: bright squares whose position depends on the class."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=256)
    images = np.zeros((256, 16, 16), dtype=np.uint8)
    for i, k in enumerate(labels):
        y, x = divmod(int(k), 2)
        images[i, 8 * y : 8 * y + 8, 8 * x : 8 * x + 8] = 255
    path = tmp_path / "squares.npz"
    np.savez(path, images=images, labels=labels)
    return path
