import gzip

import numpy as np
import pytest
from PIL import Image

from lego_export.errors import LegoError
from lego_train.data import load_dataset


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_folder_is_padded_to_32(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 9]))
    data = load_dataset(str(tmp_path))
    assert data.images.shape == (5, 1, 32, 32) and data.num_classes == 10
    np.testing.assert_array_equal(data.images[:, 0, 2:30, 2:30], images)
    assert data.images[:, :, :2].max() == 0  # padding is background
    assert list(data.labels) == [0, 1, 2, 3, 9]


def test_npz_grey_and_colour(tmp_path):
    grey = tmp_path / "g.npz"
    np.savez(grey, images=np.zeros((3, 16, 16), np.uint8), labels=np.array([0, 2, 1]))
    data = load_dataset(str(grey))
    assert data.images.shape == (3, 1, 16, 16) and data.num_classes == 3
    colour = tmp_path / "c.npz"
    np.savez(colour, images=np.zeros((2, 16, 16, 3), np.uint8))
    data = load_dataset(str(colour))
    assert data.images.shape == (2, 3, 16, 16) and data.labels is None and data.num_classes == 0


def test_image_folder_with_class_subfolders(tmp_path):
    for name, value in [("cat", 10), ("dog", 200)]:
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(np.full((16, 16), value, np.uint8)).save(tmp_path / name / f"{i}.png")
    data = load_dataset(str(tmp_path))
    assert data.images.shape == (4, 1, 16, 16)
    assert data.class_names == ["cat", "dog"] and list(data.labels) == [0, 0, 1, 1]


def test_bad_data_is_a_one_line_error(tmp_path):
    with pytest.raises(LegoError, match="data not found"):
        load_dataset(str(tmp_path / "missing"))
    np.savez(tmp_path / "x.npz", pixels=np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(LegoError, match="no 'images' array"):
        load_dataset(str(tmp_path / "x.npz"))
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 16, 16), np.float32))
    with pytest.raises(LegoError, match="must be uint8"):
        load_dataset(str(tmp_path / "f.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LegoError, match="holds no PNG or JPEG"):
        load_dataset(str(tmp_path / "empty"))
