"""Full-size LEGO geometries: export, engine sizes, peak memory and one denoiser evaluation on this machine.

    python benchmarks/scale.py --out benchmarks/results/scale   # the four default presets (below)
    python benchmarks/scale.py --preset pg-tiny --reps 1 --batches 1   # a smoke run, under a minute
    python benchmarks/scale.py --preset pg-paper-l-64:3 --max-batch 2 --batches 1,2 --reps 3

For each preset (NAME[:CHANNELS], 1000 classes; 3 channels for the 64 x 64 pixel models, 4 for the
32 x 32 latent ones unless given), three child processes, so that peak memory does not mix:
  1. checkpoint: the model, randomly initialised (torch.manual_seed, then small normal noise on every
     weight, adaLN-Zero's zeros included, so every brick changes its input), saved with save_checkpoint;
  2. export: the real exporter, lego_export.export.build.build (ONNX + ONNX Runtime-fused graphs, both
     verified against PyTorch on recorded inputs), timed per stage; peak RSS (getrusage and VmHWM at
     every stage);
  3. run: LegoPipeline.from_engines on ONNX Runtime (CPU), one denoiser evaluation (= one Euler step)
     at each batch, full chain and with the last brick skipped, median of --reps calls after one warm-up.
Also, without exporting: the fp32 parameter bytes of every brick of every published geometry against
ONNX's 2 GiB protobuf limit per file. dit-paper-xl (the one-brick DiT-XL/2 baseline, 2.69 GB in one brick)
is in the default list as a probe of that limit: its export is expected to fail, and where it fails is
recorded. --merge replaces only the given presets in an existing OUT.json (to redo one preset).

The export's largest N is --max-batch images' worth of tiles: verification runs PyTorch and ONNX Runtime
at N = 1, 3 and that maximum for both graphs of every brick, and one 64 x 64 tile of a width-1024
brick costs about 0.36 TFLOP. Prints the report; with --out PREFIX also writes PREFIX.json and PREFIX.md.
A preset that fails exits non-zero (after the report), unless it is one whose largest brick the
protobuf check puts over the limit and it fails at export, as expected.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, one_evaluation, one_line_errors, out_option, save_results, write_text  # noqa: E402

PROTOBUF_LIMIT = 2**31  # bytes: one serialised ONNX ModelProto must stay below 2 GiB
# dit-paper-xl (the one-brick DiT-XL/2 baseline) is the one preset whose brick passes 2 GiB: a probe of the limit.
DEFAULT_PRESETS = ("pg-paper-l-64", "pr-paper-l-64", "u-paper-xl-32", "dit-paper-xl")
NUM_CLASSES = 1000
NOISE_STD = 0.02


def default_channels(name: str) -> int:
    """The authors' 64 x 64 models are pixel models (RGB); their 32 x 32 ones run in the SD VAE's latent space."""
    return 3 if name.endswith("-64") else 4


def parse_preset(text: str) -> tuple[str, int]:
    name, _, channels = text.partition(":")
    return name, int(channels) if channels else default_channels(name)


def short_path(path: str) -> str:
    """A source path from the package or library folder on, for tracebacks in the results."""
    parts = Path(path).parts
    for anchor in ("site-packages", "lego_export", "benchmarks"):
        if anchor in parts:
            i = parts.index(anchor)
            return "/".join(parts[i + (anchor == "site-packages") :])
    return path


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def proc_status() -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


class OtherLoad:
    """Share of the machine's CPU time used by other processes between start() and stop(): a measure
    of how noisy a timing is (0 on a quiet machine)."""

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    def stop(self) -> float:
        wall = time.perf_counter() - self.t0
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, other / (wall * (os.cpu_count() or 1)))

    @staticmethod
    def _busy() -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle and iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime


def make_config(name: str, channels: int):
    from lego_export.config import get_preset

    return get_preset(name, img_channels=channels, num_classes=NUM_CLASSES)


# ---------------------------------------------------------------------------------------------
# Phases, each run in its own process.


def phase_checkpoint(name: str, channels: int, work: Path, seed: int) -> dict:
    import torch

    from lego_export.checkpoint import save_checkpoint
    from lego_export.model import LegoModel

    torch.manual_seed(seed)
    start = time.perf_counter()
    model = LegoModel(make_config(name, channels)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=NOISE_STD)
    built = time.perf_counter() - start
    ckpt = work / "model.safetensors"
    start = time.perf_counter()
    save_checkpoint(ckpt, model, extra={"note": f"random weights (seed {seed}, noise std {NOISE_STD})"})
    saved = time.perf_counter() - start
    return {
        "parameters": model.num_parameters(),
        "brick_parameters": [sum(p.numel() for p in b.parameters()) for b in model.bricks],
        "embedder_parameters": sum(p.numel() for p in model.embedder.parameters()),
        "checkpoint_bytes": ckpt.stat().st_size,
        "init_seconds": round(built, 2),
        "save_seconds": round(saved, 2),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def phase_export(work: Path, max_batch: int, opt_batch: int, fuse: bool) -> dict:
    from lego_export.export.build import BuildOptions, build

    events: list[dict[str, Any]] = []
    start = time.perf_counter()

    def progress(message: str) -> None:
        events.append({"t": time.perf_counter() - start, "stage": message, **proc_status()})
        print(f"  [{events[-1]['t']:7.1f} s, peak {events[-1]['VmHWM'] / 2**30:5.2f} GiB] {message}", file=sys.stderr)

    result: dict = {"max_batch": max_batch, "opt_batch": opt_batch, "fuse": fuse}
    try:
        manifest = build(
            BuildOptions(
                ckpt=str(work / "model.safetensors"),
                out=str(work / "engines"),
                max_batch=max_batch,
                opt_batch=opt_batch,
                fuse=fuse,
            ),
            progress,
        )
    except Exception as e:  # report how far it got, whatever failed
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        frames = traceback.extract_tb(e.__traceback__)[-8:]
        result["error_frames"] = [f"{short_path(f.filename)}:{f.lineno} {f.name}" for f in frames]
        manifest = None
    total = time.perf_counter() - start
    events.append({"t": total, "stage": "done" if manifest else "failed", **proc_status()})
    # Stage durations: from one progress message to the next; the first stage loads the checkpoint and
    # records every engine's inputs while the model denoises a few canvases.
    first = "load checkpoint + record inputs"
    stages = [{"stage": first, "seconds": round(events[0]["t"], 2), "peak_rss_bytes_after": events[0]["VmHWM"]}]
    for a, b in zip(events, events[1:], strict=False):
        stages.append({"stage": a["stage"], "seconds": round(b["t"] - a["t"], 2), "peak_rss_bytes_after": b["VmHWM"]})
    result.update(
        {
            "seconds": round(total, 2),
            "stages": stages,
            "peak_rss_bytes": peak_rss_bytes(),
            "last_stage": events[-2]["stage"] if len(events) > 1 else first,
        }
    )
    if manifest is not None:
        result["engines"] = [
            {
                "name": e.name,
                "batch": e.batch,
                "export_seconds": e.files["onnx"].build.get("export_seconds"),
                "files": {
                    fmt: {
                        "path": f.path,
                        "bytes": f.bytes,
                        "relative_error": (f.verification or {}).get("relative_error"),
                        "verified_batches": (f.verification or {}).get("batches"),
                    }
                    for fmt, f in e.files.items()
                },
            }
            for e in manifest.engines
        ]
    return result


def phase_run(work: Path, batches: list[int], reps: int, seed: int) -> dict:
    from lego_export.flops import model_brick_flops
    from lego_export.plan import StepPlan
    from lego_export.runtime.pipeline import LegoPipeline

    start = time.perf_counter()
    pipe = LegoPipeline.from_engines(work / "engines", "onnxruntime")
    load_seconds = time.perf_counter() - start
    rss_after_load = peak_rss_bytes()
    cfg = pipe.cfg
    flops = model_brick_flops(cfg)
    bricks = len(cfg.bricks)
    rng = np.random.default_rng(seed)
    a = pipe.arrays
    sigma = 1.0
    rows = []
    for batch in batches:
        x = (rng.standard_normal((batch, cfg.img_channels, cfg.img_resolution, cfg.img_resolution)) * 1.5).astype(
            np.float32
        )
        onehot = np.eye(cfg.num_classes, dtype=np.float32)[rng.integers(0, cfg.num_classes, size=batch)]
        xa, oa = a.from_numpy(x), a.from_numpy(onehot)
        full = None
        for used in [k for k in (bricks, bricks - 1) if k >= 1]:  # a one-brick model has nothing to skip
            plan = StepPlan(0, sigma, used, (0, 0))
            out = a.to_numpy(pipe.denoise(xa, sigma, plan, oa))  # warm-up
            samples = []
            load = OtherLoad()
            load.start()
            for _ in range(reps):
                t0 = time.perf_counter()
                out = a.to_numpy(pipe.denoise(xa, sigma, plan, oa))
                samples.append(time.perf_counter() - t0)
            other = load.stop()
            timing = one_evaluation(pipe, used, batch, seed=seed).timing  # the same work, its engine calls timed
            median = float(np.median(samples))
            gflop = batch * sum(flops[:used]) / 1e9
            rows.append(
                {
                    "batch": batch,
                    "bricks": used,
                    "median_s": median,
                    "min_s": float(np.min(samples)),
                    "reps": reps,
                    "other_cpu_share": other,
                    "gflop": gflop,
                    "gflop_per_s": gflop / median,
                    "engine_ms_per_call": {
                        k: v / timing.engine_calls[k] for k, v in sorted(timing.engine_ms.items(), key=lambda kv: kv[0])
                    },
                    "output_finite": bool(np.isfinite(out).all()),
                    "output_std": float(out.std()),
                    # how much the skipped brick changes the estimate (0 would mean a trivial brick)
                    "difference_to_full_chain_std": None if full is None else float((out - full).std()),
                }
            )
            full = out if full is None else full
            print(
                f"  batch {batch}, {used} bricks: {median:.2f} s ({gflop / median:.0f} GFLOP/s; "
                f"other processes {other:.0%} of the CPU)",
                file=sys.stderr,
            )
    return {
        "load_seconds": round(load_seconds, 2),
        "peak_rss_bytes_after_load": rss_after_load,
        "peak_rss_bytes": peak_rss_bytes(),
        "sigma": sigma,
        "steps": rows,
    }


# ---------------------------------------------------------------------------------------------
# Parameter bytes per brick of the published geometries (no export).


def protobuf_check() -> list[dict]:
    """fp32 bytes of every brick's weights and constants (the position embedding is folded into the
    graph as a constant) for every published geometry, against the 2 GiB limit of one ONNX file."""
    import torch

    from lego_export.config import PRESETS
    from lego_export.model import LegoModel

    rows = []
    for name in sorted(PRESETS):
        if "-paper-" not in name or (name.count("-") == 2 and not name.startswith("dit")):
            continue  # the -32/-64 names cover the authors' models; dit-paper-* are the one-brick baselines
        channels = default_channels(name)
        with torch.device("meta"):
            model = LegoModel(make_config(name, channels))
        sizes = [
            4 * (sum(p.numel() for p in b.parameters()) + sum(t.numel() for t in b.buffers())) for b in model.bricks
        ]
        largest = int(np.argmax(sizes))
        rows.append(
            {
                "preset": name,
                "channels": channels,
                "parameters": model.num_parameters(),
                "brick_bytes": sizes,
                "largest_brick": f"brick{largest}",
                "largest_bytes": sizes[largest],
                "fraction_of_limit": sizes[largest] / PROTOBUF_LIMIT,
                "over_limit": sizes[largest] >= PROTOBUF_LIMIT,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Driver.


def child(phase: str, preset: str, work: Path, result: Path, options: dict) -> tuple[dict | None, float, int]:
    """Run one phase in a fresh interpreter; its JSON result, wall seconds and exit code."""
    args = [sys.executable, __file__, "--phase", phase, "--preset", preset]
    args += ["--work", str(work), "--result", str(result)]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            args += [flag] if value else []
        else:
            args += [flag, str(value)]
    start = time.perf_counter()
    code = subprocess.run(args, check=False).returncode
    seconds = time.perf_counter() - start
    data = json.loads(result.read_text()) if result.exists() else None
    return data, seconds, code


def gib(n: int | None) -> float | None:
    return None if n is None else n / 2**30


def markdown(data: dict) -> str:
    versions = data["machine"]["versions"]
    lines = [
        "# Full-size LEGO geometries on this machine",
        "",
        f"{data['machine']['cpu']}, {data['machine']['cores']} cores, torch {versions.get('torch')}, "
        f"onnxruntime {versions.get('onnxruntime')}. Random weights, {NUM_CLASSES} classes; ONNX and ONNX "
        "Runtime-fused graphs of every brick, both verified against PyTorch by the exporter. Produced by:",
        "",
    ]
    for run in data["runs"]:
        o = run["options"]
        lines.append(
            f"- `{run['command']}`: {run['minutes']:.1f} min; engines for up to {o['max_batch']} images per call "
            f"(opt {o['opt_batch']}), timings the median of {o['reps']} calls after one warm-up; load average "
            f"{run['load_average_start']} at the start, {run['load_average_end']} at the end"
        )
    lines += [
        "",
        "Other processes shared the machine: each timing records the share of the CPU they used while it ran "
        "(`other CPU`, `-` where not recorded); timings with a large share are slower than this machine's quiet rate.",
        "",
        "## Export and one denoiser evaluation",
        "",
    ]
    summary = []
    for p in data["presets"]:
        ck, ex, run = p.get("checkpoint") or {}, p.get("export") or {}, p.get("run") or {}
        steps = {(s["batch"], s["bricks"]): s for s in run.get("steps", [])}
        full = steps.get((1, p["bricks"]))
        skip = steps.get((1, p["bricks"] - 1))
        full2 = steps.get((2, p["bricks"]))
        summary.append(
            {
                "preset": p["preset"],
                "shape": f"{p['channels']}x{p['resolution']}x{p['resolution']}",
                "params": (ck.get("parameters") or 0) / 1e6,
                "ckpt": gib(ck.get("checkpoint_bytes")),
                "export": ex.get("seconds"),
                "files": gib(sum(f["bytes"] for e in ex.get("engines", []) for f in e["files"].values()) or None),
                "rss_export": gib(ex.get("peak_rss_bytes")),
                "rss_run": gib(run.get("peak_rss_bytes")),
                "step1": full and full["median_s"],
                "skip1": skip and skip["median_s"],
                "step2": full2 and full2["median_s"],
                "status": "ok" if run.get("steps") else ex.get("error", p.get("status", "-")),
            }
        )
    lines.append(
        markdown_table(
            summary,
            [
                ("preset", "preset", "s"),
                ("shape", "C x H x W", "s"),
                ("params", "parameters (M)", ".1f"),
                ("ckpt", "checkpoint (GiB)", ".2f"),
                ("export", "export wall (s)", ".0f"),
                ("files", "engine files (GiB)", ".2f"),
                ("rss_export", "export peak RSS (GiB)", ".2f"),
                ("rss_run", "runtime peak RSS (GiB)", ".2f"),
                ("step1", "1 evaluation, batch 1 (s)", ".2f"),
                ("skip1", "last brick skipped, batch 1 (s)", ".2f"),
                ("step2", "1 evaluation, batch 2 (s)", ".2f"),
                ("status", "status", "s"),
            ],
        )
    )
    for p in data["presets"]:
        ex, run = p.get("export") or {}, p.get("run") or {}
        c = p["config"]
        lines += [
            "",
            f"### {p['preset']} ({p['channels']} x {p['resolution']} x {p['resolution']})",
            "",
            f"Bricks {' / '.join(map(str, c['sizes']))}, patches {' / '.join(map(str, c['patches']))}, depths "
            f"{' / '.join(map(str, c['depths']))}, width {c['width']}; `{p['command']}`.",
            "",
        ]
        stage_rows = [
            {"stage": s["stage"], "seconds": s["seconds"], "peak": gib(s.get("peak_rss_bytes_after"))}
            for s in ex.get("stages", [])
        ]
        if ex.get("engines"):
            rows = []
            for e in ex["engines"]:
                onnx, ort = e["files"].get("onnx", {}), e["files"].get("onnx-ort", {})
                rows.append(
                    {
                        "engine": e["name"],
                        "N": f"{e['batch']['min']}..{e['batch']['max']}",
                        "onnx": onnx.get("bytes", 0) / 2**20,
                        "ort": ort.get("bytes", 0) / 2**20 if ort else None,
                        "params": p["param_bytes"].get(e["name"], 0) / 2**20,
                        "seconds": e["export_seconds"],
                        "err": max(f["relative_error"] for f in e["files"].values()),
                    }
                )
            lines.append(
                markdown_table(
                    rows,
                    [
                        ("engine", "engine", "s"),
                        ("N", "N range", "s"),
                        ("params", "fp32 weights (MiB)", ".1f"),
                        ("onnx", ".onnx (MiB)", ".1f"),
                        ("ort", ".ort.onnx (MiB)", ".1f"),
                        ("seconds", "export + fuse + verify (s)", ".1f"),
                        ("err", "worst relative error", ".1e"),
                    ],
                )
            )
            lines.append("")
        if ex.get("error"):
            lines += [f"Export failed at `{ex.get('last_stage')}`: `{ex['error']}`", ""]
            if ex.get("error_frames"):
                lines += ["```", *ex["error_frames"], "```", ""]
        lines.append(
            markdown_table(
                stage_rows,
                [("stage", "export stage", "s"), ("seconds", "seconds", ".1f"), ("peak", "peak RSS (GiB)", ".2f")],
            )
        )
        if run.get("steps"):
            lines += ["", f"Runtime: engines loaded (sha256 checked) in {run['load_seconds']:.1f} s.", ""]
            step_rows = [
                {**s, "engines": ", ".join(f"{k} {v / 1e3:.2f}" for k, v in s["engine_ms_per_call"].items())}
                for s in run["steps"]
            ]
            lines.append(
                markdown_table(
                    step_rows,
                    [
                        ("batch", "batch", "d"),
                        ("bricks", "bricks run", "d"),
                        ("median_s", "median (s)", ".2f"),
                        ("gflop", "GFLOP", ".0f"),
                        ("gflop_per_s", "GFLOP/s", ".0f"),
                        ("other_cpu_share", "other CPU", ".0%"),
                        ("engines", "per engine call (s)", "s"),
                    ],
                )
            )
    lines += [
        "",
        "## fp32 bytes per brick against ONNX's 2 GiB limit per file",
        "",
        "Weights and folded constants of every brick (channels: 3 for the 64 x 64 presets, 4 for the 32 x 32 "
        "ones), computed from the model on the meta device, without exporting.",
        "",
    ]
    check_rows = [
        {
            **r,
            "bricks": " / ".join(f"{b / 1e9:.3f}" for b in r["brick_bytes"]),
            "params": r["parameters"] / 1e6,
            "largest": f"{r['largest_brick']} {r['largest_bytes']:,}",
            "over": "yes" if r["over_limit"] else "no",
        }
        for r in data["protobuf_check"]
    ]
    lines.append(
        markdown_table(
            check_rows,
            [
                ("preset", "preset", "s"),
                ("params", "parameters (M)", ".1f"),
                ("bricks", "bytes per brick (GB)", "s"),
                ("largest", "largest brick (bytes)", "s"),
                ("fraction_of_limit", "of 2^31", ".0%"),
                ("over", "over the limit", "s"),
            ],
        )
    )
    return "\n".join(lines) + "\n"


def failures(presets: list[dict], over_limit: set[str]) -> list[str]:
    """One line per preset that failed, but for an export failure of a preset over the protobuf limit
    (expected: that is what the probe is for)."""
    lines = []
    for p in presets:
        status = p.get("status")
        if status is None or (status.startswith("export failed") and p["preset"] in over_limit):
            continue
        phase = (p.get(status.split()[0]) or {}) if status else {}
        lines.append(f"{p['preset']}: {status}" + (f": {phase['error']}" if phase.get("error") else ""))
    return lines


@click.command()
@click.option(
    "--preset",
    "presets",
    multiple=True,
    help="NAME[:CHANNELS]; repeat. Default: " + ", ".join(DEFAULT_PRESETS),
)
@click.option("--max-batch", default=2, show_default=True, help="Images per engine call (the export's largest N).")
@click.option("--opt-batch", default=None, type=int, help="Optimisation point (default --max-batch).")
@click.option("--no-fuse", is_flag=True, help="Skip the ONNX Runtime-fused graphs.")
@click.option("--batches", default="1,2", show_default=True, help="Batches for the denoiser evaluation.")
@click.option("--reps", default=3, show_default=True, help="Timed evaluations per setting (after one warm-up).")
@click.option("--seed", default=0, show_default=True)
@click.option("--work", default=None, help="Folder for checkpoints and engines (default: a temporary folder).")
@click.option("--keep", is_flag=True, help="Keep each preset's checkpoint and engines.")
@out_option("benchmarks/results/scale")
@click.option("--merge", is_flag=True, help="Replace only these presets in an existing OUT.json, keep the others.")
@click.option("--phase", type=click.Choice(["checkpoint", "export", "run"]), default=None, hidden=True)
@click.option("--result", default=None, hidden=True)
@one_line_errors
def main(presets, max_batch, opt_batch, no_fuse, batches, reps, seed, work, keep, out, merge, phase, result) -> None:
    """Full-size geometries: export, engine sizes, peak memory and one denoiser evaluation."""
    if merge and out is None:
        raise click.UsageError("--merge replaces presets in OUT.json: give --out PREFIX")
    opt_batch = opt_batch or max_batch
    batch_list = [int(b) for b in batches.split(",") if b]
    if phase is not None:  # a child process: one phase of one preset
        name, channels = parse_preset(presets[0])
        if phase == "checkpoint":
            data = phase_checkpoint(name, channels, Path(work), seed)
        elif phase == "export":
            data = phase_export(Path(work), max_batch, opt_batch, not no_fuse)
        else:
            data = phase_run(Path(work), batch_list, reps, seed)
        write_text(Path(result), json.dumps(data, indent=2))
        return

    command = " ".join(["python benchmarks/scale.py", *sys.argv[1:]])
    started = time.perf_counter()
    load_start = os.getloadavg()
    root = Path(work) if work else Path(tempfile.mkdtemp(prefix="lego-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    options = {
        "max_batch": max_batch,
        "opt_batch": opt_batch,
        "no_fuse": no_fuse,
        "batches": batches,
        "reps": reps,
        "seed": seed,
    }
    results = []
    for text in presets or DEFAULT_PRESETS:
        name, channels = parse_preset(text)
        cfg = make_config(name, channels)
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        spec = f"{name}:{channels}"
        entry: dict = {
            "preset": name,
            "command": command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "channels": channels,
            "resolution": cfg.img_resolution,
            "bricks": len(cfg.bricks),
            "config": {
                "sizes": [b.size for b in cfg.bricks],
                "patches": [b.patch for b in cfg.bricks],
                "depths": [b.depth for b in cfg.bricks],
                "width": cfg.bricks[0].width,
                "cond_dim": cfg.cond_dim,
                "num_classes": cfg.num_classes,
            },
        }
        print(f"{spec}: checkpoint", file=sys.stderr)
        for phase_name in ("checkpoint", "export", "run"):
            if phase_name != "checkpoint":
                print(f"{spec}: {phase_name}", file=sys.stderr)
            data, seconds, code = child(phase_name, spec, folder, folder / f"{phase_name}.json", options)
            entry[phase_name] = data
            entry[f"{phase_name}_process_seconds"] = round(seconds, 1)
            if code != 0 or data is None or data.get("error"):
                entry["status"] = f"{phase_name} failed (exit {code})"
                break
        ck = entry.get("checkpoint") or {}
        entry["param_bytes"] = {f"brick{k}": 4 * n for k, n in enumerate(ck.get("brick_parameters", []))}
        entry["param_bytes"]["embedder"] = 4 * ck.get("embedder_parameters", 0)
        results.append(entry)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    if not work and not keep:
        shutil.rmtree(root, ignore_errors=True)

    run = {
        "command": command,
        "options": options,
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    runs, this_run = [], {p["preset"] for p in results}
    if merge and Path(f"{out}.json").exists():
        previous = json.loads(Path(f"{out}.json").read_text())
        runs = previous.get("runs", [])
        names = {r["preset"] for r in results}
        kept = [p for p in previous.get("presets", []) if p["preset"] not in names]
        order = [p["preset"] for p in previous.get("presets", [])]
        results = sorted(kept + results, key=lambda p: order.index(p["preset"]) if p["preset"] in order else len(order))
    check = protobuf_check()
    data = {
        "machine": machine(),
        "runs": [*runs, run],
        "protobuf_limit_bytes": PROTOBUF_LIMIT,
        "presets": results,
        "protobuf_check": check,
    }
    save_results(out, data, markdown(data))
    ran = [p for p in results if p["preset"] in this_run]  # with --merge: not the kept presets' old failures
    failed = failures(ran, {r["preset"] for r in check if r["over_limit"]})
    if failed:
        raise click.ClickException(f"{len(failed)} preset(s) failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
