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
from lego_export.cli_common import CONTEXT, check_interrupted, one_line_errors
from lego_export.edm import SAMPLERS, Churn
from lego_export.errors import LegoError
from lego_export.flops import model_brick_flops
from lego_export.options import (
    DEFAULT_T_BREAK,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    MAX_STEPS,
    OptionError,
    check_classes,
    check_request,
    parse_canvas,
    resolve,
)
from lego_export.plan import describe_saving, flop_fraction_saved, plan
from lego_export.points import resolve_quality
from lego_export.runtime.backends import BACKENDS, COMPUTE_PRECISIONS, MAX_THREADS
from lego_export.runtime.backends import FLAGS as BACKEND_FLAGS
from lego_export.runtime.pipeline import LegoPipeline
from lego_export.runtime.runner import Timing

# lego-run's flags for the fields of SamplingOptions and of the request, so that a message from the
# library ("steps must be ...") reaches the user under the flag they typed ("--steps must be ...").
FLAGS = {
    "sampler": "--sampler",
    "steps": "--steps",
    "skip": "--skip-policy",
    "skip.late": "--skip-late-bricks",
    "t_break": "--t-break",
    "reuse_residual": "--reuse-residual",
    "churn": "--churn",
    "churn.s_churn": "--churn",
    "churn.s_min": "--s-min",
    "churn.s_max": "--s-max",
    "churn.s_noise": "--s-noise",
    "guidance": "--cfg",
    "guidance_interval": "--cfg-interval",
    "tile_shift": "--tile-shift",
    "cache": "--cache",
    "forecast": "--forecast",
    "gate": "--gate",
    "gate_signal": "--gate-signal",
    "guidance_cache": "--cfg-cache",
    "num": "--num",
    "batch": "--batch",
    "seed": "--seed",
    "resolution": "--resolution",
    "classes": "--class",
    "quality": "--quality",
    **BACKEND_FLAGS,  # backend, precision, ckpt, device, threads, cuda_graphs
}
CHURN_DETAIL = ("s_min", "s_max", "s_noise")  # meaningful with --churn only
CACHE_FLAGS = ("cache", "forecast", "gate", "gate_signal")  # parameters named as their fields
DEFAULT_OUT = "grid.png"
GRID_COLUMNS = 8  # the grid's columns when classes do not fill rows


def plan_table_for(model, plan) -> str:
    """The per-step brick plan as a table, with the share of brick FLOPs it skips."""
    names = [f"brick{k}({b.size})" for k, b in enumerate(model.bricks)]
    lines = [f"{'step':>4} {'sigma':>9}  {'shift':>8}  bricks run"]
    for p in plan:
        guided = " (guided: twice)" if p.guided else ""
        guided = " (guided: conditional half, cached difference)" if p.guidance_cached else guided
        chain = " > ".join(f"{n} cached" if k in p.cached else n for k, n in enumerate(names[: p.bricks]))
        lines.append(f"{p.step:>4} {p.sigma:>9.4f}  {str(p.shift):>8}  {chain}{guided}")
    skipped = sum(len(names) - p.bricks for p in plan)
    cached = sum(len(p.cached) for p in plan)
    lines.append(
        f"{skipped} of {len(plan) * len(names)} brick runs skipped, {cached} cached; "
        f"{describe_saving(flop_fraction_saved(plan, model_brick_flops(model)))}"
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
    """Every rank's images on rank 0, in index order, and the timing of all ranks together."""
    if world == 1:
        return result.images, result.labels, result.timing
    import torch.distributed as dist

    parts: list | None = [None] * world if rank == 0 else None  # gather_object fills rank 0's list
    dist.gather_object((indices, result.images, result.labels, result.timing), parts, dst=0)
    if rank != 0:
        return None, None, None
    order = np.argsort(np.concatenate([p[0] for p in parts]))
    images = np.concatenate([p[1] for p in parts])[order]
    labels = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])[order]
    return images, labels, Timing.merged([p[3] for p in parts])


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
    outputs = {"--out": out, "--out-dir": out_dir, "--save-npz": save_npz, "--timing-json": timing_json}
    for option, path in outputs.items():
        check_parent(path, option)


def check_parent(path: str | None, option: str) -> None:
    """Refuse an output whose folder does not exist, as most tools do: creating it (at the file
    system's root, say) for a mistyped path would surprise more than a one-line refusal."""
    if path is not None and not Path(path).parent.is_dir():
        raise LegoError(f"{option} {path}: the folder {Path(path).parent} does not exist; create it first")


def grid_columns(num: int, classes: tuple[str, ...], num_classes: int) -> int:
    """The grid's columns when --columns is not given: one row per class when every class comes in
    equal consecutive blocks (no --class, --num a multiple of the class count), else GRID_COLUMNS."""
    if not classes and num_classes and num % num_classes == 0:
        return num // num_classes
    return GRID_COLUMNS


def write_outputs(
    images, labels, out, out_dir, save_npz, columns: int, written: list[str], record: dict | None = None
) -> None:
    """Write each output whole (the --out-dir set in one move), appending its name to written; every
    PNG carries the run record (what made it) as text."""
    from lego_export.images import make_grid, run_text, save_image, to_uint8

    text = run_text(record) if record else None
    if save_npz:
        arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
        with atomic_write(save_npz) as f:
            np.savez(f, **arrays)
        written.append(save_npz)
    if out_dir:
        target = Path(out_dir)
        with staging_dir(target) as staging:
            for i, p in enumerate(to_uint8(images)):
                save_image(p, staging / f"{i:06d}.png", text)
            publish_dir(staging, target)
        written.append(f"{target}/ ({len(images)} PNGs)")  # Path drops a trailing slash: one, not two
    if out:
        save_image(make_grid(images, columns=columns), out, text)
        written.append(out)


def given_options(params: dict) -> dict:
    """The SamplingOptions fields the command line sets (flags left at their defaults are not given):
    the options are these over the recommended setting or the defaults (options.resolve)."""
    ctx = click.get_current_context()

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) is not ParameterSource.DEFAULT

    if params["skip_late_bricks"] and params["skip_policy"]:
        raise LegoError("use either --skip-late-bricks or --skip-policy, not both")
    for name in CHURN_DETAIL:
        if given(name) and not params["s_churn"]:
            raise LegoError(f"--{name.replace('_', '-')} applies with --churn only")
    fields = {}
    for name in ("sampler", "steps", "t_break", "reuse_residual", "tile_shift", *CACHE_FLAGS):
        if given(name):
            fields[name] = params[name]
    if params["skip_late_bricks"]:
        fields["skip"] = "late"
    elif given("skip_policy"):
        fields["skip"] = params["skip_policy"]
    if given("s_churn"):
        fields["churn"] = Churn(params["s_churn"], params["s_min"], params["s_max"], params["s_noise"])
    if given("cfg"):
        fields["guidance"] = params["cfg"]
    if given("cfg_interval"):
        fields["guidance_interval"] = params["cfg_interval"]
    if given("cfg_cache"):
        fields["guidance_cache"] = params["cfg_cache"]
    return fields


def describe_recommended(recommended) -> str:
    text = recommended.describe()
    fid, reference = recommended.measured.get("fid"), recommended.measured.get("reference")
    if isinstance(fid, float) and isinstance(reference, dict) and isinstance(reference.get("fid"), float):
        text += f"; tuned FID {fid:.2f} vs {reference['fid']:.2f} for {reference.get('setting', 'the reference')}"
    return text + "; --no-recommended for the plain defaults"


def run_record(pipe: LegoPipeline, result, canvas: tuple[int, int], seed: int, images: int, world: int) -> dict:
    """What made a run's images: every option, the backend, precision as built and as run, canvas, seed."""
    return {
        "options": result.options.to_dict(),
        "recommended": result.recommended,
        "backend": pipe.backend.name,
        "precision": {"files": pipe.built_precision, "runtime": pipe.precision},
        "canvas": list(canvas),
        "seed": seed,
        "images": images,
        "processes": world,
        "checkpoint_sha256": pipe.manifest.source["sha256"],
        # brick FLOPs actually spent per image (a per-image gate decides them at run time)
        **({"full_chain_evaluations": round(result.timing.full_chain_evaluations, 4)} if result.options.caches else {}),
    }


@click.command(context_settings=CONTEXT)
@click.option("--engines", default="engines", show_default=True, help="Folder written by lego-export build.")
@click.option(
    "--steps",
    type=click.IntRange(1, MAX_STEPS),
    default=50,
    show_default=True,
    help="Sampling steps (Karras sigma schedule, 80 -> 0.002).",
)
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
    type=click.FloatRange(0, 1),
    default=None,
    help=f"With --skip-late-bricks: fraction of the trajectory without the last brick.  [default: {DEFAULT_T_BREAK}]",
)
@click.option(
    "--reuse-residual",
    is_flag=True,
    help="Where a step skips bricks, add the correction they made at the last step that ran them "
    "instead of dropping it (same FLOPs as plain skipping).",
)
@click.option(
    "--quality",
    default=None,
    help="Sample with one of the model's named points (lego-export tune writes best, balanced and fast) "
    "instead of its recommended setting; combines with --cfg and --tile-shift, not with the trajectory options.",
)
@click.option(
    "--no-recommended",
    is_flag=True,
    help="Ignore the setting lego-export tune recommended for this model; without it, that setting is used "
    "whenever no sampling option (--steps, --sampler, --skip-*, --t-break, --reuse-residual, --churn, --cache, "
    "--forecast, --gate) is given.",
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
    type=click.IntRange(1, MAX_IMAGES),
    default=64,
    show_default=True,
    help="Number of images. Under torchrun write -n or --images: torchrun's own parser takes --num "
    "for its --numa-binding.",
)
@click.option(
    "--batch",
    type=click.IntRange(1, MAX_IMAGES),
    default=16,
    show_default=True,
    help="Images per denoiser call (guidance doubles it).",
)
@click.option(
    "--class",
    "classes",
    multiple=True,
    help="Class label(s), by index or by name (--class sneaker, as the checkpoint names them), cycled over "
    "the images (repeat the option); default: every class in consecutive blocks as equal as --num allows, "
    "one grid row per class when --num is a multiple of the class count.",
)
@click.option(
    "--cfg",
    type=click.FloatRange(-MAX_GUIDANCE, MAX_GUIDANCE),
    default=1.0,
    show_default=True,
    help="Classifier-free guidance scale (1 = none).",
)
@click.option(
    "--cfg-interval",
    default=None,
    metavar="LO:HI",
    help="Guide only the steps whose noise level sigma is within LO:HI (a bound may be left out), e.g. 4:14: "
    "a guided step costs twice an unguided one (see the steps' sigmas with --plan). Default: every step.",
)
@click.option(
    "--cfg-cache",
    default=None,
    metavar="LO:HI",
    help="Guided steps with sigma within LO:HI run the conditional half only and reuse the difference "
    "between the halves from the last step that ran both (half the bricks' work at those steps).",
)
@click.option(
    "--cache",
    default=None,
    metavar="RULES",
    help="Brick caching, 'BRICK@LO:HI,...': brick k runs only for sigma within LO:HI and elsewhere takes its "
    "cached correction, handing it on to the bricks after it (brick 0 too), e.g. '1@0.3:,2@0.3:' or '0@0.5:'.",
)
@click.option(
    "--forecast",
    type=click.IntRange(0, 2),
    default=0,
    show_default=True,
    help="A cached correction: 0 the last one, 1 linear, 2 quadratic extrapolation in log sigma (with "
    "--cache or --gate).",
)
@click.option(
    "--gate",
    type=float,
    default=None,
    help="Per image: run the bricks after brick 0 only when brick 0's estimate moved by this relative L1 "
    "change since the image's last full evaluation; otherwise take their cache (0: always run). Decided at "
    "run time; --plan shows the upper bound.",
)
@click.option(
    "--gate-signal",
    type=click.Choice(["brick0", "input"]),
    default="brick0",
    show_default=True,
    help="What --gate measures: brick 0's estimate (gates the bricks after it), or the bricks' input c_in x "
    "(gates every brick, brick 0 too).",
)
@click.option(
    "--churn",
    "s_churn",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="EDM stochastic sampling strength S_churn (0 = deterministic); the LEGO authors' FID recipe uses 10.",
)
@click.option(
    "--s-min",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="With --churn: lowest sigma that gets fresh noise.",
)
@click.option("--s-max", default=float("inf"), show_default=True, help="With --churn: highest sigma that gets it.")
@click.option(
    "--s-noise",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="With --churn: noise inflation (authors: 1.003).",
)
@click.option(
    "--seed",
    type=click.IntRange(0, MAX_SEED),
    default=0,
    show_default=True,
    help="Image i's noise depends only on (seed, i).",
)
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
    type=click.Choice(COMPUTE_PRECISIONS),
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
@click.option(
    "--threads",
    type=click.IntRange(0, MAX_THREADS),
    default=0,
    show_default=True,
    help="ONNX Runtime / OpenVINO threads (0 = all cores).",
)
@click.option(
    "--cuda-graphs", is_flag=True, help="TensorRT backend: capture each engine once per batch size and replay it."
)
@click.option(
    "--out",
    default=DEFAULT_OUT,
    show_default=True,
    help="PNG grid of all images; without --out it goes to grid.png in the current folder (the line "
    "'wrote ...' names it). Its folder must exist.",
)
@click.option("--out-dir", default=None, help="Also write one PNG per image here.")
@click.option("--save-npz", default=None, help="Also write images (float32 N x C x H x W in [-1, 1]) and labels.")
@click.option(
    "--save-latents",
    default=None,
    help="Latent models: also write the raw latents (float32 N x C x h x w, before the decoder) as .npz.",
)
@click.option(
    "--columns",
    type=click.IntRange(1, 4096),
    default=None,
    help="Grid columns [default: one row per class when every class comes in equal blocks (no --class, "
    f"--num a multiple of the class count), else {GRID_COLUMNS}].",
)
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
@click.version_option(package_name="lego-export", prog_name="lego-run")
@one_line_errors()
def main(**params) -> None:
    """Sample images from LEGO brick engines, chaining or skipping bricks per step.

    \b
    lego-run --engines engines/ --steps 50 --skip-late-bricks
    lego-run --engines engines/ --resolution 32x96 --class sneaker --num 8 --out wide.png
    lego-run --engines engines/ --steps 50 --skip-late-bricks --plan
    """
    try:
        run(**params)
    except OptionError as e:
        raise e.renamed(FLAGS) from None


def run(
    *,
    engines: str,
    no_recommended: bool,
    quality: str | None,
    resolution: str | None,
    num: int,
    batch: int,
    classes: tuple[str, ...],
    seed: int,
    backend: str,
    precision: str,
    ckpt: str | None,
    device: str,
    threads: int,
    cuda_graphs: bool,
    out: str | None,
    out_dir: str | None,
    save_npz: str | None,
    save_latents: str | None,
    columns: int,
    plan_only: bool,
    timing_json: str | None,
    profile: bool,
    **sampling,
) -> None:
    from lego_export.manifest import Manifest

    fields = given_options(sampling)
    save_npz, save_latents = npz_path(save_npz), npz_path(save_latents)
    if not plan_only:
        check_outputs(out, out_dir, save_npz, timing_json)
        check_output(save_latents, "--save-latents")
        check_parent(save_latents, "--save-latents")
    if cuda_graphs and backend not in ("tensorrt", "auto"):
        raise LegoError("--cuda-graphs applies to the TensorRT backend only")
    manifest = Manifest.read(engines)
    model = manifest.model
    canvas = parse_canvas(resolution) if resolution else (model.img_resolution,) * 2
    if quality is not None:  # a named point, whatever the recommended setting is
        options, recommended = resolve_quality(fields, manifest.recommended, quality)
        tuned = manifest.recommended
    else:
        tuned = None if no_recommended else manifest.recommended
        options, recommended = resolve(fields, tuned.options if tuned else None)
    steps = plan(options, model, canvas, seed)  # every option and the canvas checked before loading
    announce = None  # said once everything is checked and loaded, by rank 0 only
    if quality is not None:
        announce = f"sampling setting: the model's named point {quality!r} ({options.describe()})"
    elif recommended:
        announce = f"sampling setting: the model's recommended ({describe_recommended(tuned)})"
    if plan_only:
        if announce:
            click.echo(announce)
        click.echo(f"options: {options.describe()}; skip policy: {options.skip_policy(model).description}")
        click.echo(plan_table_for(model, steps))
        if options.gate is not None:
            click.echo(
                f"decided at run time: per image, bricks 1-{len(model.bricks) - 1} run only where brick 0's "
                f"estimate moved by >= {options.gate:g} (relative L1) since the image's last full evaluation; "
                "the table is the upper bound"
            )
        return

    check_request(num=num, batch=batch, seed=seed, canvas=canvas, channels=model.img_channels)
    check_classes(list(classes), model.num_classes, manifest.class_names)
    if save_latents and manifest.latent is None:
        raise LegoError("--save-latents: this model samples images directly (no latent space in its manifest)")
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
    if save_latents and world > 1:
        raise LegoError("--save-latents is not supported under torchrun yet; run one process")
    if announce and rank == 0:
        click.echo(announce)
    indices = list(range(rank, num, world))
    from tqdm import tqdm

    evaluations = -(-len(indices) // batch) * options.steps
    if rank == 0:  # before the first step: also the line a caller can wait for before signalling
        said = f"sampling {num} image(s) on {pipe.backend.name}: {evaluations} steps of batch {batch}"
        click.echo(f"{said}; backend {pipe.backend.choice}", err=True)  # one line: how the backend was chosen
    with tqdm(total=evaluations, unit="step", disable=rank != 0 or None, file=sys.stderr, leave=False) as bar:

        def step_done(_step: int) -> None:
            check_interrupted()
            bar.update(1)

        result = pipe(
            options,
            num=num,
            resolution=canvas,
            classes=list(classes) or None,
            seed=seed,
            batch=batch,
            indices=indices,
            progress=step_done,
        )
    result.recommended = recommended
    images, labels, timing = _gather(result, indices, rank, world)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()  # every rank, before any exits: gloo aborts on a peer gone early
    if rank != 0:
        return
    record = run_record(pipe, result, canvas, seed, len(images), world)
    written: list[str] = []
    try:
        if save_latents:
            with atomic_write(save_latents) as f:
                np.savez(f, latents=result.latents)
            written.append(save_latents)
        columns = columns or grid_columns(num, classes, model.num_classes)
        write_outputs(images, labels, out, out_dir, save_npz, columns, written, record)
        if timing_json:
            with atomic_write(timing_json) as f:
                f.write(json.dumps({**timing.summary(), **record}, indent=2).encode())
            written.append(timing_json)
    except KeyboardInterrupt:
        done = f"written whole before it: {', '.join(written)}" if written else "no output was written"
        raise LegoError(f"interrupted while writing outputs; {done}; no partial file was left") from None
    click.echo(
        f"options: {options.describe()}; skip policy: {options.skip_policy(model).description}; "
        f"backend {pipe.backend.name}; canvas {canvas[0]}x{canvas[1]}; seed {seed}; {world} process(es)"
    )
    click.echo(timing.table())
    if out and click.get_current_context().get_parameter_source("out") is ParameterSource.DEFAULT:
        written[written.index(out)] = f"{out} (the default --out, in {Path.cwd()})"
    click.echo(f"wrote {', '.join(written)}" if written else "wrote nothing (no output asked for)")


if __name__ == "__main__":
    main()
