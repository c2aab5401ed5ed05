"""TensorRT plans from the portable ONNX engines (TensorRT 10 / 11 Python API).

Not executed on the machines this project is developed on (no TensorRT, no GPU there): written
against the TensorRT Python API documentation, and refused cleanly where TensorRT or a GPU is
missing. Precision comes from the ONNX file (strongly typed network): TensorRT 11 has no FP16
builder flag, so an fp16 plan is built from the fp16 ONNX export.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lego_export.atomic import atomic_write
from lego_export.contract import resolve_shape
from lego_export.errors import LegoError
from lego_export.manifest import EngineFile, EngineSpec, Manifest, sha256_file
from lego_export.tensorrt_env import tensorrt_environment


def timing_cache_path(trt_version: str, capability: str) -> Path:
    """Where builds on this machine keep TensorRT's kernel timings, one file per TensorRT version and
    GPU architecture: a later build (any checkpoint, any output folder) starts from them."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lego-export"
    return root / f"tensorrt-{trt_version}-sm{capability.replace('.', '')}.timing-cache"


def profile_shapes(spec: EngineSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """min / opt / max shape of every input: only N varies."""
    lo, opt, hi = (spec.batch[key] for key in ("min", "opt", "max"))
    return {
        t.name: (resolve_shape(t.shape, lo), resolve_shape(t.shape, opt), resolve_shape(t.shape, hi))
        for t in spec.inputs
    }


def build_plan(
    onnx: bytes,
    name: str,
    plan_path: Path,
    spec: EngineSpec,
    cache_path: Path,
    version_compatible: bool = False,
    hardware_compatible: bool = False,
    workspace_gib: float = 4.0,
) -> None:
    """Parse ONNX (the file's checked bytes) into a strongly typed network, one optimisation profile
    over N, timing cache."""
    trt, _ = tensorrt_environment()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LegoError(f"TensorRT cannot parse {name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(spec).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LegoError(f"TensorRT failed to build a plan for {name} (see the messages above)")
    plan_path.write_bytes(bytes(serialized))
    with atomic_write(cache_path) as f:  # builds may run side by side
        f.write(bytes(config.get_timing_cache().serialize()))


def add_plans(
    manifest: Manifest,
    onnx_folder: Path,
    plan_folder: Path,
    progress: Callable[[str], None] = lambda _m: None,
    version_compatible: bool = False,
    hardware_compatible: bool = False,
) -> None:
    """Build a plan from every engine's portable ONNX file (in onnx_folder) into plan_folder, and
    record it in the manifest."""
    trt, capability = tensorrt_environment()
    cache = timing_cache_path(trt.__version__, capability)
    for i, spec in enumerate(manifest.engines):
        if spec.role == "decoder":  # dynamic latent size: stays on ONNX Runtime
            continue
        if "onnx" not in spec.files:
            raise LegoError(
                f"engines[{i}].files.onnx: missing ({spec.name} lists {', '.join(spec.files)}); "
                "TensorRT plans are built from the portable ONNX files"
            )
        source = spec.files["onnx"]
        plan_name = Path(source.path).with_suffix(".plan").name
        progress(f"{spec.name}: TensorRT plan")
        build_plan(
            manifest.read_engine_file(onnx_folder, source),  # build from what was verified
            source.path,
            plan_folder / plan_name,
            spec,
            cache,
            version_compatible,
            hardware_compatible,
        )
        spec.files["tensorrt"] = EngineFile(
            plan_name,
            sha256_file(plan_folder / plan_name),
            (plan_folder / plan_name).stat().st_size,
            source.precision,
            None,
            {
                "tensorrt": trt.__version__,
                "compute_capability": capability,
                "version_compatible": version_compatible,
                "hardware_compatible": hardware_compatible,
            },
        )
    manifest.toolchain["tensorrt"] = trt.__version__
