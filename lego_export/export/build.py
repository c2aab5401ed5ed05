"""lego-export build: checkpoint -> one engine per brick + the embedder + manifest.json.

Everything is built and verified in a staging folder beside the output (``.<name>.<pid>.<random>.lego-staging``
in its parent); only a build whose every engine passes verification is put in the output's place, in
one rename. A build killed at any point leaves the old folder, or none; the next build removes its
staging folder.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

import lego_export
from lego_export import contract
from lego_export.atomic import FolderBuild, build_folder, publish_folder
from lego_export.checkpoint import class_names, load_model
from lego_export.errors import LegoError
from lego_export.export import onnx as onnx_export
from lego_export.export import quantize
from lego_export.export.verify import measure_error, record_engine_inputs
from lego_export.jsonio import read_json
from lego_export.manifest import (
    MANIFEST_FILE,
    EngineFile,
    EngineSpec,
    LatentSpace,
    Manifest,
    Recommended,
    parse_recommended,
    sha256_file,
)
from lego_export.model import Brick, LegoModel
from lego_export.runtime.backends import OnnxRuntimeRunner  # the public runner, for verification only

RECORDED_IMAGES = 8


@dataclass
class BuildOptions:
    ckpt: str
    out: str = "engines"
    fp16: bool = False
    int8: bool = False  # also write int8 brick graphs (export/quantize.py) for CPU runtimes
    target: str = "onnx"  # "onnx" or "tensorrt"
    max_batch: int = 64  # images per engine call (CFG doubles a batch); bricks see this x tiles per image
    opt_batch: int = 32  # the batch TensorRT tunes for (16 images with guidance)
    opset: int = onnx_export.DEFAULT_OPSET
    verify: bool = True
    fuse: bool = True  # also write the ONNX Runtime-fused brick graphs
    force: bool = False
    vae: str | None = None  # latent models: a diffusers AutoencoderKL folder, exported as the decoder engine
    latent_scale: float | None = None  # default: the VAE config's scaling_factor
    recommended: str | None = None  # a setting `lego-export tune --save` wrote for this checkpoint


@dataclass
class EngineJob:
    spec: EngineSpec
    module: nn.Module  # what the engine must reproduce


def _brick_module(job: EngineJob) -> Brick:
    """A brick engine's module: engine_jobs pairs each brick's spec with the Brick itself."""
    return cast(Brick, job.module)


def engine_jobs(model: LegoModel, max_batch: int, opt_batch: int) -> list[EngineJob]:
    """The embedder and every brick, with the contract's tensors and their batch ranges."""
    cfg = model.cfg
    opt_batch = min(opt_batch, max_batch)
    images = {"min": 1, "opt": opt_batch, "max": max_batch}
    jobs = [
        EngineJob(
            EngineSpec("embedder", "embedder", None, *contract.embedder_tensors(cfg), images, {}),
            onnx_export.EmbedderGraph(model.embedder),
        )
    ]
    for k, brick in enumerate(model.bricks):
        tiles = (cfg.img_resolution // cfg.bricks[k].size) ** 2  # per image at the training resolution
        batch = {"min": 1, "opt": opt_batch * tiles, "max": max_batch * tiles}
        jobs.append(EngineJob(EngineSpec(f"brick{k}", "brick", k, *contract.brick_tensors(cfg, k), batch, {}), brick))
    return jobs


def example_inputs(spec: EngineSpec, n: int = 2) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(contract.resolve_shape(t.shape, n)) for t in spec.inputs)


def record_file(staging: Path, name: str, precision: str, verification: dict | None, **build) -> EngineFile:
    path = staging / name
    return EngineFile(name, sha256_file(path), path.stat().st_size, precision, verification, build)


def check_output_folder(out: Path, ckpt_sha: str, force: bool) -> Manifest | None:
    """Refuse to overwrite engines of another checkpoint, or a folder of other files, unless forced;
    return the old manifest."""
    if out.exists() and not out.is_dir():
        raise LegoError(f"--out {out} is a file; give a folder")
    if not (out / MANIFEST_FILE).exists():
        # Dotfiles and notes (*.md) are fine; anything else may be someone's files.
        entries = out.iterdir() if out.is_dir() else []
        others = sorted(p.name for p in entries if not p.name.startswith(".") and p.suffix != ".md")
        if others and not force:
            listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise LegoError(
                f"{out} is not an engines folder (it holds {listed}); "
                "choose an empty or new folder, or pass --force to write into it"
            )
        return None
    try:
        old = Manifest.read(out)
    except LegoError:
        if force:
            return None
        raise LegoError(f"{out} holds an unreadable {MANIFEST_FILE}; pass --force to overwrite it") from None
    if old.source.get("sha256") != ckpt_sha and not force:
        raise LegoError(
            f"{out} holds engines of another checkpoint ({old.source.get('checkpoint')}); "
            "pass --force to replace them or choose another --out"
        )
    return old


def read_recommended(path: str, ckpt_sha: str) -> Recommended:
    """The JSON `lego-export tune --save` wrote, checked, and tuned on these very weights."""
    file = Path(path)
    if not file.is_file():
        raise LegoError(f"--recommended {path}: no such file")
    data = read_json(file, 1 << 20, f"--recommended {path}", "recommended setting")
    recommended = parse_recommended(data, f"--recommended {path}")
    if recommended.checkpoint_sha256 != ckpt_sha:
        raise LegoError(f"--recommended {path} was tuned on other weights (its checkpoint_sha256 differs)")
    return recommended


def toolchain(opset: int) -> dict:
    import onnx
    import onnxruntime
    import polygraphy

    return {
        "lego_export": lego_export.__version__,
        "exporter": "torch.onnx.export (TorchScript tracer)",
        "opset": opset,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "polygraphy": polygraphy.__version__,
        "python": platform.python_version(),
    }


def engine_paths(manifest: Manifest | None) -> set[str]:
    return set() if manifest is None else {f.path for e in manifest.engines for f in e.files.values()}


def output_target(out: Path) -> Path:
    """The folder a build replaces: absolute, so that "." and "engines/" have a parent to stage in,
    and through a symlink, so that a linked folder is replaced where it lies."""
    return Path(os.path.abspath(out)).resolve()


def publish(build: FolderBuild, manifest: Manifest, old: Manifest | None) -> None:
    """Write the manifest into the staging folder and put that folder in the output's place, in one
    rename; the output's other files (notes, someone's files) are carried over, files only the old
    build listed are not."""
    manifest.write(build.staging)
    publish_folder(build, drop=engine_paths(old) - engine_paths(manifest))


def add_tensorrt_plans(
    folder: Path,
    progress: Callable[[str], None] = lambda _msg: None,
    version_compatible: bool = False,
    hardware_compatible: bool = False,
) -> Manifest:
    """lego-export build --from-onnx: TensorRT plans for an engines folder exported elsewhere, built in
    staging and published beside its ONNX files like any build."""
    from lego_export.export import tensorrt

    with build_folder(output_target(folder), "lego-export build") as staged:
        old = Manifest.read(folder)
        manifest = Manifest.read(folder)
        tensorrt.add_plans(manifest, folder, staged.staging, progress, version_compatible, hardware_compatible)
        publish(staged, manifest, old)
    return manifest


def build(opts: BuildOptions, progress: Callable[[str], None] = lambda _msg: None) -> Manifest:
    """Export, verify and publish every engine; returns the manifest written."""
    if opts.target not in ("onnx", "tensorrt"):
        raise LegoError(f"unknown target {opts.target!r}; use onnx or tensorrt")
    for name, value in (("--max-batch", opts.max_batch), ("--opt-batch", opts.opt_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
            raise LegoError(f"{name} must be between 1 and 65536, got {value!r}")
    onnx_export.check_opset(opts.opset)
    if opts.int8 and opts.fp16:
        raise LegoError(
            "--int8 and --fp16 do not combine: int8 is calibrated on the fp32 graphs for CPUs, fp16 is for "
            "GPUs; build them into separate folders"
        )
    if opts.int8 and opts.target == "tensorrt":
        raise LegoError(
            "--int8 writes CPU graphs (uint8 activations, calibrated for ONNX Runtime and OpenVINO) that "
            "TensorRT does not take; build the TensorRT plans without --int8"
        )
    ckpt = Path(opts.ckpt)
    model = load_model(ckpt).float()
    ckpt_sha = sha256_file(ckpt)
    out = Path(opts.out)
    check_output_folder(out, ckpt_sha, opts.force)  # before any work; again under the lock below
    recommended = read_recommended(opts.recommended, ckpt_sha) if opts.recommended else None

    vae = latent_space = None
    if opts.vae is not None:
        from lego_export.export.vae import load_vae

        vae, latent_space = load_vae(opts.vae, opts.latent_scale, model.cfg.img_channels)
    elif opts.latent_scale is not None:
        raise LegoError("--latent-scale goes with --vae")

    precision = "fp16" if opts.fp16 else "fp32"
    # A few canvases give every brick thousands of real tiles; larger N are drawn from them.
    recorded = record_engine_inputs(model, min(opts.max_batch, RECORDED_IMAGES)) if opts.verify else {}
    calibration = {}
    if opts.int8:  # more canvases than for verification, and other ones (see quantize.py)
        calibration = record_engine_inputs(model, quantize.CALIBRATION_IMAGES, seed=quantize.CALIBRATION_SEED)
    with build_folder(output_target(out), "lego-export build") as staged:
        staging = staged.staging
        old = check_output_folder(out, ckpt_sha, opts.force)
        if recommended is None and old is not None and old.recommended is not None:
            # A rebuild of the same weights keeps the tuned setting; other weights need tuning again.
            if old.recommended.checkpoint_sha256 == ckpt_sha:
                recommended = old.recommended
        jobs = engine_jobs(model, opts.max_batch, opts.opt_batch)
        for job in jobs:
            spec = job.spec
            start = time.perf_counter()
            progress(f"{spec.name}: export")
            # The embedder is a few small layers on N vectors: it always stays fp32.
            engine_precision = precision if spec.role == "brick" else "fp32"
            formats = {"onnx": (f"{spec.name}.onnx", engine_precision)}
            _export_portable(job, staging / f"{spec.name}.onnx", opts)
            if opts.fuse and not opts.fp16 and spec.role == "brick":
                formats["onnx-ort"] = (f"{spec.name}.ort.onnx", "fp32")
                progress(f"{spec.name}: ONNX Runtime fusions")
                onnx_export.export_onnxruntime_fused(
                    _brick_module(job), example_inputs(spec), staging / formats["onnx-ort"][0], opts.opset
                )
            if opts.int8 and spec.role == "brick":
                formats["onnx-int8"] = (f"{spec.name}.int8.onnx", "int8")
                progress(f"{spec.name}: int8 calibration and quantization")
                int8_path = staging / formats["onnx-int8"][0]
                quantize.export_int8(
                    _brick_module(job), example_inputs(spec), calibration[spec.name], int8_path, opts.opset
                )
            for fmt, (name, prec) in formats.items():
                verification = None
                if opts.verify:
                    progress(f"{spec.name}: verify {name}")
                    verification = measure_error(job.module, OnnxRuntimeRunner(staging / name), spec, prec, recorded)
                    if not verification["passed"]:
                        raise LegoError(
                            f"{name}: error {verification['relative_error']:.2e} of the output scale exceeds the "
                            f"{prec} tolerance {verification['tolerance']:.0e}; nothing was written to {out}"
                        )
                build_info = quantize.build_record() if fmt == "onnx-int8" else {}
                spec.files[fmt] = record_file(staging, name, prec, verification, **build_info)
            spec.files["onnx"].build["export_seconds"] = round(time.perf_counter() - start, 2)

        engines = [job.spec for job in jobs]
        latent: LatentSpace | None = None
        if vae is not None:
            decoder, latent = _export_decoder(vae, latent_space, model.cfg, staging, opts, progress)
            engines.append(decoder)
        manifest = Manifest(
            model=model.cfg,
            source={"checkpoint": ckpt.name, "sha256": ckpt_sha},
            toolchain=toolchain(opts.opset),
            engines=engines,
            latent=latent,
            recommended=recommended,
            class_names=class_names(ckpt, model.cfg.num_classes),
        )
        trt_error = None
        if opts.target == "tensorrt":
            from lego_export.export import tensorrt

            try:
                tensorrt.add_plans(manifest, staging, staging, progress=progress)
            except LegoError as e:
                trt_error = e  # keep the ONNX engines, then report
        progress("publish")
        if not staged.target_locked:  # the output appeared during the build: check it again, under its lock
            staged.lock_target()
            old = check_output_folder(out, ckpt_sha, opts.force)
        publish(staged, manifest, old)
    if trt_error is not None:
        raise LegoError(f"{trt_error} (the ONNX engines and manifest were written to {out})")
    return manifest


def _export_decoder(
    vae, latent: LatentSpace, cfg, staging: Path, opts: BuildOptions, progress
) -> tuple[EngineSpec, LatentSpace]:
    """The latent model's decoder engine, exported and verified against diffusers."""
    from lego_export.export import vae as vae_export

    spec = vae_export.decoder_spec(cfg.img_channels, latent, opts.max_batch, opts.opt_batch)
    graph = vae_export.DecoderGraph(vae, latent.scale)
    progress("decoder: export")
    vae_export.export_decoder(graph, spec, cfg.img_resolution, staging / "decoder.onnx", opts.opset)
    verification = None
    if opts.verify:
        progress("decoder: verify decoder.onnx")
        runner = OnnxRuntimeRunner(staging / "decoder.onnx")
        verification = vae_export.measure_decoder_error(graph, runner, spec, cfg.img_resolution)
        if not verification["passed"]:
            raise LegoError(
                f"decoder.onnx: error {verification['relative_error']:.2e} of the output scale exceeds the "
                f"tolerance {verification['tolerance']:.0e}; nothing was written to {opts.out}"
            )
    spec.files["onnx"] = record_file(staging, "decoder.onnx", "fp32", verification)
    return spec, latent


def _export_portable(job: EngineJob, path: Path, opts: BuildOptions) -> None:
    spec = job.spec
    names_in = [t.name for t in spec.inputs]
    names_out = [t.name for t in spec.outputs]
    onnx_export.export_module(job.module, example_inputs(spec), names_in, names_out, path, opts.opset)
    onnx_export.clean_graph(path)
    if opts.fp16 and spec.role == "brick":
        onnx_export.convert_fp16(path, path)
