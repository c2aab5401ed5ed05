"""LEGO checkpoints: weights in .safetensors, the model config in the file's metadata.

No pickle anywhere: loading a checkpoint never runs code.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from lego_export.atomic import atomic_write
from lego_export.config import LegoConfig, valid_class_names
from lego_export.errors import LegoError
from lego_export.model import LegoModel

FORMAT = "lego-export/checkpoint"
FORMAT_VERSION = "1"


def save_checkpoint(path: str | Path, model: LegoModel, extra: dict | None = None) -> None:
    """Write model weights and config atomically; extra is stored as JSON metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.cfg.to_json()}
    if extra:
        metadata["extra"] = json.dumps(extra, sort_keys=True)
    from safetensors.torch import save

    with atomic_write(path) as f:
        f.write(save(state, metadata=metadata))


def read_header(path: str | Path) -> dict:
    """The JSON header of a .safetensors file: tensor names, dtypes, shapes, offsets, and metadata."""
    path = Path(path)
    if not path.is_file():
        raise LegoError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000 or length > path.stat().st_size - 8:
                raise ValueError("header length out of range")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise LegoError(f"{path} is not a readable .safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise LegoError(f"{path} is not a readable .safetensors file (header is not an object)")
    return header


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a LEGO .safetensors file, read from its JSON header alone (no weights loaded)."""
    metadata = read_header(path).get("__metadata__") or {}
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or "config" not in metadata:
        raise LegoError(f"{path} is a .safetensors file but not a LEGO checkpoint (no lego-export metadata)")
    for key, value in metadata.items():
        if not isinstance(value, str):  # safetensors metadata maps strings to strings
            raise LegoError(f"{path}: metadata field {key!r} is not a string")
    return metadata


# Far above any published LEGO geometry; a config past these is refused before anything is built.
MAX_FIELD = 1 << 16
MAX_TOTAL_DEPTH = 4096


def check_weights_match(path: str | Path, cfg: LegoConfig) -> None:
    """Refuse, before any allocation, a checkpoint whose tensors are not the ones its config implies.

    A file's config could claim any size: the model it describes is built on the meta device (shapes
    only, no memory) and compared with the tensors the file's header lists.
    """
    fields = [cfg.img_channels, cfg.img_resolution, cfg.num_classes, cfg.cond_dim]
    fields += [v for b in cfg.bricks for v in (b.size, b.patch, b.depth, b.width, b.heads)]
    if max(fields) > MAX_FIELD or sum(b.depth for b in cfg.bricks) > MAX_TOTAL_DEPTH:
        raise LegoError(f"{path}: the model config is beyond this tool's limits (a field above {MAX_FIELD})")
    with torch.device("meta"):
        expected = {k: list(v.shape) for k, v in LegoModel(cfg).state_dict().items()}
    header = read_header(path)
    found = {k: v.get("shape") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else f"shape of {wrong[0]}"
        raise LegoError(f"{path}: weights do not match the config stored in the file ({detail})")


def read_config(path: str | Path) -> LegoConfig:
    """The model config stored in a checkpoint, without loading its weights."""
    return LegoConfig.from_json(read_metadata(path)["config"])


def read_checkpoint(path: str | Path) -> tuple[LegoConfig, dict[str, torch.Tensor], dict]:
    """Return (config, state dict, extra metadata); one-line LegoError for anything not a LEGO checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    cfg = LegoConfig.from_json(metadata["config"])
    check_weights_match(path, cfg)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LegoError(f"{path} is not a readable .safetensors file ({e})") from None
    return cfg, state, read_extra(path, metadata)


def read_extra(path: str | Path, metadata: dict) -> dict:
    """The metadata field ``extra`` (training state, class names) as a JSON object; {} when absent;
    one-line LegoError naming the field when it is anything else."""
    text = metadata.get("extra", "{}")
    try:
        extra = json.loads(text) if isinstance(text, str) else None
    except ValueError as e:  # JSONDecodeError, and a NaN literal's overflow
        raise LegoError(f"{path}: metadata field 'extra' is not JSON ({e})") from None
    if not isinstance(extra, dict):
        raise LegoError(f"{path}: metadata field 'extra' is not a JSON object")
    return extra


def class_names(path: str | Path, num_classes: int) -> list[str]:
    """The class names a checkpoint was trained with (lego-train stores its data's), or [] when it has
    none that fit: anything else in its metadata is ignored, never trusted."""
    try:
        extra = read_extra(path, read_metadata(path))
    except LegoError:
        return []
    names = extra.get("class_names") if isinstance(extra, dict) else None
    return names if valid_class_names(names, num_classes) else []


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LegoModel:
    """Build the model a checkpoint describes and load its weights (strictly)."""
    cfg, state, _ = read_checkpoint(path)
    model = LegoModel(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise LegoError(f"{path}: weights do not match the config stored in the file ({first})") from None
    return model.to(device).eval()
