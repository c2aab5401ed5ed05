"""The caching frontier: FID, class accuracy, brick FLOPs and images/s of settings without skipping,
with today's skipping, and with brick caching (docs/caching.md).

    python benchmarks/frontier.py --engines engines/ --num 2000 --out benchmarks/results/frontier-cache
    python benchmarks/frontier.py --quick --engines tests/fixtures/tiny-engines \\
        --features F.onnx --reference R.npz                # a smoke run of a few images

Every row samples the same noise and classes (seed 0, images 0..num-1, every class in turn) with ONNX
Runtime fp32; the Heun 50 rows sample the first --heun50-num of those images (99 evaluations each).
Rows are sampled and scored one after another (the feature extractor is ONNX Runtime too, never
running beside the sampler), and with --out the results are rewritten after every row, so a run cut
short keeps what it measured. Quality as in `lego-export tune`: FID in the feature space of the committed
Fashion-MNIST classifier (benchmarks/classifier/fmnist-features.onnx) against its reference statistics
of the 10k test images, and the classifier's class accuracy. Brick FLOPs are what each run actually
spent (a per-image gate decides them at run time), per image in units of one full-chain evaluation:
they do not drift. Speed: before the quality pass, `--rounds` timing rounds of `--time-num` images (one
batch) run every row once per round, in an order rotated each round, so machine drift spreads over
all rows; images/s is the median over rounds (each row says what timed it). Nothing is written unless --out
is given (OUT.json, .md, .png).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, one_line_errors, save_figure, write_json, write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FEATURES = ROOT / "benchmarks" / "classifier" / "fmnist-features.onnx"
REFERENCE = ROOT / "benchmarks" / "classifier" / "fmnist-test.ref.npz"
GUIDE = {"guidance": 1.5, "guidance_interval": "0.286609:2.37424"}  # the recommended setting's guided step
FID_TOLERANCE, ACCURACY_TOLERANCE = 1.02, 0.01  # "equal quality": FID within 2%, class accuracy within 0.01
FAMILIES = ("full chain", "skip", "cache")  # no skipping or caching; today's skip + residual reuse; caching


@dataclass(frozen=True)
class Row:
    name: str
    family: str  # one of FAMILIES
    options: dict = field(default_factory=dict)  # SamplingOptions fields; {"recommended": True}: the manifest's


def dpm(steps: int, **more) -> dict:
    return {"sampler": "dpm2m", "steps": steps, **more}


# Rows in the order they run: a run cut short has the rows that answer the targets first.
# Brick caching on the shipped model: every brick is cached at the first high-noise steps after the
# first (sigma above HIGH; the estimate of a very noisy image hardly moves), bricks 1-2 at sigma below
# 0.3 and brick 0 below LOW, where c_out, and with it what any brick adds, is small.
HIGH = 10


def late(low: float = 0.05, high: float = HIGH, mid: float = 0.3) -> str:
    """Cache rules: every brick cached above sigma `high`, bricks 1-2 below `mid`, brick 0 below `low`."""
    return f"0@{low}:{high},1@{mid}:{high},2@{mid}:{high}"


MAIN_ROWS = [
    Row("recommended", "skip", {"recommended": True}),
    Row("dpm2m 6, guided", "full chain", dpm(6, **GUIDE)),
    Row("cache: dpm2m 8, guided, high + late", "cache", dpm(8, **GUIDE, cache=late())),
    Row("cache: dpm2m 8, guided, high (to sigma 3) + late", "cache", dpm(8, **GUIDE, cache=late(high=3))),
    Row("cache: dpm2m 7, guided, high + late", "cache", dpm(7, **GUIDE, cache=late(low=0.1))),
    Row("dpm2m 7, guided", "full chain", dpm(7, **GUIDE)),
    Row("dpm2m 8, guided", "full chain", dpm(8, **GUIDE)),
    Row("cache: dpm2m 8, guided, input gate 0.1, linear", "cache",
        dpm(8, **GUIDE, gate=0.1, gate_signal="input", forecast=1)),
    Row("cache: dpm2m 10, guided, high (to 15) + late, cfg cache below 1", "cache",
        dpm(10, **GUIDE, cache=late(high=15), guidance_cache="0:1")),
    Row("dpm2m 6", "full chain", dpm(6)),
    Row("dpm2m 8", "full chain", dpm(8)),
    # each mechanism against "cache: dpm2m 8, guided, high + late" and "dpm2m 8, guided"
    Row("ablation: high + late, linear forecast", "cache", dpm(8, **GUIDE, cache=late(), forecast=1)),
    Row("ablation: high + late, brick 0 not cached late", "cache",
        dpm(8, **GUIDE, cache=f"0@:{HIGH},1@0.3:{HIGH},2@0.3:{HIGH}")),
    Row("ablation: dpm2m 8, guided, gate 0.05 on brick 0", "cache", dpm(8, **GUIDE, gate=0.05)),
    Row("ablation: dpm2m 8, cfg at sigma 0.2:2.4, cfg cache below 1", "cache",
        dpm(8, guidance=1.5, guidance_interval="0.2:2.4", guidance_cache="0:1")),
    Row("dpm2m 8, cfg at sigma 0.2:2.4", "full chain", dpm(8, guidance=1.5, guidance_interval="0.2:2.4")),
    Row("dpm2m 4", "full chain", dpm(4)),
    Row("heun 4", "full chain", {"sampler": "heun", "steps": 4}),
    Row("dpm2m 10, guided", "full chain", dpm(10, **GUIDE)),
    Row("dpm2m 5", "full chain", dpm(5)),
    Row("dpm2m 12", "full chain", dpm(12)),
    Row("heun 8", "full chain", {"sampler": "heun", "steps": 8}),
    Row("dpm2m 8, skip 1@0.32:, reuse", "skip", dpm(8, skip="1@0.318283:", reuse_residual=True)),
    Row("dpm2m 16", "full chain", dpm(16)),
    Row("heun 16", "full chain", {"sampler": "heun", "steps": 16}),
    # at the best FID without skipping: lighter late caching (bricks 1-2 below 0.05, brick 0 below 0.01)
    Row("dpm2m 9, guided", "full chain", dpm(9, **GUIDE)),
    Row("cache: dpm2m 9, guided, high + light late", "cache", dpm(9, **GUIDE, cache=late(0.01, mid=0.05))),
    Row("cache: dpm2m 10, guided, high (to 15) + light late, cfg cache below 1", "cache",
        dpm(10, **GUIDE, cache=late(0.01, mid=0.05, high=15), guidance_cache="0:1")),
    Row("cache: dpm2m 8, guided, high + light late", "cache", dpm(8, **GUIDE, cache=late(0.01, mid=0.05))),
    Row("cache: dpm2m 8, guided, high + last step", "cache", dpm(8, **GUIDE, cache=late(0.01, mid=0.01))),
    # the guided chains past 10 steps, for the best FID without skipping
    Row("dpm2m 12, guided", "full chain", dpm(12, **GUIDE)),
    Row("dpm2m 16, guided", "full chain", dpm(16, **GUIDE)),
]  # fmt: skip
HEUN_50 = [
    Row("heun 50", "full chain", {"sampler": "heun", "steps": 50}),
    Row("heun 50, cached: input gate 0.02, linear", "cache",
        {"sampler": "heun", "steps": 50, "gate": 0.02, "gate_signal": "input", "forecast": 1}),
    Row("heun 50, cached: input gate 0.01, linear", "cache",
        {"sampler": "heun", "steps": 50, "gate": 0.01, "gate_signal": "input", "forecast": 1}),
    Row("heun 50, cached: high (to 30) + late, gate 0.02", "cache",
        {"sampler": "heun", "steps": 50, "cache": late(high=30), "gate": 0.02}),
    Row("heun 50, cached: high (to 30) + late, input gate 0.02", "cache",
        {"sampler": "heun", "steps": 50, "cache": late(high=30), "gate": 0.02, "gate_signal": "input"}),
]  # fmt: skip
QUICK = [
    Row("dpm2m 4", "full chain", dpm(4)),
    Row("dpm2m 4, guided", "full chain", dpm(4, guidance=1.5)),
    Row("skip: dpm2m 4, skip 2@1:, reuse", "skip", dpm(4, skip="2@1:", reuse_residual=True)),
    Row("cache: dpm2m 4, bricks 1-2 above sigma 1, linear", "cache", dpm(4, cache="1@1:,2@1:", forecast=1)),
    Row("cache: dpm2m 4, gate 0.05, cfg cache", "cache", dpm(4, guidance=1.5, gate=0.05, guidance_cache="0:10")),
]


def all_rows(quick: bool, heun50: bool) -> list[Row]:
    if quick:
        return QUICK
    first = 8  # the rows that answer the first two targets, then Heun 50's, then the rest
    return MAIN_ROWS[:first] + (HEUN_50 if heun50 else []) + MAIN_ROWS[first:]


class Sampler:
    """One pipeline (ONNX Runtime fp32) and one feature extractor, used one after the other."""

    def __init__(self, engines: str, batch: int, features: str, reference: str):
        from lego_export.runtime.pipeline import LegoPipeline

        self.pipe = LegoPipeline.from_engines(engines, "onnxruntime")
        self.batch = batch
        self.features, self.reference_path = features, reference
        self.net: Any = None  # FeatureNet and FeatureStats, loaded at first use
        self.reference: Any = None

    def scorer(self):
        """The feature extractor and the reference statistics, loaded at first use."""
        from lego_export.tune import FeatureNet, load_reference

        if self.net is None:
            self.net = FeatureNet(self.features, (self.pipe.channels, self.pipe.resolution, self.pipe.resolution))
            self.reference = load_reference(self.reference_path, self.net)
        return self.net, self.reference

    def run(self, row: Row, count: int):
        """Sample count images of a row (seed 0, images 0..count-1): the result and its images/s."""
        opts = dict(row.options)
        recommended = opts.pop("recommended", False)
        start = time.perf_counter()
        result = self.pipe(num=count, batch=self.batch, seed=0, recommended=recommended, **opts)
        return result, count / (time.perf_counter() - start)

    def measure(self, row: Row, count: int) -> dict:
        """Quality and brick FLOPs of one row (images/s of this pass too, until the rounds time it)."""
        from lego_export.fid import FeatureStats, frechet_distance
        from lego_export.tune import class_accuracy

        net, reference = self.scorer()
        result, speed = self.run(row, count)
        feats, logits = net.run(result.images)
        return {
            "name": row.name,
            "family": row.family,
            "setting": result.options.describe(),
            "options": result.options.to_dict(),
            "num": count,
            "fid": frechet_distance(FeatureStats.of(feats), reference),
            "class_accuracy": class_accuracy(logits, result.labels) if logits is not None else None,
            "full_chain_evaluations": result.timing.full_chain_evaluations,
            "images_per_s": speed,
            "timed_by": "quality pass",
            "quality_pass_images_per_s": speed,
            "round_images_per_s": [],
        }


def time_rounds(sampler: Sampler, rows: list[Row], rounds: int, count: int) -> list[list[float]]:
    """images/s of every row in each of `rounds` rounds of count images, in an order rotated each
    round, so machine drift spreads over all rows. Run before the quality pass: short, so that every
    row is timed side by side even when the long quality pass is cut short."""
    speeds: list[list[float]] = [[] for _ in rows]
    for r in range(rounds):
        order = list(range(len(rows)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            speeds[i].append(sampler.run(rows[i], count)[1])
        click.echo(f"timing round {r + 1} of {rounds} done", err=True)
    return speeds


def speed_only_run(sampler: Sampler, rows: list[Row], rounds: int, count: int, out: str | None, command: str) -> None:
    """Only the timing rounds (no quality pass): each row's median images/s and brick FLOPs."""
    speeds = time_rounds(sampler, rows, rounds, count)
    measured = []
    for row, timed in zip(rows, speeds, strict=True):
        evals = sampler.run(row, 1)[0].timing.full_chain_evaluations if row.family == "full chain" else None
        if evals is None:  # a gate decides per image: count the FLOPs of a round's worth of images
            evals = sampler.run(row, count)[0].timing.full_chain_evaluations
        measured.append({"name": row.name, "family": row.family, "full_chain_evaluations": evals,
                         "images_per_s": float(np.median(timed)), "round_images_per_s": timed})  # fmt: skip
        click.echo(f"{row.name[:70]:70s} evals {evals:6.2f}  {measured[-1]['images_per_s']:7.2f} images/s "
                   f"(rounds: {', '.join(f'{v:.2f}' for v in timed)})")  # fmt: skip
    if out:
        data = {"command": command, "machine": machine(), "rounds": rounds, "images_per_round": count, "rows": measured}
        write_json(Path(f"{out}.json"), data)
        columns = [("name", "setting", ""), ("family", "family", ""),
                   ("full_chain_evaluations", "brick FLOPs (full-chain evals)", ".2f"),
                   ("images_per_s", "images/s (median)", ".2f")]  # fmt: skip
        head = f"# Images/s side by side ({rounds} rounds of {count} images, rows interleaved)\n\n`{command}`\n\n"
        write_text(Path(f"{out}.md"), head + markdown_table(measured, columns) + "\n")


def equal_quality(row: dict, fid: float, accuracy: float | None) -> bool:
    """FID within FID_TOLERANCE of fid and class accuracy at most ACCURACY_TOLERANCE below accuracy."""
    fine = row["fid"] <= FID_TOLERANCE * fid
    if accuracy is not None and row["class_accuracy"] is not None:
        fine = fine and row["class_accuracy"] >= accuracy - ACCURACY_TOLERANCE
    return fine


def edge(rows: list[dict], fid: float, accuracy: float | None, level: str) -> dict:
    """At one quality level, among rows of the same image count: the fastest row without skipping or
    caching and the fastest caching row that hold it (images/s), and the same by fewest brick FLOPs."""
    held = [r for r in rows if equal_quality(r, fid, accuracy) and not r["name"].startswith("heun 50")]
    full = [r for r in held if r["family"] == "full chain"]
    cached = [r for r in held if r["family"] == "cache"]
    out = {"level": level, "fid": fid, "class_accuracy": accuracy, "baseline": None, "cached": None,
           "speedup": None, "flops_baseline": None, "flops_cached": None, "flops_ratio": None}  # fmt: skip
    if full and cached:
        fast_base = max(full, key=lambda r: r["images_per_s"])
        fast_cached = max(cached, key=lambda r: r["images_per_s"])
        out.update(baseline=fast_base["name"], cached=fast_cached["name"])
        out["speedup"] = fast_cached["images_per_s"] / fast_base["images_per_s"]
        lean_base = min(full, key=lambda r: r["full_chain_evaluations"])
        lean_cached = min(cached, key=lambda r: r["full_chain_evaluations"])
        out.update(flops_baseline=lean_base["name"], flops_cached=lean_cached["name"])
        out["flops_ratio"] = lean_base["full_chain_evaluations"] / lean_cached["full_chain_evaluations"]
    return out


def met(edge: dict, factor: float) -> bool:
    """A target met: at least `factor` both in images/s (which drifts) and in brick FLOPs (which does not)."""
    return edge["speedup"] is not None and min(edge["speedup"], edge["flops_ratio"]) >= factor


def summarize(rows: list[dict]) -> dict:
    """The edges the targets ask about (docs/caching.md): at the recommended setting's quality, at the
    best FID reached without skipping, and Heun 50 cached against Heun 50."""
    edges, targets = [], {}
    rec = next((r for r in rows if r["name"] == "recommended"), None)
    if rec is not None:
        edges.append(edge(rows, rec["fid"], rec["class_accuracy"], "the recommended setting's FID and accuracy"))
        targets["recommended_quality_2x"] = met(edges[-1], 2)
    full = [r for r in rows if r["family"] == "full chain" and not r["name"].startswith("heun 50")]
    if full:
        best = min(full, key=lambda r: r["fid"])
        edges.append(edge(rows, best["fid"], best["class_accuracy"], f"the best FID without skipping ({best['name']})"))
        targets["best_fid_1.5x"] = met(edges[-1], 1.5)
    heun = {r["name"]: r for r in rows if r["name"].startswith("heun 50")}
    if "heun 50" in heun and len(heun) >= 2:
        ref = heun.pop("heun 50")
        cached = max(heun.values(), key=lambda r: r["images_per_s"] if r["fid"] <= FID_TOLERANCE * ref["fid"] else 0)
        speedup = cached["images_per_s"] / ref["images_per_s"]
        edges.append({"level": "Heun 50's FID", "fid": ref["fid"], "class_accuracy": ref["class_accuracy"],
                      "baseline": ref["name"], "cached": cached["name"], "speedup": speedup,
                      "flops_baseline": ref["name"], "flops_cached": cached["name"],
                      "flops_ratio": ref["full_chain_evaluations"] / cached["full_chain_evaluations"],
                      "cached_fid": cached["fid"]})  # fmt: skip
        targets["heun50_3x"] = met(edges[-1], 3) and cached["fid"] <= FID_TOLERANCE * ref["fid"]
    return {"edges": edges, "targets_met": targets}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    markers = {"full chain": ("o", "no skipping or caching"), "skip": ("s", "skip + residual reuse (today)"),
               "cache": ("*", "brick caching")}  # fmt: skip
    panels = [(axes[0], "images_per_s", "images/s (median of rounds)"),
              (axes[1], "full_chain_evaluations", "brick FLOPs per image (full-chain evaluations)")]  # fmt: skip
    for ax, x, label in panels:
        for family, (marker, name) in markers.items():
            sub = [r for r in rows if r["family"] == family]
            ax.scatter([r[x] for r in sub], [r["fid"] for r in sub], marker=marker, s=60, label=name)
        if all(r[x] > 0 for r in rows):
            ax.set_xscale("log")
        ax.set(xlabel=label, ylabel="FID (classifier features)")
    axes[0].legend(fontsize=8)
    fig.suptitle("quality against speed and brick FLOPs (same noise)")
    fig.tight_layout()
    save_figure(fig, path)


def write_results(rows: list[dict], summary: dict, out: Path, command: str, num: int, host: dict) -> None:
    data = {"command": command, "machine": host, "num": num, "summary": summary, "rows": rows}
    write_json(Path(f"{out}.json"), data)
    columns = [
        ("name", "setting", ""),
        ("family", "family", ""),
        ("fid", "FID", ".2f"),
        ("class_accuracy", "class acc.", ".3f"),
        ("full_chain_evaluations", "brick FLOPs (full-chain evals)", ".2f"),
        ("images_per_s", "images/s", ".2f"),
        ("num", "images", "d"),
        ("timed_by", "images/s from", ""),
    ]
    lines = [f"# Brick caching frontier ({num} images per row, same noise)", "", f"`{command}`", "",
             f"Machine: {host['cpu']}. images/s: median of the timing rounds (rows interleaved).", ""]  # fmt: skip
    for e in summary["edges"]:
        if e["speedup"] is None:
            lines.append(f"- At {e['level']} (FID {e['fid']:.2f}): no pair of rows holds it")
            continue
        lines.append(
            f"- At {e['level']} (FID {e['fid']:.2f}): images/s {e['speedup']:.2f}x ({e['cached']} against "
            f"{e['baseline']}); brick FLOPs {e['flops_ratio']:.2f}x fewer ({e['flops_cached']} against "
            f"{e['flops_baseline']})"
        )
    lines += ["", f"Targets met: {summary['targets_met']}", "", f"![frontier]({out.name}.png)", ""]
    write_text(Path(f"{out}.md"), "\n".join(lines) + markdown_table(rows, columns) + "\n")
    try:
        plot(rows, Path(f"{out}.png"))
    except ImportError:  # the plot needs the bench extra; the numbers do not
        click.echo("no plot written: matplotlib is not installed (pip install '.[bench]')", err=True)


def print_rows(rows: list[dict], summary: dict) -> None:
    for r in rows:
        acc = f"{r['class_accuracy']:.3f}" if r["class_accuracy"] is not None else "-"
        click.echo(
            f"{r['name'][:70]:70s} FID {r['fid']:7.2f}  acc {acc}  evals {r['full_chain_evaluations']:6.2f}  "
            f"{r['images_per_s']:7.2f} images/s"
        )
    for e in summary["edges"]:
        click.echo(
            f"{e['level']}: {e['cached']} vs {e['baseline']}: {e['speedup']} x images/s, {e['flops_ratio']} x FLOPs"
        )
    click.echo(f"targets met: {summary['targets_met']}")


@click.command()
@click.option("--engines", default="engines", show_default=True, help="Folder written by lego-export build.")
@click.option("--num", default=2000, show_default=True, help="Images per row for quality (same seed and classes).")
@click.option("--heun50-num", default=500, show_default=True, help="Images for the Heun 50 rows (99 evaluations each).")
@click.option("--batch", default=64, show_default=True)
@click.option(
    "--rounds", default=3, show_default=True, help="Timing rounds before the quality pass (0: time that pass)."
)
@click.option("--time-num", default=64, show_default=True, help="Images per row per timing round.")
@click.option("--only", default=None, help="Row names or parts of names, separated by ';'; default: every row.")
@click.option("--no-heun50", is_flag=True, help="Leave out Heun 50 full and cached (the slowest rows).")
@click.option("--features", default=str(FEATURES), show_default=True, help="Feature extractor (ONNX), as for tune.")
@click.option("--reference", default=str(REFERENCE), show_default=True, help="Reference statistics (.npz).")
@click.option("--quick", is_flag=True, help="A smoke run: a few small rows, 8 images, one round of 4.")
@click.option("--out", default=None, help="Write OUT.json, OUT.md and OUT.png, after every row (default: print only).")
@click.option("--speed-only", is_flag=True, help="Only the interleaved timing rounds: images/s and brick FLOPs.")
@one_line_errors
def main(
    engines, num, heun50_num, batch, rounds, time_num, only, no_heun50, features, reference, quick, out, speed_only
):
    """Measure FID, class accuracy, brick FLOPs and images/s of settings with and without brick caching."""
    if quick:
        num, heun50_num, batch, rounds, time_num = min(num, 8), min(heun50_num, 8), min(batch, 8), min(rounds, 1), 4
    rows = all_rows(quick, not no_heun50)
    if only:
        wanted = [w.strip() for w in only.split(";") if w.strip()]
        exact = {r.name for r in rows} & set(wanted)  # a whole name picks that row only, a part every row with it
        rows = [r for r in rows if r.name in exact or any(w in r.name for w in wanted if w not in exact)]
    if not rows:
        raise click.UsageError("--only matches no row")
    sampler = Sampler(engines, batch, features, reference)
    shown = "python benchmarks/frontier.py " + " ".join(sys.argv[1:])
    if speed_only:
        speed_only_run(sampler, rows, rounds, time_num, out, shown)
        return
    host = machine()
    measured: list[dict] = []

    def save() -> None:  # after every row: a run cut short keeps what it measured
        if out:
            write_results(measured, summarize(measured), Path(out), shown, num, host)

    speeds = time_rounds(sampler, rows, rounds, time_num)
    for row, timed in zip(rows, speeds, strict=True):
        m = sampler.measure(row, heun50_num if row.name.startswith("heun 50") else num)
        if timed:
            m.update(images_per_s=float(np.median(timed)), round_images_per_s=timed)
            m["timed_by"] = f"median of {len(timed)} rounds of {time_num} images"
        measured.append(m)
        click.echo(f"{row.name}: FID {m['fid']:.2f}, {m['full_chain_evaluations']:.2f} evals, "
                   f"{m['images_per_s']:.2f} images/s", err=True)  # fmt: skip
        save()
    summary = summarize(measured)
    print_rows(measured, summary)
    if out:
        click.echo(f"wrote {out}.json, {out}.md, {out}.png")


if __name__ == "__main__":
    main()
