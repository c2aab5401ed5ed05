"""lego-export: build, inspect and verify brick engines (lego-run lives in lego_export/runtime/cli.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from lego_export.cli_common import CONTEXT, check_interrupted, one_line_errors
from lego_export.errors import LegoError


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="lego-export", prog_name="lego-export")
def export_main() -> None:
    """Export a LEGO checkpoint as one engine per brick plus the conditioning embedder.

    \b
    lego-export build --ckpt checkpoints/fmnist-pg-s.safetensors --out engines/
    lego-export inspect engines/
    lego-export verify engines/ --ckpt checkpoints/fmnist-pg-s.safetensors
    """


class _Progress:
    """A bar over engines whose label follows the current step."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="engine", file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)
        self.current: str | None = None  # the engine the bar's description names

    def __call__(self, message: str) -> None:
        check_interrupted()  # a signal whose exception native code swallowed still ends the build here
        engine = message.split(":")[0]
        if self.current is not None and engine != self.current:
            self.bar.update(1)
        self.current = engine
        self.bar.set_description(message)

    def close(self) -> None:
        self.bar.close()


@export_main.command()
@click.option("--ckpt", type=click.Path(dir_okay=False), help="LEGO checkpoint (.safetensors) to export.")
@click.option(
    "--from-onnx",
    "from_onnx",
    type=click.Path(file_okay=False),
    help="Instead of --ckpt: an engines folder exported elsewhere; builds TensorRT plans from its ONNX files.",
)
@click.option("--out", default="engines", show_default=True, help="Output folder (manifest.json + engine files).")
@click.option(
    "--fp16",
    is_flag=True,
    help="Half-precision matrix products for GPU targets; LayerNorm, softmax, adaLN modulation, gates "
    "and residual adds stay fp32, inputs and outputs fp32. No faster on CPUs.",
)
@click.option(
    "--int8",
    is_flag=True,
    help="Also write int8 brick graphs (brickK.int8.onnx) for CPUs: static quantization calibrated on the "
    "model's own chain inputs, verified against PyTorch; attention products, adaLN and the final "
    "projection stay fp32. Run them with lego-run --precision int8.",
)
@click.option(
    "--target",
    type=click.Choice(["onnx", "tensorrt"]),
    default="onnx",
    show_default=True,
    help="onnx: portable ONNX (+ ONNX Runtime-fused bricks). tensorrt: also a TensorRT plan per engine "
    "(needs TensorRT and an NVIDIA GPU).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 65536),
    default=64,
    show_default=True,
    help="Most images per engine call (guidance doubles a batch); a brick's N range is this times its "
    "tiles per image at the training resolution. Larger canvases are run in chunks.",
)
@click.option(
    "--opt-batch",
    type=click.IntRange(1, 65536),
    default=32,
    show_default=True,
    help="Images per call TensorRT optimises for.",
)
@click.option("--opset", default=17, show_default=True, help="ONNX opset (14 to 20).")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against PyTorch (not recommended).")
@click.option("--no-fuse", is_flag=True, help="Do not write the ONNX Runtime-fused brick graphs (*.ort.onnx).")
@click.option("--version-compatible", is_flag=True, help="TensorRT: plans that load in later TensorRT versions.")
@click.option("--hardware-compatible", is_flag=True, help="TensorRT: plans that run on any Ampere-or-newer GPU.")
@click.option(
    "--vae",
    type=click.Path(file_okay=False),
    help="Latent models: a local diffusers AutoencoderKL folder (e.g. the Stable Diffusion VAE); its "
    "decoder becomes the 'decoder' engine that lego-run turns latents into images with.",
)
@click.option(
    "--latent-scale",
    type=float,
    default=None,
    help="With --vae: latents = VAE latents x this [default: the VAE config's scaling_factor, 0.18215 for SD].",
)
@click.option(
    "--recommended",
    type=click.Path(dir_okay=False),
    default=None,
    help="Attach a sampling setting that lego-export tune --save wrote for this checkpoint "
    "[default: keep the one in --out when rebuilding the same checkpoint].",
)
@click.option("--force", is_flag=True, help="Replace engines of another checkpoint in --out.")
@one_line_errors()
def build(
    ckpt,
    from_onnx,
    out,
    fp16,
    int8,
    target,
    max_batch,
    opt_batch,
    opset,
    no_verify,
    no_fuse,
    version_compatible,
    hardware_compatible,
    vae,
    latent_scale,
    recommended,
    force,
) -> None:
    """Export every brick and the embedder, verify them against PyTorch, write manifest.json."""
    if from_onnx:
        if int8:
            raise LegoError("--int8 needs --ckpt: its calibration runs the PyTorch model")
        _plans_from_onnx(
            Path(from_onnx),
            Path(out) if out != "engines" else Path(from_onnx),
            target,
            version_compatible,
            hardware_compatible,
        )
        return
    if not ckpt:
        raise LegoError("give --ckpt CHECKPOINT (or --from-onnx ENGINES --target tensorrt)")
    from lego_export.export.build import BuildOptions
    from lego_export.export.build import build as run_build

    opts = BuildOptions(
        ckpt=ckpt,
        out=out,
        fp16=fp16,
        int8=int8,
        target=target,
        max_batch=max_batch,
        opt_batch=opt_batch,
        opset=opset,
        verify=not no_verify,
        fuse=not no_fuse,
        force=force,
        vae=vae,
        latent_scale=latent_scale,
        recommended=recommended,
    )
    start = time.perf_counter()
    progress = _Progress(total=1 + _brick_count(ckpt) + (vae is not None))
    try:
        manifest = run_build(opts, progress)
    finally:
        progress.close()
    click.echo(_manifest_table(manifest, Path(out)))
    click.echo(f"built {len(manifest.engines)} engines into {Path(out)} in {time.perf_counter() - start:.1f} s")


def _brick_count(ckpt: str) -> int:
    from lego_export.checkpoint import read_config

    return len(read_config(ckpt).bricks)


def _plans_from_onnx(folder: Path, out: Path, target: str, version_compatible: bool, hardware_compatible: bool):
    from lego_export.export.build import add_tensorrt_plans

    if target != "tensorrt":
        raise LegoError("--from-onnx builds TensorRT plans: add --target tensorrt")
    if out != folder:
        raise LegoError("--from-onnx writes the plans beside the ONNX files; leave out --out")
    manifest = add_tensorrt_plans(
        folder, version_compatible=version_compatible, hardware_compatible=hardware_compatible
    )
    click.echo(_manifest_table(manifest, folder))


# The one parity measure, named alike wherever it is shown (export/verify.py: error_record).
ERROR_NAME = "max error/peak"
ERROR_LEGEND = (
    f"{ERROR_NAME}: the largest |engine - PyTorch| of any output element over the N listed, as a fraction of "
    "the PyTorch output's largest magnitude, on inputs recorded from the model denoising its own samples "
    "(lego-export verify --ckpt measures it again on the same inputs)"
)


def _manifest_table(manifest, folder: Path) -> str:
    rows = [("engine", "format", "file", "precision", "inputs", "N range", "size", ERROR_NAME)]
    for e in manifest.engines:
        inputs = ", ".join(f"{t.name}[{'x'.join(str(d) for d in t.shape)}]" for t in e.inputs)
        for fmt, f in e.files.items():
            err = f"{f.verification['relative_error']:.2e}" if f.verification else "-"
            n_range = f"{e.batch['min']}..{e.batch['max']} (opt {e.batch['opt']})"
            rows.append((e.name, fmt, f.path, f.precision, inputs, n_range, f"{f.bytes / 1e6:.2f} MB", err))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    m = manifest.model
    bricks = " | ".join(f"r{b.size}/p{b.patch}/d{b.depth}/w{b.width}" for b in m.bricks)
    head = (
        f"{folder}: model {m.name} ({bricks}), {m.img_channels} channel(s), trained at "
        f"{m.img_resolution}x{m.img_resolution}, {m.num_classes} classes; "
        f"source {manifest.source['checkpoint']} sha256 {manifest.source['sha256'][:12]}; "
        f"opset {manifest.toolchain.get('opset')}"
    )
    if manifest.latent is not None:
        lat = manifest.latent
        head += (
            f"\nlatent model: the decoder engine turns latents (scale {lat.scale:g}) into {lat.image_channels}-channel "
            f"images {lat.factor}x the latent size"
        )
    if manifest.recommended is not None:
        head += f"\nrecommended sampling setting (lego-export tune): {manifest.recommended.describe()}"
    return head + "\n" + "\n".join(lines) + "\n" + ERROR_LEGEND


@export_main.command()
@click.argument("engines", default="engines", type=click.Path())
@one_line_errors()
def inspect(engines: str) -> None:
    """Print the manifest of an engines folder as a table."""
    from lego_export.manifest import Manifest

    click.echo(_manifest_table(Manifest.read(engines), Path(engines)))


@export_main.command()
@click.argument("engines", default="engines", type=click.Path())
@click.option("--ckpt", type=click.Path(dir_okay=False), help="Also re-check parity against this checkpoint.")
@one_line_errors()
def verify(engines: str, ckpt: str | None) -> None:
    """Re-check every engine file's sha256 (and, given --ckpt, its parity with PyTorch)."""
    from lego_export.manifest import Manifest, sha256_file

    folder = Path(engines)
    manifest = Manifest.read(folder)
    problems = manifest.check_files(folder)
    for p in problems:
        click.echo(f"FAIL {p}")
    if problems:
        raise LegoError(f"{len(problems)} engine file(s) do not match {folder}/manifest.json")
    click.echo(f"ok: {sum(len(e.files) for e in manifest.engines)} files match their sha256")
    if ckpt is None:
        return
    if sha256_file(ckpt) != manifest.source["sha256"]:
        raise LegoError(f"{ckpt} is not the checkpoint these engines were built from ({manifest.source['checkpoint']})")
    _verify_parity(manifest, folder, ckpt)


def _verify_parity(manifest, folder: Path, ckpt: str) -> None:
    from lego_export.checkpoint import load_model
    from lego_export.export.build import RECORDED_IMAGES, engine_jobs
    from lego_export.export.verify import measure_error, record_engine_inputs
    from lego_export.runtime.backends import OnnxRuntimeRunner

    model = load_model(ckpt)
    jobs = {j.spec.name: j for j in engine_jobs(model, 1, 1)}
    # the build's own inputs (its canvas count and seed), so that the same engine measures the same
    recorded = record_engine_inputs(model, min(manifest.embedder.batch["max"], RECORDED_IMAGES))
    failed = 0
    for spec in manifest.engines:
        if spec.name not in jobs:  # a latent model's decoder: its reference is the VAE, not the checkpoint
            click.echo(f"skip {spec.name}: checked against its VAE at build time (lego-export build --vae)")
            continue
        for fmt, f in spec.files.items():
            if fmt == "tensorrt":
                click.echo(f"skip {f.path}: TensorRT plans are checked by the runtime on their GPU")
                continue
            runner = OnnxRuntimeRunner(manifest.read_engine_file(folder, f), name=f.path)
            result = measure_error(jobs[spec.name].module, runner, spec, f.precision, recorded)
            failed += not result["passed"]
            status = "ok  " if result["passed"] else "FAIL"
            built = f"; at build {f.verification['relative_error']:.2e}" if f.verification else ""
            click.echo(
                f"{status} {f.path}: {ERROR_NAME} {result['relative_error']:.2e} "
                f"(tolerance {result['tolerance']:.0e}{built}) at N = {result['batches']}"
            )
    if failed:
        raise LegoError(f"{failed} engine file(s) fail parity with {ckpt}")


@export_main.command("import")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="LEGO checkpoint (.safetensors) to write.")
@click.option(
    "--entry",
    default="ema",
    show_default=True,
    help="Which network of the snapshot to convert (the authors' snapshots hold 'ema').",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@one_line_errors()
def import_checkpoint(checkpoint: str, out: str, entry: str, force: bool) -> None:
    """Convert a LEGO authors' network-snapshot-*.pkl into a .safetensors checkpoint.

    The pickle is read without running anything from it (no module source, no import of the
    authors' code or timm); every layer is checked, the config inferred and printed in one line.

    \b
    lego-export import LEGO-L-PG-64.pkl --out lego-l-pg-64.safetensors
    lego-export build --ckpt lego-l-pg-64.safetensors --out engines-l-pg-64/
    """
    from lego_export.atomic import check_output
    from lego_export.official import import_checkpoint as convert

    check_output(out, "--out")
    if Path(out).exists() and not force:
        raise LegoError(f"--out {out} exists; pass --force to replace it")
    click.echo(convert(checkpoint, out, entry))
    click.echo(f"wrote {out}")


@export_main.command()
@click.option("--engines", default="engines", show_default=True, help="Folder written by lego-export build.")
@click.option(
    "--features",
    required=True,
    type=click.Path(dir_okay=False),
    help="ONNX feature extractor: float32 images N x C x H x W in [-1, 1] -> features N x D (and logits N x classes).",
)
@click.option(
    "--reference",
    required=True,
    type=click.Path(dir_okay=False),
    help=".npz with the real data's feature statistics (mu, sigma) or its images (uint8).",
)
@click.option(
    "--samplers",
    default="dpm2m,heun",
    show_default=True,
    help="Samplers to search, comma-separated (heun, euler, dpm2m).",
)
@click.option(
    "--steps",
    "steps_grid",
    default="4,6,8,12,16",
    show_default=True,
    help="The coarse grid of step counts; refinement also visits the counts between them.",
)
@click.option(
    "--candidates",
    default=None,
    help="Shorthand for --samplers and --steps: SAMPLER:STEPS,... (the samplers and step counts named).",
)
@click.option(
    "--skip-fractions",
    default="0.3,0.6",
    show_default=True,
    help="The coarse grid of skip windows: fractions of the trajectory each brick after the first is skipped.",
)
@click.option(
    "--reuse-residual/--no-reuse-residual",
    default=True,
    show_default=True,
    help="Search skip windows with residual reuse (lego-run --reuse-residual).",
)
@click.option(
    "--guidance",
    default=1.0,
    show_default=True,
    help="Also search each setting with classifier-free guidance at this scale over --guidance-interval (1: none).",
)
@click.option(
    "--guidance-interval",
    default="0.3:2.4",
    show_default=True,
    help="With --guidance: the sigma interval LO:HI where the searched settings guide.",
)
@click.option(
    "--variant",
    "variants",
    multiple=True,
    help="More option fields every setting is also tried with, as a JSON object, e.g. '{\"gate\": 0.05}' "
    "(repeatable; any SamplingOptions field: brick caching, forecasting, ...).",
)
@click.option("--refine-rounds", type=click.IntRange(0, 10), default=2, show_default=True, help="Rounds of refinement.")
@click.option(
    "--screen",
    type=click.IntRange(1, 16),
    default=3,
    show_default=True,
    help="Each stage samples its settings on 1/SCREEN of --num first and drops those clearly beaten (1: off).",
)
@click.option(
    "--max-trials",
    type=click.IntRange(1, 10_000),
    default=80,
    show_default=True,
    help="Most settings sampled in the search (the cheapest first when a stage has more).",
)
@click.option(
    "--max-fid-increase",
    default=0.05,
    show_default=True,
    help="balanced: FID at most best's x (1 + this), on the search and the validation seeds.",
)
@click.option(
    "--max-accuracy-drop",
    default=0.01,
    show_default=True,
    help="balanced: class accuracy at most this below best's, where --features also outputs logits.",
)
@click.option(
    "--min-accuracy",
    type=float,
    default=None,
    help="Every named point and rung: class accuracy at least this, on the search and the validation seeds.",
)
@click.option(
    "--rungs",
    type=click.IntRange(0, 8),
    default=3,
    show_default=True,
    help="Most rungs of the quality ladder below the recommended setting (lego-serve uses them under load).",
)
@click.option(
    "--rung-fid-ratio",
    default=2.0,
    show_default=True,
    help="fast and each rung: FID at most this times the one above's (balanced's; the recommended setting's).",
)
@click.option(
    "--rung-accuracy-drop",
    default=0.03,
    show_default=True,
    help="fast and each rung: class accuracy at most this below the one above's.",
)
@click.option(
    "--recommend",
    type=click.Choice(["best", "balanced", "fast"]),
    default="balanced",
    show_default=True,
    help="The named point that becomes the model's recommended setting (the top of the ladder).",
)
@click.option(
    "--reference-setting",
    default="heun:50",
    show_default=True,
    help="SAMPLER:STEPS the recorded brick FLOPs are relative to; its FID is measured too unless --no-reference-fid.",
)
@click.option("--reference-fid/--no-reference-fid", default=True, show_default=True)
@click.option("--num", default=500, show_default=True, help="Images per search trial (the same seeds and classes).")
@click.option("--validation-num", type=int, default=None, help="Images per validation trial [default: --num].")
@click.option(
    "--validate-most",
    type=click.IntRange(3, 64),
    default=16,
    show_default=True,
    help="Most Pareto points validated (spread over the frontier, its ends kept).",
)
@click.option("--batch", default=64, show_default=True, help="Images per denoiser call.")
@click.option("--seed", default=0, show_default=True, help="Seed of the search; seed + 1 validates.")
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino"]), default="onnxruntime", show_default=True)
@click.option("--threads", default=0, show_default=True, help="Runtime threads (0 = all cores).")
@click.option(
    "--quick",
    is_flag=True,
    help="A smoke run: 24 images, the first sampler, the grid's ends, 12 trials, one refinement round, "
    "no reference FID (flags given explicitly still win).",
)
@click.option("--save", default=None, help="Also write the named points as JSON (for build --recommended).")
@click.option("--dry-run", is_flag=True, help="Search and report; leave manifest.json as it is.")
@one_line_errors()
def tune(**params) -> None:
    """Map the frontier of sampling settings (brick FLOPs, FID, class accuracy), validate it on unseen
    seeds, and write its named points (best, balanced, fast), the recommended setting (balanced unless
    --recommend) and the quality ladder below it into manifest.json. lego-run --quality NAME, the
    Python API's quality= and lego-serve's "quality" select a named point; lego-serve steps down the
    ladder under load. A choice that fails validation is not written, and the command exits with 1.

    \b
    lego-export tune --engines engines/ --features features.onnx --reference data-stats.npz
    """
    _tune(**_quick_defaults(params))


QUICK = {
    "num": 24,
    "steps_grid": None,  # the grid's ends
    "samplers": None,  # the first sampler
    "max_trials": 12,
    "refine_rounds": 1,
    "reference_fid": False,
    "validate_most": 4,
    "skip_fractions": "0.5",
}


def _quick_defaults(params: dict) -> dict:
    """--quick: small counts for the parameters left at their defaults."""
    from click.core import ParameterSource

    if not params.pop("quick"):
        return params
    ctx = click.get_current_context()
    for name, value in QUICK.items():
        if ctx.get_parameter_source(name) is ParameterSource.DEFAULT:
            if name == "steps_grid":
                grid = [p.strip() for p in params[name].split(",") if p.strip()]
                value = ",".join(dict.fromkeys([grid[0], grid[-1]]))
            elif name == "samplers":
                value = params[name].split(",")[0]
            params[name] = value
    return params


def _tune(
    *,
    engines,
    features,
    reference,
    samplers,
    steps_grid,
    candidates,
    skip_fractions,
    reuse_residual,
    guidance,
    guidance_interval,
    variants,
    refine_rounds,
    screen,
    max_trials,
    max_fid_increase,
    max_accuracy_drop,
    min_accuracy,
    rungs,
    rung_fid_ratio,
    rung_accuracy_drop,
    recommend,
    reference_setting,
    reference_fid,
    num,
    validation_num,
    validate_most,
    batch,
    seed,
    backend,
    threads,
    save,
    dry_run,
) -> None:
    import json
    import math

    from lego_export.atomic import atomic_write, check_output, folder_lock
    from lego_export.manifest import Manifest
    from lego_export.options import MAX_GUIDANCE, MAX_STEPS, OptionError, SamplingOptions, check_request
    from lego_export.runtime.backends import MAX_THREADS
    from lego_export.runtime.pipeline import LegoPipeline
    from lego_export.tune import (
        FeatureNet,
        Rules,
        Setting,
        Space,
        Tuner,
        load_reference,
        parse_list,
        parse_samplers,
        parse_settings,
        recommendation,
    )

    for flag, value, lo, hi in (
        ("--max-fid-increase", max_fid_increase, 0, 10),
        ("--max-accuracy-drop", max_accuracy_drop, 0, 1),
        ("--rung-fid-ratio", rung_fid_ratio, 1, 10),
        ("--rung-accuracy-drop", rung_accuracy_drop, 0, 1),
        ("--min-accuracy", 0.0 if min_accuracy is None else min_accuracy, 0, 1),
        ("--guidance", guidance, 1, MAX_GUIDANCE),
    ):
        if not (math.isfinite(value) and lo <= value <= hi):  # a click FloatRange lets NaN through
            raise LegoError(f"{flag} must be from {lo} to {hi}, got {value}")
    space_samplers = parse_samplers(samplers)
    grid = parse_list(steps_grid, "--steps", int, 1, MAX_STEPS)
    if candidates is not None:
        pairs = parse_settings(candidates)
        space_samplers = tuple(dict.fromkeys(sampler for sampler, _ in pairs))
        grid = tuple(sorted({steps for _, steps in pairs}))
    fractions = parse_list(skip_fractions, "--skip-fractions", float, 0.0, 1.0)
    ref_settings = parse_settings(reference_setting)
    if len(ref_settings) != 1:
        raise LegoError(f"--reference-setting takes one SAMPLER:STEPS, got {reference_setting!r}")
    if not 0 <= threads <= MAX_THREADS:
        raise LegoError(f"--threads must be from 0 (all cores) to {MAX_THREADS}, got {threads}")
    validation_num = num if validation_num is None else validation_num
    check_output(save, "--save")
    manifest = Manifest.read(engines)
    model = manifest.model
    if guidance != 1.0 and not model.num_classes:
        raise LegoError("--guidance needs a class-conditional model (classifier-free guidance); this one is not")
    variant_list = _variants(reuse_residual, guidance, guidance_interval, variants, model)
    side = model.img_resolution
    for flag, trial_seed, count in (("--num", seed, num), ("--validation-num", seed + 1, validation_num)):
        try:  # the search's seeds and images, the validation's
            check_request(num=count, batch=batch, seed=trial_seed, canvas=(side, side), channels=model.img_channels)
        except OptionError as e:
            raise e.renamed({"num": flag, "batch": "--batch", "seed": "--seed"}) from None
    for flag, count in (("--num", num), ("--validation-num", validation_num)):
        if count < 2:
            raise LegoError(f"{flag} must be at least 2 (FID needs a covariance), got {count}")
    net = FeatureNet(features, (model.img_channels, side, side), threads)
    stats = load_reference(reference, net)
    pipe = LegoPipeline.from_engines(engines, backend, threads=threads)
    tuner = Tuner(pipe, net, stats, num=num, batch=batch, seed=seed, log=lambda m: click.echo(m, err=True))
    if not tuner.classify:
        click.echo("--features has no logits output (or the model no classes): class accuracy not checked", err=True)
    if min_accuracy is not None and not tuner.classify:
        raise LegoError("--min-accuracy needs class accuracy: --features with a logits output, and a class model")
    space = Space(
        samplers=space_samplers,
        steps=grid,
        skip_fractions=fractions,
        variants=tuple(variant_list),
        refine_rounds=refine_rounds,
        max_trials=max_trials,
        screen=screen,
    )
    rules = Rules(
        max_fid_increase=max_fid_increase,
        max_accuracy_drop=max_accuracy_drop,
        min_accuracy=min_accuracy,
        rung_fid_ratio=rung_fid_ratio,
        rung_accuracy_drop=rung_accuracy_drop,
        rungs=rungs,
    )
    start = time.perf_counter()
    frontier = tuner.search(space, rules)
    tuner.validate(frontier, rules, seed + 1, validation_num, validate_most)
    ref_sampler, ref_steps = ref_settings[0]
    tuner.measure_reference(frontier, Setting(SamplingOptions(ref_sampler, ref_steps)), seed + 1, validation_num,
                            reference_fid)  # fmt: skip
    measured = {"images": num, "seed": seed, "backend": backend, "seconds": time.perf_counter() - start}
    chosen = recommendation(frontier, model, manifest.source["sha256"], rules, recommend, measured)
    _check_storable(chosen)
    click.echo(_frontier_table(chosen))
    click.echo(
        f"recommended ({recommend}): {chosen.describe()}: validated FID {chosen.measured['fid']:.3f}"
        + (f", class accuracy {chosen.measured['class_accuracy']:.3f}" if tuner.classify else "")
        + f"; {len(chosen.ladder)} rungs below it"
    )
    if save:
        with atomic_write(save) as f:
            f.write((json.dumps(chosen.to_dict(), indent=2) + "\n").encode())
        click.echo(f"wrote {save}")
    if dry_run:
        return
    with folder_lock(Path(engines), "lego-export tune"):
        current = Manifest.read(engines)
        if current.source != manifest.source:
            raise LegoError(f"{engines} was rebuilt from another checkpoint while tuning; nothing written")
        current.recommended = chosen
        current.write(engines)
    click.echo(
        f"wrote the named points ({', '.join(chosen.points)}), the recommended setting and {len(chosen.ladder)} "
        f"rungs below it into {Path(engines) / 'manifest.json'}"
    )


def _variants(reuse: bool, guidance: float, interval: str, extra: tuple[str, ...], model) -> list[dict]:
    """The option fields every searched setting is tried with: residual reuse (or not), guided (or not),
    and each --variant; each checked against the model before anything is sampled."""
    import json

    from lego_export.options import FIELDS, SamplingOptions

    base: dict[str, Any] = {"reuse_residual": True} if reuse else {}
    out, given = [base], ["--reuse-residual"]
    if guidance != 1.0:
        out.append({**base, "guidance": guidance, "guidance_interval": interval})
        given.append("--guidance-interval")
    for text in extra:
        try:
            fields = json.loads(text)
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            raise LegoError(f"--variant {text!r}: expected a JSON object of sampling option fields")
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise LegoError(f"--variant: {unknown[0]!r} is not a sampling option; known: {', '.join(FIELDS)}")
        out.append({**base, **fields})
        given.append(f"--variant {text}")
    for fields, flag in zip(out, given, strict=True):
        try:
            SamplingOptions(**fields).validate(model)
        except (LegoError, TypeError, ValueError) as e:  # TypeError: a value of the wrong type for a field
            raise LegoError(f"{flag}: {e}") from None
    return out


def _check_storable(chosen) -> None:
    """The setting as the manifest will read it back: a field its format cannot hold yet is an error,
    not a setting silently written without it."""
    import json

    from lego_export.manifest import parse_recommended

    back = parse_recommended(json.loads(json.dumps(chosen.to_dict())), "the tuned setting")
    pairs = [("recommended", chosen.options, back.options)]
    pairs += [(name, p.options, back.points[name].options) for name, p in chosen.points.items()]
    for name, wrote, read in pairs:
        if wrote != read:
            raise LegoError(f"the manifest cannot yet store {name} ({wrote.describe()}): it reads back as "
                            f"{read.describe()}; nothing written")  # fmt: skip


def _frontier_table(chosen) -> str:
    """The validated frontier as a table: brick FLOPs, FID and class accuracy of each point, its names."""
    rows = chosen.measured["frontier"]
    lines = ["full-chain evals  FID (search)      class acc. (search)  names             setting"]
    for r in rows:
        acc = "-" if r["class_accuracy"] is None else f"{r['class_accuracy']:.3f} ({r['search_class_accuracy']:.3f})"
        lines.append(
            f"{r['full_chain_evaluations']:16.2f}  {r['fid']:7.3f} ({r['search_fid']:7.3f})  {acc:19s}  "
            f"{','.join(r['names']) or '-':16s}  {r['setting']}"
        )
    return "\n".join(lines)
