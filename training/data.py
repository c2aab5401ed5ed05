"""Training images from Fashion-MNIST IDX files, a folder of pictures, or an .npz file.

Every source gives a uint8 array (N, C, H, W) and optional int64 labels (N,).
"""

from __future__ import annotations

import gzip
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lego_export.errors import LegoError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class Dataset:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray | None  # int64 (N,) or None
    num_classes: int  # 0 when unlabelled
    class_names: list[str]

    @property
    def resolution(self) -> tuple[int, int]:
        return self.images.shape[2], self.images.shape[3]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise LegoError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise LegoError(f"{path}: IDX header says {dims} but holds {body.size} values")
    return body.reshape(dims)


def load_idx_dir(folder: Path, split: str = "train") -> Dataset:
    """Fashion-MNIST style folder: {split}-images-idx3-ubyte[.gz] and {split}-labels-idx1-ubyte[.gz].

    The 28 x 28 images are padded with background to 32 x 32 so every brick size tiles them.
    """
    prefix = "t10k" if split == "test" else "train"

    def find(kind: str) -> Path:
        for name in (f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte"):
            if (folder / name).is_file():
                return folder / name
        raise LegoError(f"{folder} has no {prefix}-{kind}-ubyte[.gz] file")

    images = read_idx(find("images-idx3"))
    labels = read_idx(find("labels-idx1")).astype(np.int64)
    if images.shape[1:] == (28, 28):
        images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    if len(labels) != len(images):
        raise LegoError(f"{folder}: {len(images)} images but {len(labels)} labels")
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    classes = int(labels.max()) + 1 if len(labels) else 0
    if classes > MAX_CLASSES:
        raise LegoError(f"{folder}: label {classes - 1} is beyond the {MAX_CLASSES} classes this tool supports")
    return Dataset(images[:, None], labels, classes, names if classes == 10 else [str(k) for k in range(classes)])


MAX_CLASSES = 10_000  # a label embedding row per class: a label of 10^9 must not allocate gigabytes


def load_npz(path: Path) -> Dataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise LegoError(f"{path} is not a readable .npz file ({e})") from None
    if "images" not in archive.files:
        raise LegoError(f"{path} has no 'images' array (found: {', '.join(archive.files) or 'nothing'})")
    try:
        images = archive["images"]
        labels = archive["labels"] if "labels" in archive.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise LegoError(f"{path} is damaged or truncated ({e})") from None
    if len(images) == 0:
        raise LegoError(f"{path} holds no images")
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise LegoError(
            f"{path}: 'images' must be uint8 of shape N x H x W or N x H x W x C, got {images.dtype} {images.shape}"
        )
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    if labels is not None and labels.dtype.kind not in "iu":  # 2.7 would become class 2 without a word
        raise LegoError(f"{path}: 'labels' must be integers, got {labels.dtype}")
    labels = None if labels is None else labels.astype(np.int64)
    if labels is not None and (labels.shape != (len(images),) or labels.min() < 0):
        raise LegoError(f"{path}: 'labels' must be N non-negative integers")
    if labels is not None and labels.max() >= MAX_CLASSES:
        raise LegoError(f"{path}: label {labels.max()} is beyond the {MAX_CLASSES} classes this tool supports")
    num_classes = int(labels.max()) + 1 if labels is not None else 0
    return Dataset(np.ascontiguousarray(images), labels, num_classes, [str(k) for k in range(num_classes)])


def load_image_folder(folder: Path) -> Dataset:
    """Pictures in folder (unlabelled) or in one sub-folder per class (labelled by folder name)."""
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LegoError(f"{folder} holds no PNG or JPEG images")
    class_names = sorted({p.parent.name for p in files if p.parent != folder})
    labelled = class_names and all(p.parent != folder for p in files)
    arrays = []
    for p in files:
        with Image.open(p) as im:
            arrays.append(np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")))
    if any(a.ndim == 3 for a in arrays):  # grey and colour pictures mixed: all of them in colour
        arrays = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
    if len({a.shape for a in arrays}) != 1:
        sizes = sorted({f"{a.shape[1]}x{a.shape[0]}" for a in arrays})
        raise LegoError(f"{folder}: images differ in size ({', '.join(sizes[:4])}); resize them to one size first")
    images = np.stack(arrays)
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    if not labelled:
        return Dataset(images, None, 0, [])
    index = {name: k for k, name in enumerate(class_names)}
    labels = np.array([index[p.parent.name] for p in files], dtype=np.int64)
    return Dataset(images, labels, len(class_names), class_names)


def load_dataset(spec: str) -> Dataset:
    """'fashion-mnist', a folder of IDX files or of pictures, or an .npz file."""
    path = FASHION_MNIST_DIR if spec == "fashion-mnist" else Path(spec)
    if not path.exists():
        hint = " (install the Debian package dataset-fashion-mnist)" if spec == "fashion-mnist" else ""
        raise LegoError(f"data not found: {path}{hint}")
    if path.is_file():
        if path.suffix != ".npz":
            raise LegoError(f"{path}: a data file must be an .npz with an 'images' array")
        return checked(load_npz(path), path)
    if any(path.glob("*-idx3-ubyte*")):
        return checked(load_idx_dir(path), path)
    return checked(load_image_folder(path), path)


def checked(data: Dataset, where: Path) -> Dataset:
    """Images a model can be trained on: some, of a real size, grey or colour."""
    n, channels, h, w = data.images.shape
    if n == 0 or h == 0 or w == 0:
        raise LegoError(f"{where}: no images of a usable size (found {n} of {h}x{w})")
    if channels not in (1, 3):
        raise LegoError(f"{where}: images must be grey (1 channel) or colour (3 channels), got {channels}")
    return data


def to_model_range(images_uint8):
    """uint8 pixels -> floats in [-1, 1] (works for NumPy arrays and torch tensors)."""
    return images_uint8 / 127.5 - 1
