"""lego-export: build, inspect and verify brick engines (lego-run lives in lego_export/runtime/cli.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from lego_export.cli_common import CONTEXT, one_line_errors
from lego_export.errors import LegoError


@click.group(context_settings=CONTEXT)
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
        self.current = None

    def __call__(self, message: str) -> None:
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
    "--target",
    type=click.Choice(["onnx", "tensorrt"]),
    default="onnx",
    show_default=True,
    help="onnx: portable ONNX (+ ONNX Runtime-fused bricks). tensorrt: also a TensorRT plan per engine "
    "(needs TensorRT and an NVIDIA GPU).",
)
@click.option(
    "--max-batch",
    default=64,
    show_default=True,
    help="Most images per engine call (guidance doubles a batch); a brick's N range is this times its "
    "tiles per image at the training resolution. Larger canvases are run in chunks.",
)
@click.option("--opt-batch", default=32, show_default=True, help="Images per call TensorRT optimises for.")
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
@click.option("--force", is_flag=True, help="Replace engines of another checkpoint in --out.")
@one_line_errors()
def build(
    ckpt,
    from_onnx,
    out,
    fp16,
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
    force,
) -> None:
    """Export every brick and the embedder, verify them against PyTorch, write manifest.json."""
    if from_onnx:
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
        target=target,
        max_batch=max_batch,
        opt_batch=opt_batch,
        opset=opset,
        verify=not no_verify,
        fuse=not no_fuse,
        force=force,
        vae=vae,
        latent_scale=latent_scale,
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


def _manifest_table(manifest, folder: Path) -> str:
    rows = [("engine", "format", "file", "precision", "inputs", "N range", "size", "rel. error")]
    for e in manifest.engines:
        inputs = ", ".join(f"{t.name}[{'x'.join(str(d) for d in t.shape)}]" for t in e.inputs)
        for fmt, f in e.files.items():
            err = f"{f.verification['relative_error']:.1e}" if f.verification else "-"
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
    return head + "\n" + "\n".join(lines)


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
    from lego_export.export.build import engine_jobs
    from lego_export.export.verify import measure_error, record_engine_inputs
    from lego_export.runtime.backends import OnnxRuntimeRunner

    model = load_model(ckpt)
    jobs = {j.spec.name: j for j in engine_jobs(model, 1, 1)}
    recorded = record_engine_inputs(model, manifest.embedder.batch["max"])
    failed = 0
    for spec in manifest.engines:
        for fmt, f in spec.files.items():
            if fmt == "tensorrt":
                click.echo(f"skip {f.path}: TensorRT plans are checked by the runtime on their GPU")
                continue
            runner = OnnxRuntimeRunner(manifest.read_engine_file(folder, f), name=f.path)
            result = measure_error(jobs[spec.name].module, runner, spec, f.precision, recorded)
            failed += not result["passed"]
            status = "ok  " if result["passed"] else "FAIL"
            click.echo(
                f"{status} {f.path}: relative error {result['relative_error']:.2e} "
                f"(tolerance {result['tolerance']:.0e}) at N = {result['batches']}"
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
@one_line_errors()
def import_checkpoint(checkpoint: str, out: str, entry: str) -> None:
    """Convert a LEGO authors' network-snapshot-*.pkl into a .safetensors checkpoint.

    The pickle is read without running anything from it (no module source, no import of the
    authors' code or timm); every layer is checked, the config inferred and printed in one line.

    \b
    lego-export import LEGO-L-PG-64.pkl --out lego-l-pg-64.safetensors
    lego-export build --ckpt lego-l-pg-64.safetensors --out engines-l-pg-64/
    """
    from lego_export.official import import_checkpoint as convert

    click.echo(convert(checkpoint, out, entry))
    click.echo(f"wrote {out}")
