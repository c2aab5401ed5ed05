"""engines/manifest.json: the whole contract between the exporter and the runtime.

The runtime reads only this file and the engine files it lists: no model code, no checkpoint.
Torch-free on purpose.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lego_export.atomic import atomic_write
from lego_export.config import LegoConfig
from lego_export.errors import LegoError

# 2: the model entry is the full model config, EDM constants included (1 had a separate "edm").
SCHEMA_VERSION = 2
MANIFEST_FILE = "manifest.json"

# Formats an engine may come in. "onnx" is the portable graph (TensorRT and any ORT provider);
# "onnx-ort" uses ONNX Runtime contrib ops (fused attention) and only loads in ONNX Runtime;
# "tensorrt" is a serialized plan, tied to one GPU architecture and TensorRT version.
FORMATS = ("onnx", "onnx-ort", "tensorrt")


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: list[int | str]  # "N" marks the dynamic batch dimension


@dataclass
class EngineFile:
    path: str  # relative to the engines folder
    sha256: str
    bytes: int
    precision: str  # "fp32" or "fp16" (inside the graph; inputs and outputs stay fp32)
    verification: dict | None = None  # error against PyTorch, see export/verify.py
    build: dict = field(default_factory=dict)  # e.g. TensorRT version and GPU compute capability


@dataclass
class EngineSpec:
    name: str  # "embedder", "brick0", "brick1", ...
    role: str  # "embedder" or "brick"
    index: int | None  # brick position in the stack
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batch: dict[str, int]  # range of N: min, opt, max
    files: dict[str, EngineFile]  # format -> file

    def __post_init__(self) -> None:
        self.inputs = [t if isinstance(t, TensorSpec) else TensorSpec(**t) for t in self.inputs]
        self.outputs = [t if isinstance(t, TensorSpec) else TensorSpec(**t) for t in self.outputs]
        self.files = {k: f if isinstance(f, EngineFile) else EngineFile(**f) for k, f in self.files.items()}


@dataclass
class Manifest:
    model: LegoConfig  # bricks in order (size, patch, depth, width, heads), channels, classes, EDM constants
    source: dict  # checkpoint file name and sha256
    toolchain: dict  # exporter, opset and library versions
    engines: list[EngineSpec]
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = LegoConfig.from_dict(self.model)
        self.engines = [e if isinstance(e, EngineSpec) else EngineSpec(**e) for e in self.engines]

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def bricks(self) -> list[EngineSpec]:
        return sorted((e for e in self.engines if e.role == "brick"), key=lambda e: e.index)

    @property
    def embedder(self) -> EngineSpec:
        return next(e for e in self.engines if e.role == "embedder")

    def engine(self, name: str) -> EngineSpec:
        for e in self.engines:
            if e.name == name:
                return e
        raise LegoError(f"manifest has no engine named {name!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def write(self, folder: str | Path) -> Path:
        """Write manifest.json atomically."""
        path = Path(folder) / MANIFEST_FILE
        with atomic_write(path) as tmp:
            tmp.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """Load and validate folder/manifest.json; one-line LegoError when missing or corrupt."""
        folder = Path(folder)
        path = folder / MANIFEST_FILE if folder.is_dir() or not folder.suffix else folder
        if not path.is_file():
            raise LegoError(f"no engines found: {path} does not exist (build them with lego-export build)")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LegoError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            found = data.get("schema_version") if isinstance(data, dict) else None
            raise LegoError(
                f"{path}: unsupported manifest schema {found!r} (this version reads {SCHEMA_VERSION}); "
                "rebuild the engines with lego-export build --force"
            )
        try:
            manifest = cls(**data)
            manifest.embedder  # noqa: B018 - must exist
        except (TypeError, KeyError, StopIteration) as e:
            raise LegoError(f"{path} is not a valid LEGO manifest ({type(e).__name__}: {e})") from None
        except LegoError as e:
            raise LegoError(f"{path}: {e}") from None
        if len(manifest.bricks) != len(manifest.model.bricks):
            raise LegoError(
                f"{path}: lists {len(manifest.bricks)} brick engines for a model of {len(manifest.model.bricks)} bricks"
            )
        return manifest

    def check_files(self, folder: str | Path, formats: tuple[str, ...] = FORMATS) -> list[str]:
        """Problems with the engine files on disk (missing, or hash differs from the manifest)."""
        problems = []
        for engine in self.engines:
            for fmt, f in engine.files.items():
                if fmt not in formats:
                    continue
                path = Path(folder) / f.path
                if not path.is_file():
                    problems.append(f"{f.path}: missing")
                elif sha256_file(path) != f.sha256:
                    problems.append(f"{f.path}: sha256 differs from the manifest (modified or corrupt file)")
        return problems


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
