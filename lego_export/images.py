"""Images in [-1, 1] to uint8, grids and PNG files (NumPy and Pillow only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lego_export.atomic import atomic_write
from lego_export.errors import LegoError


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.rint((images + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (rows * (H + pad) + pad, ..., C) uint8 picture."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = pixels[i]
    return grid


# Picture formats by file suffix; anything else is refused rather than written under a false name.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def image_format(path: str | Path, option: str = "--out") -> str:
    """The Pillow format a file name asks for; one-line LegoError for any other suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise LegoError(f"{option} {path}: write a picture as .png or .jpg (got {suffix or 'no suffix'!r})")
    return IMAGE_FORMATS[suffix]


def run_text(record: dict) -> dict[str, str]:
    """A PNG's text chunks saying what made it (the run record of lego-run and lego-serve)."""
    return {"Software": "lego-export", "lego-export": json.dumps(record, sort_keys=True)}


def picture_bytes(pixels: np.ndarray, fmt: str = "PNG", text: dict[str, str] | None = None) -> bytes:
    """An (H, W, C) uint8 picture as PNG or JPEG bytes; text goes into a PNG's text chunks (what made
    the picture), JPEG has none."""
    import io

    from PIL import Image, PngImagePlugin

    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    extra: dict[str, object] = {"quality": 95} if fmt == "JPEG" else {}
    if text and fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        extra["pnginfo"] = info
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **extra)
    return buffer.getvalue()


def save_image(pixels: np.ndarray, path: str | Path, text: dict[str, str] | None = None) -> None:
    """Write an (H, W, C) uint8 picture atomically, as PNG or JPEG by the file's suffix (picture_bytes)."""
    data = picture_bytes(pixels, image_format(path), text)
    with atomic_write(path) as f:
        f.write(data)
