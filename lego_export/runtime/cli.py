"""lego-run: sample images from a folder of brick engines (a thin layer over LegoPipeline)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import numpy as np
from click.core import ParameterSource

from lego_export.atomic import atomic_write, check_output, publish_dir, staging_dir
from lego_export.cli_common import CONTEXT, one_line_errors
from lego_export.edm import SAMPLERS, Churn
from lego_export.errors import LegoError
from lego_export.runtime.backends import BACKENDS, PRECISIONS
from lego_export.runtime.pipeline import DEFAULT_T_BREAK, LegoPipeline, check_request

MAX_THREADS = 1024


def parse_resolution(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise LegoError(f"--resolution {text!r}: write HxW, e.g. 32x96") from None
    return h, w


def plan_table(pipe: LegoPipeline, plan) -> str:
    names = [f"brick{k}({s})" for k, s in enumerate(pipe.brick_sizes)]
    lines = [f"{'step':>4} {'sigma':>9}  {'shift':>8}  bricks run"]
    for p in plan:
        lines.append(f"{p.step:>4} {p.sigma:>9.4f}  {str(p.shift):>8}  {' > '.join(names[: p.bricks])}")
    skipped = sum(len(names) - p.bricks for p in plan)
    lines.append(
        f"{skipped} of {len(plan) * len(names)} brick runs skipped; {pipe.flops_saved(plan):.1%} of brick FLOPs saved"
    )
    return "\n".join(lines)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return rank, world


def _gather(result, indices, rank: int, world: int):
    """Merge every rank's images on rank 0, in index order."""
    if world == 1:
        return result.images, result.labels
    import torch.distributed as dist

    parts = [None] * world if rank == 0 else None
    dist.gather_object((indices, result.images, result.labels), parts, dst=0)
    if rank != 0:
        return None, None
    order = np.argsort(np.concatenate([p[0] for p in parts]))
    images = np.concatenate([p[1] for p in parts])[order]
    labels = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])[order]
    return images, labels


def npz_path(save_npz: str | None) -> str | None:
    """The name np.savez gives a file: it appends .npz when missing, so say that name from the start."""
    return save_npz if save_npz is None or save_npz.endswith(".npz") else save_npz + ".npz"


def check_outputs(out: str | None, out_dir: str | None, save_npz: str | None, timing_json: str | None) -> None:
    """Every output writable and correctly named, before any sampling starts."""
    from lego_export.images import image_format

    check_output(out, "--out")
    if out is not None:
        image_format(out)
    check_output(out_dir, "--out-dir", folder=True)
    check_output(save_npz, "--save-npz")
    check_output(timing_json, "--timing-json")


def write_outputs(images, labels, out, out_dir, save_npz, columns: int, written: list[str]) -> None:
    """Write each output whole (the --out-dir set in one move), appending its name to written."""
    from lego_export.images import make_grid, save_image, to_uint8

    if save_npz:
        arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
        with atomic_write(save_npz) as f:
            np.savez(f, **arrays)
        written.append(save_npz)
    if out_dir:
        target = Path(out_dir)
        with staging_dir(target) as staging:
            for i, p in enumerate(to_uint8(images)):
                save_image(p, staging / f"{i:06d}.png")
            publish_dir(staging, target)
        written.append(f"{out_dir}/ ({len(images)} PNGs)")
    if out:
        save_image(make_grid(images, columns=columns), out)
        written.append(out)


SAMPLING_OPTIONS = ("steps", "sampler", "skip_late_bricks", "t_break", "skip_policy", "reuse_residual", "s_churn")


def sampling_options_given() -> bool:
    """Whether the command line sets any sampling option (then the recommended setting is not used)."""
    ctx = click.get_current_context()
    return any(ctx.get_parameter_source(name) is not ParameterSource.DEFAULT for name in SAMPLING_OPTIONS)


def describe_recommended(recommended) -> str:
    text = recommended.describe()
    fid, reference = recommended.measured.get("fid"), recommended.measured.get("reference")
    if isinstance(fid, float) and isinstance(reference, dict) and isinstance(reference.get("fid"), float):
        text += f"; tuned FID {fid:.2f} vs {reference['fid']:.2f} for {reference.get('setting', 'the reference')}"
    return text + "; --no-recommended for the plain defaults"


@click.command(context_settings=CONTEXT)
@click.option("--engines", default="engines", show_default=True, help="Folder written by lego-export build.")
@click.option("--steps", default=50, show_default=True, help="Sampling steps (Karras sigma schedule, 80 -> 0.002).")
@click.option(
    "--sampler",
    type=click.Choice(list(SAMPLERS)),
    default="heun",
    show_default=True,
    help="EDM Heun (2 evaluations per step but the last), Euler (1), or DPM-Solver++(2M) (1, second order).",
)
@click.option(
    "--skip-late-bricks",
    is_flag=True,
    help="Drop the last brick where the LEGO design allows: a PG/U stack's global brick at low noise, "
    "a PR stack's local brick at high noise.",
)
@click.option(
    "--t-break",
    default=DEFAULT_T_BREAK,
    show_default=True,
    help="With --skip-late-bricks: fraction of the trajectory without the last brick.",
)
@click.option(
    "--reuse-residual",
    is_flag=True,
    help="Where a step skips bricks, add the correction they made at the last step that ran them "
    "instead of dropping it (same FLOPs as plain skipping).",
)
@click.option(
    "--no-recommended",
    is_flag=True,
    help="Ignore the setting lego-export tune recommended for this model; without it, that setting is used "
    "whenever no sampling option (--steps, --sampler, --skip-*, --t-break, --reuse-residual, --churn) is given.",
)
@click.option(
    "--skip-policy",
    default=None,
    help="Explicit per-brick sigma windows, 'BRICK@LO:HI,...'; e.g. '2@0.5:' runs brick 2 only for "
    "sigma >= 0.5. A skipped brick skips all later ones (chaining).",
)
@click.option("--resolution", default=None, help="Canvas HxW, multiples of the largest brick (default: training size).")
@click.option(
    "--num",
    "-n",
    "--images",
    "num",
    default=64,
    show_default=True,
    help="Number of images. Under torchrun write -n or --images: torchrun's own parser takes --num "
    "for its --numa-binding.",
)
@click.option("--batch", default=16, show_default=True, help="Images per denoiser call (guidance doubles it).")
@click.option(
    "--class",
    "classes",
    multiple=True,
    type=int,
    help="Class label(s), cycled over the images (repeat the option); default: every class in equal "
    "consecutive blocks, one grid row per class when --num is classes x --columns.",
)
@click.option("--cfg", default=1.0, show_default=True, help="Classifier-free guidance scale (1 = none).")
@click.option(
    "--churn",
    "s_churn",
    default=0.0,
    show_default=True,
    help="EDM stochastic sampling strength S_churn (0 = deterministic); the LEGO authors' FID recipe uses 10.",
)
@click.option("--s-min", default=0.0, show_default=True, help="With --churn: lowest sigma that gets fresh noise.")
@click.option("--s-max", default=float("inf"), show_default=True, help="With --churn: highest sigma that gets it.")
@click.option("--s-noise", default=1.0, show_default=True, help="With --churn: noise inflation (authors: 1.003).")
@click.option("--seed", default=0, show_default=True, help="Image i's noise depends only on (seed, i).")
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="auto: TensorRT plans when built and usable; on a CPU, OpenVINO when installed (pip install "
    "'.[openvino]'; the fastest measured here), else ONNX Runtime. torch: the PyTorch reference (needs --ckpt).",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="What the bricks compute in. int8: the graphs of lego-export build --int8, on onnxruntime or "
    "openvino (auto: openvino when installed). bf16: OpenVINO's bf16 inference, openvino only, on CPUs "
    "with bf16 units. Both trade exactness for speed; the embedder stays fp32.",
)
@click.option("--ckpt", default=None, help="Checkpoint for --backend torch.")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Device of the torch backend.",
)
@click.option("--threads", default=0, show_default=True, help="ONNX Runtime / OpenVINO threads (0 = all cores).")
@click.option(
    "--cuda-graphs", is_flag=True, help="TensorRT backend: capture each engine once per batch size and replay it."
)
@click.option("--out", default="grid.png", show_default=True, help="PNG grid of all images.")
@click.option("--out-dir", default=None, help="Also write one PNG per image here.")
@click.option("--save-npz", default=None, help="Also write images (float32 N x C x H x W in [-1, 1]) and labels.")
@click.option(
    "--save-latents",
    default=None,
    help="Latent models: also write the raw latents (float32 N x C x h x w, before the decoder) as .npz.",
)
@click.option("--columns", default=8, show_default=True, help="Grid columns.")
@click.option(
    "--tile-shift/--no-tile-shift",
    default=None,
    help="Move the tile grid between steps so content crosses tile borders "
    "[default: on for canvases larger than the training size].",
)
@click.option("--plan", "plan_only", is_flag=True, help="Print the per-step brick plan and FLOPs saved; run nothing.")
@click.option("--timing-json", default=None, help="Write the timing summary as JSON here.")
@click.option(
    "--profile",
    is_flag=True,
    help="Time every engine call on GPU backends too (waits for the GPU after each call, which slows "
    "sampling; engine times are always taken on the CPU).",
)
@one_line_errors()
def main(
    engines,
    steps,
    sampler,
    skip_late_bricks,
    t_break,
    reuse_residual,
    no_recommended,
    skip_policy,
    resolution,
    num,
    batch,
    classes,
    cfg,
    s_churn,
    s_min,
    s_max,
    s_noise,
    seed,
    backend,
    precision,
    ckpt,
    device,
    threads,
    cuda_graphs,
    out,
    out_dir,
    save_npz,
    save_latents,
    columns,
    tile_shift,
    plan_only,
    timing_json,
    profile,
) -> None:
    """Sample images from LEGO brick engines, chaining or skipping bricks per step.

    \b
    lego-run --engines engines/ --steps 50 --skip-late-bricks
    lego-run --engines engines/ --resolution 32x96 --class 7 --num 8 --out wide.png
    lego-run --engines engines/ --steps 50 --skip-late-bricks --plan
    """
    from lego_export.manifest import Manifest

    if skip_late_bricks and skip_policy:
        raise LegoError("use either --skip-late-bricks or --skip-policy, not both")
    if columns < 1:
        raise LegoError(f"--columns must be at least 1, got {columns}")
    if not 0 <= threads <= MAX_THREADS:
        raise LegoError(f"--threads must be from 0 (all cores) to {MAX_THREADS}, got {threads}")
    save_npz, save_latents = npz_path(save_npz), npz_path(save_latents)
    if not plan_only:
        check_outputs(out, out_dir, save_npz, timing_json)
        check_output(save_latents, "--save-latents")
    skip = "late" if skip_late_bricks else skip_policy
    hw = parse_resolution(resolution)
    manifest = Manifest.read(engines)
    recommended = None if no_recommended or sampling_options_given() else manifest.recommended
    if recommended is not None:
        sampler, steps, skip, reuse_residual = (
            recommended.sampler,
            recommended.steps,
            recommended.skip_policy or None,
            recommended.reuse_residual,
        )
        click.echo(f"sampling setting: the model's recommended ({describe_recommended(recommended)})")
    if plan_only:
        planner = LegoPipeline(manifest)
        plan = planner.plan(steps, skip, t_break, hw, tile_shift, seed)
        click.echo(f"skip policy: {planner.skip_policy(skip, t_break).description}")
        click.echo(plan_table(planner, plan))
        return

    if cuda_graphs and backend not in ("tensorrt", "auto"):
        raise LegoError("--cuda-graphs applies to the TensorRT backend only")
    churn = Churn(s_churn, s_min, s_max, s_noise) if s_churn else None
    if churn is not None:
        churn.validate()
    model = manifest.model
    check_request(num, batch, seed, steps, hw or (model.img_resolution,) * 2, model.img_channels)
    pipe = LegoPipeline.from_engines(
        engines,
        backend,
        ckpt=ckpt,
        device=device,
        threads=threads,
        cuda_graphs=cuda_graphs,
        profile=profile,
        precision=precision,
    )
    rank, world = _distributed()
    indices = list(range(rank, num, world))
    from tqdm import tqdm

    evaluations = -(-len(indices) // batch) * steps
    with tqdm(total=evaluations, unit="step", disable=rank != 0 or None, file=sys.stderr, leave=False) as bar:
        result = pipe(
            num=num,
            steps=steps,
            sampler=sampler,
            skip=skip,
            t_break=t_break,
            resolution=hw,
            classes=classes or None,
            guidance=cfg,
            seed=seed,
            batch=batch,
            tile_shift=tile_shift,
            indices=indices,
            progress=lambda _i: bar.update(1),
            churn=churn,
            reuse_residual=reuse_residual,
        )
    if save_latents and result.latents is None:
        raise LegoError("--save-latents: this model samples images directly (no latent space in its manifest)")
    images, labels = _gather(result, indices, rank, world)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()  # every rank, before any exits: gloo aborts on a peer gone early
    if rank != 0:
        return
    written: list[str] = []
    try:
        if save_latents:
            if world > 1:
                raise LegoError("--save-latents is not supported under torchrun yet; run one process")
            with atomic_write(save_latents) as f:
                np.savez(f, latents=result.latents)
            written.append(save_latents)
        write_outputs(images, labels, out, out_dir, save_npz, columns, written)
        if timing_json:
            with atomic_write(timing_json) as f:
                f.write(json.dumps(result.timing.summary(), indent=2).encode())
            written.append(timing_json)
    except KeyboardInterrupt:
        done = f"written whole before it: {', '.join(written)}" if written else "no output was written"
        raise LegoError(f"interrupted while writing outputs; {done}; no partial file was left") from None
    click.echo(
        f"skip policy: {pipe.skip_policy(skip, t_break).description}; backend {pipe.backend.name}; "
        f"canvas {images.shape[2]}x{images.shape[3]}; {world} process(es)"
    )
    click.echo(result.timing.table())
    click.echo(f"wrote {', '.join(written)}" if written else "wrote nothing (no output asked for)")


if __name__ == "__main__":
    main()
