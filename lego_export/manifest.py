"""engines/manifest.json: the whole contract between the exporter and the runtime.

The runtime reads only this file and the engine files it lists: no model code, no checkpoint.
Torch-free on purpose.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from lego_export import contract
from lego_export.atomic import atomic_write
from lego_export.config import BrickConfig, LegoConfig, valid_class_names
from lego_export.contract import TensorSpec
from lego_export.edm import SAMPLERS, EDMConfig
from lego_export.errors import LegoError
from lego_export.jsonio import read_json
from lego_export.options import GUIDANCE_FIELDS, MAX_STEPS, SamplingOptions
from lego_export.points import POINT_NAME, QUALITY_WORDS

# 2: the model entry is the full model config, EDM constants included (1 had a separate "edm").
SCHEMA_VERSION = 2
MANIFEST_FILE = "manifest.json"

# Formats an engine may come in. "onnx" is the portable graph (TensorRT and any ORT provider);
# "onnx-ort" uses ONNX Runtime contrib ops (fused attention) and only loads in ONNX Runtime;
# "tensorrt" is a serialized plan, tied to one GPU architecture and TensorRT version; "onnx-int8" is a
# brick graph with int8 matrix products (QDQ, export/quantize.py) for CPU runtimes.
ENGINE_FORMATS = ("onnx", "onnx-ort", "tensorrt", "onnx-int8")
FILE_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class EngineFile:
    path: str  # relative to the engines folder
    sha256: str
    bytes: int
    precision: str  # "fp32", "fp16" or "int8" (inside the graph; inputs and outputs stay fp32)
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
class LatentSpace:
    """The model samples latents; the "decoder" engine turns them into images: x = decode(z / scale)."""

    scale: float  # latents are the autoencoder's, times this (0.18215 for the Stable Diffusion VAE)
    factor: int  # image side / latent side
    image_channels: int


@dataclass
class Rung:
    """One operating point of the quality ladder below the recommended setting: cheaper than the one
    above it, at a measured cost in quality (``measured``: FID, class accuracy, brick FLOPs)."""

    options: SamplingOptions
    measured: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**_options_dict(self.options), "measured": self.measured}


def _options_dict(o: SamplingOptions) -> dict:
    """A setting's flat JSON form (the recommended setting and the ladder's rungs)."""
    d = {
        "sampler": o.sampler,
        "steps": o.steps,
        "skip_policy": "" if o.skip == "none" else o.skip,
        "reuse_residual": o.reuse_residual,
    }
    if o.guidance != 1.0:  # written only when set, so settings without guidance read as before
        d.update(guidance=o.guidance, guidance_interval=o.guidance_interval)
    default = SamplingOptions()
    d.update({name: getattr(o, name) for name in _CACHE_FIELDS if getattr(o, name) != getattr(default, name)})
    return d


@dataclass
class Recommended:
    """The sampling options `lego-export tune` chose for this model, and what it measured choosing them.

    lego-run, lego-serve and the Python API use them when no trajectory option is given
    (options.resolve); ``measured`` is for people (FID, budget, FLOPs). The JSON form is flat:
    sampler, steps, skip_policy ("k@lo:hi,..."; "" is the full chain) and reuse_residual, and
    where the setting guides, guidance and guidance_interval ("lo:hi" or null: every step).
    ``points`` (optional; absent in manifests written before it): the tuner's named points
    (best, balanced, fast), each a setting in the same form, that lego-run --quality, the Python
    API's quality= and lego-serve's "quality" select by name.
    """

    options: SamplingOptions
    checkpoint_sha256: str  # the weights it was tuned on
    measured: dict = field(default_factory=dict)
    ladder: list[Rung] = field(default_factory=list)  # cheaper settings for a server under load, cheapest last
    points: dict[str, Rung] = field(default_factory=dict)  # named points of the frontier, by name

    def describe(self) -> str:
        return self.options.describe()

    @property
    def rungs(self) -> list[SamplingOptions]:
        """The ladder from the top: rung 0 is the recommended setting itself."""
        return [self.options, *(r.options for r in self.ladder)]

    def to_dict(self) -> dict:
        d = {**_options_dict(self.options), "checkpoint_sha256": self.checkpoint_sha256, "measured": self.measured}
        if self.ladder:
            d["ladder"] = [r.to_dict() for r in self.ladder]
        if self.points:
            d["points"] = {name: r.to_dict() for name, r in self.points.items()}
        return d


@dataclass(kw_only=True)
class Manifest:
    model: LegoConfig  # bricks in order (size, patch, depth, width, heads), channels, classes, EDM constants
    source: dict  # checkpoint file name and sha256
    toolchain: dict  # exporter, opset and library versions
    engines: list[EngineSpec]
    schema_version: int = SCHEMA_VERSION
    latent: LatentSpace | None = None  # set when the model works in an autoencoder's latent space
    recommended: Recommended | None = None  # written by lego-export tune
    class_names: list[str] = field(default_factory=list)  # one per class, from the checkpoint; [] if none

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def bricks(self) -> list[EngineSpec]:
        return sorted((e for e in self.engines if e.role == "brick"), key=lambda e: e.index)

    @property
    def embedder(self) -> EngineSpec:
        return next(e for e in self.engines if e.role == "embedder")

    @property
    def decoder(self) -> EngineSpec | None:
        return next((e for e in self.engines if e.role == "decoder"), None)

    def engine(self, name: str) -> EngineSpec:
        for e in self.engines:
            if e.name == name:
                return e
        raise LegoError(f"manifest has no engine named {name!r}")

    def to_json(self) -> str:
        d = asdict(self)
        d["recommended"] = None if self.recommended is None else self.recommended.to_dict()
        return json.dumps(d, indent=2) + "\n"

    def write(self, folder: str | Path) -> Path:
        """Write manifest.json atomically."""
        path = Path(folder) / MANIFEST_FILE
        with atomic_write(path) as f:
            f.write(self.to_json().encode())
        return path

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """Load and validate folder/manifest.json; one-line LegoError naming the bad field."""
        if not isinstance(folder, str | os.PathLike):
            raise TypeError(f"folder must be a path (str or Path), got {type(folder).__name__} {folder!r:.60}")
        folder = Path(folder)
        path = folder / MANIFEST_FILE if folder.is_dir() or not folder.suffix else folder
        if not path.exists():
            raise LegoError(f"no engines found: {path} does not exist (build them with lego-export build)")
        data = read_json(path, MAX_MANIFEST_BYTES, str(path), "manifest")
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            found = data.get("schema_version") if isinstance(data, dict) else None
            raise LegoError(
                f"{path}: unsupported manifest schema {found!r} (this version reads {SCHEMA_VERSION}); "
                "rebuild the engines with lego-export build --force"
            )
        return parse_manifest(data, str(path))

    def read_engine_file(self, folder: str | Path, file: EngineFile) -> bytes:
        """The bytes of one engine file, read once and checked against the manifest's size and sha256.

        Backends load these bytes, never the path again, so what runs is what was checked. A symlink
        is refused: the file must be the folder's own.
        """
        path = Path(folder) / file.path  # a plain name: checked by parse_manifest
        try:
            # non-blocking: a FIFO put in a file's place is refused below, never waited on
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise LegoError(f"{file.path}: missing") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise LegoError(f"{file.path}: is a symbolic link; engine files must be plain files") from None
            raise LegoError(f"{file.path}: cannot be read ({e.strerror})") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise LegoError(f"{file.path}: not a regular file")
            data = f.read(file.bytes + 1)  # never more than the manifest announced
        if len(data) != file.bytes or hashlib.sha256(data).hexdigest() != file.sha256:
            raise LegoError(f"{file.path}: sha256 differs from the manifest (modified or corrupt file)")
        return data

    def check_files(self, folder: str | Path, formats: tuple[str, ...] = ENGINE_FORMATS) -> list[str]:
        """Problems with the engine files on disk (missing, not a plain file, hash differs)."""
        problems = []
        for engine in self.engines:
            for fmt, f in engine.files.items():
                if fmt in formats:
                    try:
                        self.read_engine_file(folder, f)
                    except LegoError as e:
                        problems.append(str(e))
        return problems


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The schema: every field's type and range, checked before anything is used. Errors name the field.

MAX_MANIFEST_BYTES = 16 << 20
MAX_ENGINE_BYTES = 64 << 30
MAX_BATCH = 1 << 24  # tiles per engine call
MAX_DIM = 1 << 16
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")  # no separators, no "..", not hidden
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TOP_FIELDS = {"schema_version", "model", "source", "toolchain", "engines", "latent", "recommended", "class_names"}
_SKIP_SPEC = re.compile(r"^[0-9@:.,eE+\-]{0,200}$")
_SYMBOLIC_DIM = re.compile(r"^([1-9][0-9]{0,2})?[HW]$")  # a decoder's latent height/width, times a factor


def _obj(value, where: str, keys: set[str] | None = None, required: set[str] | None = None) -> dict:
    if not isinstance(value, dict):
        raise LegoError(f"{where}: expected an object, got {type(value).__name__}")
    if keys is not None and set(value) - keys:
        raise LegoError(f"{where}: unknown field {sorted(set(value) - keys)[0]!r}")
    missing = (required if required is not None else keys or set()) - set(value)
    if missing:
        raise LegoError(f"{where}: missing field {sorted(missing)[0]!r}")
    return value


def _int(value, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise LegoError(f"{where}: expected an integer from {lo} to {hi}, got {value!r}")
    return value


def _str(value, where: str, pattern: re.Pattern | None = None, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or (pattern and not pattern.match(value)) or (choices and value not in choices):
        expected = (
            f"one of {', '.join(choices)}"
            if choices
            else "a plain file name in the engines folder"
            if (pattern is _PLAIN_NAME)
            else "a sha256 hex digest"
            if pattern is _SHA256
            else "a string"
        )
        raise LegoError(f"{where}: expected {expected}, got {value!r}")
    return value


def _finite_tree(value, where: str) -> None:
    """Free-form fields (toolchain, build, verification) hold only plain JSON with finite numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        raise LegoError(f"{where}: not a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite_tree(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite_tree(v, f"{where}[{i}]")


def _tensor(value, where: str) -> TensorSpec:
    t = _obj(value, where, {"name", "dtype", "shape"})
    shape = t["shape"]
    if not isinstance(shape, list) or not shape or shape[0] != "N":
        raise LegoError(f'{where}.shape: expected a list starting with the dynamic dimension "N"')
    for i, d in enumerate(shape[1:], 1):
        if not (isinstance(d, str) and _SYMBOLIC_DIM.match(d)):
            _int(d, f"{where}.shape[{i}]", 1, MAX_DIM)
    return TensorSpec(
        _str(t["name"], f"{where}.name", _PLAIN_NAME), _str(t["dtype"], f"{where}.dtype", None, ("float32",)), shape
    )


def _file(value, where: str) -> EngineFile:
    f = _obj(
        value,
        where,
        {"path", "sha256", "bytes", "precision", "verification", "build"},
        {"path", "sha256", "bytes", "precision"},
    )
    verification, build = f.get("verification"), f.get("build", {})
    if verification is not None:
        _obj(verification, f"{where}.verification")
    _obj(build, f"{where}.build")
    _finite_tree(verification, f"{where}.verification")
    _finite_tree(build, f"{where}.build")
    return EngineFile(
        _str(f["path"], f"{where}.path", _PLAIN_NAME),
        _str(f["sha256"], f"{where}.sha256", _SHA256),
        _int(f["bytes"], f"{where}.bytes", 1, MAX_ENGINE_BYTES),
        _str(f["precision"], f"{where}.precision", None, FILE_PRECISIONS),
        verification,
        build,
    )


def _engine(value, where: str, num_bricks: int) -> EngineSpec:
    e = _obj(value, where, {"name", "role", "index", "inputs", "outputs", "batch", "files"})
    role = _str(e["role"], f"{where}.role", None, ("embedder", "brick", "decoder"))
    index = None if role != "brick" else _int(e["index"], f"{where}.index", 0, max(num_bricks - 1, 0))
    if role != "brick" and e["index"] is not None:
        raise LegoError(f"{where}.index: only bricks have an index")
    batch = _obj(e["batch"], f"{where}.batch", {"min", "opt", "max"})
    lo, opt, hi = (_int(batch[k], f"{where}.batch.{k}", 1, MAX_BATCH) for k in ("min", "opt", "max"))
    if not lo <= opt <= hi:
        raise LegoError(f"{where}.batch: expected min <= opt <= max, got {lo}, {opt}, {hi}")
    files = _obj(e["files"], f"{where}.files")
    if not files:
        raise LegoError(f"{where}.files: lists no file")
    for fmt in files:
        _str(fmt, f"{where}.files key", None, ENGINE_FORMATS)
    if role == "decoder" and "onnx" not in files:  # the decoder runs on ONNX Runtime under every backend
        raise LegoError(f"{where}.files.onnx: missing; a decoder's portable ONNX file is required")
    for key in ("inputs", "outputs"):
        if not isinstance(e[key], list) or not e[key]:
            raise LegoError(f"{where}.{key}: expected a non-empty list")
    return EngineSpec(
        _str(e["name"], f"{where}.name", _PLAIN_NAME),
        role,
        index,
        [_tensor(t, f"{where}.inputs[{i}]") for i, t in enumerate(e["inputs"])],
        [_tensor(t, f"{where}.outputs[{i}]") for i, t in enumerate(e["outputs"])],
        {"min": lo, "opt": opt, "max": hi},
        {fmt: _file(f, f"{where}.files.{fmt}") for fmt, f in files.items()},
    )


def _field_names(kind) -> set[str]:
    return {f.name for f in fields(kind)}


def parse_manifest(data, where: str = MANIFEST_FILE) -> Manifest:
    """A Manifest from its JSON form, every field checked; one-line LegoError naming the first bad one."""
    d = _obj(data, where, _TOP_FIELDS, _TOP_FIELDS - {"latent", "recommended", "class_names"})
    _int(d["schema_version"], f"{where}: schema_version", SCHEMA_VERSION, SCHEMA_VERSION)
    model = _obj(d["model"], f"{where}: model", _field_names(LegoConfig), _field_names(LegoConfig))
    _obj(model["edm"], f"{where}: model.edm", _field_names(EDMConfig), _field_names(EDMConfig))
    if not isinstance(model["bricks"], list):
        raise LegoError(f"{where}: model.bricks: expected a list")
    for i, brick in enumerate(model["bricks"]):
        _obj(brick, f"{where}: model.bricks[{i}]", _field_names(BrickConfig), _field_names(BrickConfig))
    _finite_tree(model, f"{where}: model")
    try:
        cfg = LegoConfig.from_dict(model)
    except LegoError as e:
        raise LegoError(f"{where}: model: {e}") from None
    source = _obj(d["source"], f"{where}: source", {"checkpoint", "sha256"})
    _str(source["checkpoint"], f"{where}: source.checkpoint")
    _str(source["sha256"], f"{where}: source.sha256", _SHA256)
    _obj(d["toolchain"], f"{where}: toolchain")
    _finite_tree(d["toolchain"], f"{where}: toolchain")
    if not isinstance(d["engines"], list):
        raise LegoError(f"{where}: engines: expected a list")
    engines = [_engine(e, f"{where}: engines[{i}]", len(cfg.bricks)) for i, e in enumerate(d["engines"])]

    latent = None
    if d.get("latent") is not None:
        spec = _obj(d["latent"], f"{where}: latent", {"scale", "factor", "image_channels"})
        scale = spec["scale"]
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
            raise LegoError(f"{where}: latent.scale: expected a finite positive number, got {scale!r}")
        factor = _int(spec["factor"], f"{where}: latent.factor", 1, 64)
        latent = LatentSpace(
            float(scale), factor, _int(spec["image_channels"], f"{where}: latent.image_channels", 1, 4)
        )

    # The engines must be the model's: one embedder, each brick once and a decoder exactly when the
    # model is latent, with the contract's tensors.
    expected = {"embedder": contract.embedder_tensors(cfg)}
    expected.update({f"brick{k}": contract.brick_tensors(cfg, k) for k in range(len(cfg.bricks))})
    if latent is not None:
        expected["decoder"] = contract.decoder_tensors(cfg.img_channels, latent.image_channels, latent.factor)
    names = [e.name for e in engines]
    if sorted(names) != sorted(expected):
        raise LegoError(f"{where}: engines: expected {', '.join(expected)}, found {', '.join(names) or 'none'}")
    for engine in engines:
        name = engine.name
        role, index = (name, None) if name in ("embedder", "decoder") else ("brick", int(name[5:]))
        tensors = tuple(list(t) for t in expected[name])
        if (engine.role, engine.index) != (role, index) or (engine.inputs, engine.outputs) != tensors:
            raise LegoError(f"{where}: engines.{name}: role, index or tensors differ from the model's engine contract")
    paths = [f.path for e in engines for f in e.files.values()]
    if len(set(paths)) != len(paths) or MANIFEST_FILE in paths:
        raise LegoError(f"{where}: engines: two entries name the same file")
    recommended = None if d.get("recommended") is None else parse_recommended(d["recommended"], f"{where}: recommended")
    for rung, options in enumerate(recommended.rungs if recommended else []):
        try:  # here, so that a bad value is reported as the manifest's, not as a flag the user gave
            options.validate(cfg)
        except LegoError as e:
            at = "" if rung == 0 else f".ladder[{rung - 1}]"
            raise LegoError(f"{where}: recommended{at}: {e}") from None
    for name, point in (recommended.points if recommended else {}).items():
        try:
            point.options.validate(cfg)
        except LegoError as e:
            raise LegoError(f"{where}: recommended.points.{name}: {e}") from None
    names = d.get("class_names", [])
    if names != [] and not valid_class_names(names, cfg.num_classes):
        shown = repr(names)[:120]
        raise LegoError(
            f"{where}: class_names: expected one distinct name for each of {cfg.num_classes} classes, got {shown}"
        )
    return Manifest(
        model=cfg,
        source=dict(source),
        toolchain=dict(d["toolchain"]),
        engines=engines,
        schema_version=SCHEMA_VERSION,
        latent=latent,
        recommended=recommended,
        class_names=names,
    )


_SETTING_FIELDS = {"sampler", "steps", "skip_policy", "reuse_residual", "measured"}
_GUIDANCE_FIELDS = set(GUIDANCE_FIELDS)  # optional, named as the options are: absent is no guidance
# The brick cache (options.py), optional like guidance: absent is the option's default (no cache).
_CACHE_FIELDS = ("cache", "forecast", "gate", "gate_signal", "guidance_cache")
_CACHE_TYPES: dict[str, tuple[str, tuple[type, ...]]] = {
    "cache": ("a string", (str,)), "forecast": ("an integer", (int,)), "gate": ("a number", (int, float)),
    "gate_signal": ("a string", (str,)), "guidance_cache": ("a string", (str,)),
}  # fmt: skip
_OPTIONAL_FIELDS = _GUIDANCE_FIELDS | set(_CACHE_FIELDS)
MAX_RUNGS = 16


def parse_recommended(value, where: str) -> Recommended:
    """A Recommended from its JSON form (a manifest's section, or the file `lego-export tune --save` wrote)."""
    also = {"checkpoint_sha256", "ladder", "points"}
    r = _obj(value, where, _SETTING_FIELDS | _OPTIONAL_FIELDS | also, _SETTING_FIELDS | {"checkpoint_sha256"})
    sha = _str(r["checkpoint_sha256"], f"{where}.checkpoint_sha256", _SHA256)
    ladder = r.get("ladder", [])
    if not isinstance(ladder, list) or len(ladder) > MAX_RUNGS:
        raise LegoError(f"{where}.ladder: expected a list of at most {MAX_RUNGS} settings")
    rungs = [_rung(v, f"{where}.ladder[{i}]") for i, v in enumerate(ladder)]
    points = _obj(r.get("points", {}), f"{where}.points")
    if len(points) > MAX_RUNGS:
        raise LegoError(f"{where}.points: expected at most {MAX_RUNGS} named settings")
    for name in points:
        if not POINT_NAME.match(name) or name in QUALITY_WORDS:
            raise LegoError(f"{where}.points: {name[:40]!r} is not a point name (lower-case letters, digits, - and _)")
    named = {name: _rung(v, f"{where}.points.{name}") for name, v in points.items()}
    top = _rung(r, where, frozenset(also))
    return Recommended(top.options, sha, top.measured, rungs, named)


def _rung(value, where: str, also: frozenset = frozenset()) -> Rung:
    r = _obj(value, where, _SETTING_FIELDS | _OPTIONAL_FIELDS | also, _SETTING_FIELDS)
    _finite_tree(_obj(r["measured"], f"{where}.measured"), f"{where}.measured")
    if not isinstance(r["reuse_residual"], bool):
        raise LegoError(f"{where}.reuse_residual: expected true or false, got {r['reuse_residual']!r}")
    if not isinstance(r["skip_policy"], str) or not _SKIP_SPEC.match(r["skip_policy"]):
        raise LegoError(f"{where}.skip_policy: expected rules like '2@0.5:', got {r['skip_policy']!r}")
    options = SamplingOptions(
        sampler=_str(r["sampler"], f"{where}.sampler", None, SAMPLERS),
        steps=_int(r["steps"], f"{where}.steps", 1, MAX_STEPS),
        skip=r["skip_policy"] or "none",
        reuse_residual=r["reuse_residual"],
    )
    if "guidance" in r:
        guidance, interval = r["guidance"], r.get("guidance_interval")
        if isinstance(guidance, bool) or not isinstance(guidance, int | float):
            raise LegoError(f"{where}.guidance: expected a number, got {guidance!r}")
        if interval is not None and not isinstance(interval, str):
            raise LegoError(f"{where}.guidance_interval: expected 'LO:HI' or null, got {interval!r}")
        options = replace(options, guidance=float(guidance), guidance_interval=interval)
    elif "guidance_interval" in r:
        raise LegoError(f"{where}.guidance_interval: given without guidance")
    cache = {name: r[name] for name in _CACHE_FIELDS if name in r}
    for name, value in cache.items():
        kind, types = _CACHE_TYPES[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise LegoError(f"{where}.{name}: expected {kind}, got {value!r}")
    return Rung(replace(options, **cache), dict(r["measured"]))
