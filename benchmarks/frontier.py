"""FID against images/s for every sampler x steps x skip x residual-reuse x precision combination.

    python benchmarks/frontier.py --engines engines/ --num 2000

Every row samples the same noise and classes. Each runtime (ONNX Runtime fp32, every row; OpenVINO
fp32, int8 and bf16, the rows near the frontier) samples in its own worker process, which saves the
images; this process then scores them, so no thread pool of one runtime (or of PyTorch, for the
classifier) slows another.
Quality as in quality.py: FID in the feature space of the committed Fashion-MNIST classifier, against
the 10k test images. Speed is each row's wall time (rows run one after another, so machine drift
enters the ratios) and its brick FLOPs, which do not drift. The reference row is Heun, 50 steps,
full chain, fp32; the recommended row is the setting `lego-export tune` wrote into the manifest.
Writes OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save_figure, write_json, write_text  # noqa: E402

from lego_export.edm import evaluations  # noqa: E402
from lego_export.manifest import Manifest  # noqa: E402

# (sampler, steps, skip: a --t-break of --skip-late-bricks or a --skip-policy, residual reuse).
# The first row is the reference; the second is the documented default command.
COMBOS = [
    ("heun", 50, 0.0, False),
    ("heun", 50, 0.2, False),
    ("heun", 18, 0.0, False),
    ("heun", 18, 0.2, False),
    ("euler", 18, 0.0, False),
    ("dpm2m", 18, 0.0, False),
    ("dpm2m", 18, 0.4, False),
    ("dpm2m", 18, 0.4, True),
    ("dpm2m", 12, 0.0, False),
    ("dpm2m", 12, 0.3, False),
    ("dpm2m", 12, 0.3, True),
]
# Other runtimes and precisions: the rows near the frontier (plus the recommended one), not all.
OTHER_RUNTIME_COMBOS = [("dpm2m", 18, 0.0, False), ("dpm2m", 12, 0.0, False), ("dpm2m", 12, 0.3, True)]
# The recommended setting with classifier-free guidance (first runtime only): at every step, and only
# at the steps within a sigma interval (a guided step runs its bricks twice).
GUIDED = [
    {"guidance": 1.25},
    {"guidance": 1.5, "guidance_interval": "4:5"},
    {"guidance": 1.5, "guidance_interval": "4:14"},
]
RUNTIMES = ("onnxruntime:fp32", "openvino:fp32", "openvino:int8", "openvino:bf16")


def worker(engines: str, runtime: str, combos: list, num: int, batch: int, folder: Path) -> None:
    """Sample every combo with one runtime; save images, labels and timings in folder (or, where
    this machine cannot run the runtime, why not, in refused.txt)."""
    from lego_export.errors import LegoError
    from lego_export.runtime.pipeline import LegoPipeline

    backend, precision = runtime.split(":")
    try:
        pipe = LegoPipeline.from_engines(engines, backend, precision=precision)
    except LegoError as e:  # e.g. bf16 on a CPU without bf16 units: the other runtimes still run
        (folder / "refused.txt").write_text(str(e))
        return
    rows = []
    for i, (sampler, steps, skip, reuse, name, *guided) in enumerate(combos):
        start = time.perf_counter()
        kwargs = {"skip": "late", "t_break": skip} if isinstance(skip, float) else {"skip": skip or "none"}
        kwargs.update(*guided)
        result = pipe(num=num, steps=steps, sampler=sampler, batch=batch, reuse_residual=reuse, **kwargs)
        seconds = time.perf_counter() - start
        np.savez(folder / f"{i}.npz", images=result.images, labels=result.labels)
        rows.append({"images_per_s": num / seconds, "flops_saved": result.timing.flops_saved})
        click.echo(f"{runtime} {name}: {num / seconds:.2f} images/s", err=True)
    (folder / "rows.json").write_text(json.dumps(rows))


def combos_for(runtime: str, manifest: Manifest, headline: bool = False) -> list:
    """(sampler, steps, skip, reuse, name[, guidance fields]) rows one runtime samples; headline: the
    reference (first runtime) and the recommended setting (guided too, on the first runtime) only."""
    base = COMBOS if runtime == RUNTIMES[0] else OTHER_RUNTIME_COMBOS
    if headline:
        base = COMBOS[:1] if runtime == RUNTIMES[0] else []
    rows = [(*c, f"{c[0]} {c[1]}, t-break {c[2]:.1f}{', reuse' if c[3] else ''}") for c in base]
    if manifest.recommended is not None:
        rec = manifest.recommended.options
        top = (rec.sampler, rec.steps, "" if rec.skip == "none" else rec.skip, rec.reuse_residual)
        guided = rec.guidance != 1.0
        own = {"guidance": rec.guidance, "guidance_interval": rec.guidance_interval} if guided else {}
        rows.append((*top, "recommended", own))
        if runtime == RUNTIMES[0] and guided:
            rows.append((*top, "recommended without guidance", {}))
        if runtime == RUNTIMES[0]:
            # The intervals were placed on the unguided 8-step setting's sigmas; a setting that
            # guides already is compared with guidance at every step only.
            for g in [g for g in GUIDED if not guided or "guidance_interval" not in g]:
                at = f" at sigma {g['guidance_interval']}" if "guidance_interval" in g else ""
                rows.append((*top, f"recommended, cfg {g['guidance']:g}{at}", g))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    groups = {
        ("onnxruntime", "fp32"): ("o", "ONNX Runtime fp32"),
        ("openvino", "fp32"): ("D", "OpenVINO fp32"),
        ("openvino", "int8"): ("s", "OpenVINO int8"),
        ("openvino", "bf16"): ("^", "OpenVINO bf16"),
    }
    for key, (marker, name) in groups.items():
        sub = [r for r in rows if (r["backend"], r["precision"]) == key]
        if sub:
            ax.scatter([r["images_per_s"] for r in sub], [r["fid"] for r in sub], marker=marker, label=name)
    tuned = [r for r in rows if r["label"] == "recommended"]
    ax.scatter(
        [r["images_per_s"] for r in tuned], [r["fid"] for r in tuned], s=220, facecolors="none",
        edgecolors="red", label="recommended setting (lego-export tune)",
    )  # fmt: skip
    for r in rows:
        text = "reference" if r["is_reference"] else "default command" if r["is_default"] else None
        if text:
            offset = (6, -12) if r["is_reference"] else (6, 4)
            ax.annotate(text, (r["images_per_s"], r["fid"]), textcoords="offset points", xytext=offset, fontsize=8)
    ref = next(r for r in rows if r["is_reference"])
    ax.axhline(ref["fid"] * 1.05, color="gray", ls="--", lw=0.8, label="1.05 x reference FID")
    ax.set_xscale("log")
    ax.set(xlabel="images/s (batch 64, 2 CPU cores)", ylabel="FID (classifier features)", title="quality against speed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def write_results(rows: list[dict], out: Path, command: str, num: int, host: dict, skipped: list[str]) -> None:
    """OUT.json, OUT.md (the table) and OUT.png (the plot) from the scored rows; skipped: the
    runtimes this machine could not run, each with why."""
    reference = rows[0]
    default = next((r for r in rows if r["is_default"]), None)  # absent from a --headline run
    for r in rows:
        r["fid_vs_reference"] = r["fid"] / reference["fid"]
        r["speed_vs_reference"] = r["images_per_s"] / reference["images_per_s"]
        r["speed_vs_default"] = r["images_per_s"] / default["images_per_s"] if default else None
        r["flops_vs_reference"] = reference["full_chain_evaluations"] / r["full_chain_evaluations"]
    held = [r for r in rows if r["fid_vs_reference"] <= 1.05]
    best = max(held, key=lambda r: r["images_per_s"])
    summary = {
        "fastest_within_1.05x_reference_fid": {
            k: best[k] for k in ("label", "backend", "precision", "fid", "images_per_s")
        },
        "its_speed_vs_default": best["speed_vs_default"],
    }
    data = {"command": command, "machine": host, "num": num, "summary": summary, "skipped": skipped, "rows": rows}
    write_json(Path(f"{out}.json"), data)
    columns = [
        ("label", "setting", ""),
        ("backend", "backend", ""),
        ("precision", "precision", ""),
        ("skip", "skip", ""),
        ("evaluations", "evaluations", "d"),
        ("fid", "FID", ".2f"),
        ("fid_vs_reference", "FID / ref.", ".2f"),
        ("class_accuracy", "class acc.", ".3f"),
        ("images_per_s", "images/s", ".2f"),
        ("speed_vs_reference", "speed / ref.", ".2f"),
        ("speed_vs_default", "speed / default", ".2f"),
        ("flops_vs_reference", "brick FLOPs / ref. (inverse)", ".2f"),
    ]
    table = markdown_table(rows, columns)
    write_text(
        Path(f"{out}.md"),
        f"# Quality against speed ({num} images per row, same noise)\n\n`{command}`\n\n"
        f"Reference: Heun, 50 steps, full chain, fp32 (first row); default: `--steps 50 --skip-late-bricks` "
        f"(second row). Rows ran one after another on {host['cpu']}, each runtime in its own process.\n\n"
        f"Fastest within 1.05x the reference FID: {best['label']} ({best['backend']}, {best['precision']}), "
        f"FID {best['fid']:.2f}, {best['images_per_s']:.2f} images/s"
        + (f" = {best['speed_vs_default']:.2f}x the default." if default else ".")
        + "".join(f"\n\nNot run on this machine: {s}." for s in skipped)
        + f"\n\n![frontier]({out.name}.png)\n\n{table}\n",
    )
    plot(rows, Path(f"{out}.png"))
    print(table)


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--num", default=2000, show_default=True, help="Images per row (same seed and classes for all).")
@click.option("--batch", default=64, show_default=True)
@click.option("--runtimes", default=",".join(RUNTIMES), show_default=True, help="BACKEND:PRECISION,... in order.")
@click.option("--out", default="benchmarks/results/frontier", show_default=True, help="Writes OUT.json, .md, .png.")
@click.option("--replot", is_flag=True, help="Only rewrite OUT.md and OUT.png from OUT.json (no sampling).")
@click.option("--headline", is_flag=True, help="Only the reference and the recommended rows.")
@click.option("--worker-runtime", default=None, hidden=True)
@click.option("--worker-folder", default=None, hidden=True)
def main(
    engines: str, num: int, batch: int, runtimes: str, out: str, replot, headline, worker_runtime, worker_folder
) -> None:
    if replot:
        saved = json.loads(Path(f"{out}.json").read_text())
        write_results(
            saved["rows"], Path(out), saved["command"], saved["num"], saved["machine"], saved.get("skipped", [])
        )
        return
    manifest = Manifest.read(engines)
    if worker_runtime:
        combos = combos_for(worker_runtime, manifest, headline)
        worker(engines, worker_runtime, combos, num, batch, Path(worker_folder))
        return
    import torch
    from quality import features_and_logits, load_classifier, to_input

    from lego_export.fid import fid
    from lego_export.tune import class_accuracy
    from lego_train.data import load_idx_dir

    torch.set_num_threads(2)
    rows, skipped = [], []
    for runtime in runtimes.split(","):
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, __file__, "--engines", engines, "--num", str(num), "--batch", str(batch)]
            command += ["--headline"] if headline else []
            subprocess.run([*command, "--worker-runtime", runtime, "--worker-folder", folder], check=True)
            refused = Path(folder) / "refused.txt"
            if refused.exists():
                skipped.append(f"{runtime} ({refused.read_text()})")
                click.echo(f"not run: {skipped[-1]}", err=True)
                continue
            timings = json.loads((Path(folder) / "rows.json").read_text())
            classifier = load_classifier(False)
            if not rows:
                test = load_idx_dir(Path("/usr/share/datasets/fashion-mnist"), split="test")
                test_feats, _ = features_and_logits(classifier, to_input(test.images))
            for i, ((sampler, steps, skip, reuse, label, *_), timing) in enumerate(
                zip(combos_for(runtime, manifest, headline), timings, strict=True)
            ):
                data = np.load(Path(folder) / f"{i}.npz")
                feats, logits = features_and_logits(classifier, torch.from_numpy(data["images"]))
                labels = data["labels"]
                accuracy = class_accuracy(logits, labels)
                backend, precision = runtime.split(":")
                rows.append(
                    {
                        "label": label,
                        "backend": backend,
                        "precision": precision,
                        "sampler": sampler,
                        "steps": steps,
                        "skip": skip if isinstance(skip, str) else f"t-break {skip:.1f}",
                        "reuse": "yes" if reuse else "no",
                        "evaluations": evaluations(sampler, steps),
                        # brick FLOPs per image in units of one full-chain evaluation
                        "full_chain_evaluations": evaluations(sampler, steps) * (1 - timing["flops_saved"]),
                        "fid": fid(feats, test_feats),
                        "class_accuracy": accuracy,
                        "images_per_s": timing["images_per_s"],
                        "is_reference": not rows,
                        "is_default": not headline and runtime == runtimes.split(",")[0] and i == 1,
                    }
                )
                click.echo(f"{runtime} {label}: FID {rows[-1]['fid']:.2f}", err=True)
    command = "python benchmarks/frontier.py " + " ".join(sys.argv[1:])
    write_results(rows, Path(out), command, num, machine(), skipped)


if __name__ == "__main__":
    main()
