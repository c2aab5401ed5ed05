"""The quality ladder and the named points as the manifest holds them, measured on more images than the tuner's.

    python benchmarks/ladder.py --engines engines                           # print the table
    python benchmarks/ladder.py --engines engines --out benchmarks/results/ladder   # and write it
    python benchmarks/ladder.py --engines engines --quick                   # a smoke run: 24 images a row

`lego-export tune` chooses the named points (best, balanced, fast) and the rungs (settings cheaper
than the recommended one, within its rule on FID and class accuracy) on its search and validation
seeds. This benchmark samples the recommended setting (rung 0), each rung, and each named point that
is not a rung on --num images of another seed (default 2,000, seed 2: the tuner searched on 0 and
validated on 1) and scores them in the feature space of --features (default: the committed
classifier, the space quality.py measures in) against --reference (default: the Fashion-MNIST test
images' statistics): FID, and the classifier's accuracy on the classes asked for. lego-serve steps
down the rungs under load (docs/serving.md). Nothing is written without --out; with it, OUT.json,
OUT.md and OUT.features.npz: every rung's features (float16, image i of each rung from the same noise;
the named points that are no rung apart) and the reference statistics, from which serve_load.py
scores the mix of rungs a server served.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
from click.core import ParameterSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, one_line_errors, write_json, write_text  # noqa: E402

from lego_export.atomic import atomic_write  # noqa: E402
from lego_export.edm import evaluations  # noqa: E402
from lego_export.fid import FeatureStats, frechet_distance  # noqa: E402
from lego_export.options import SamplingOptions  # noqa: E402
from lego_export.runtime.pipeline import LegoPipeline  # noqa: E402
from lego_export.tune import FeatureNet, class_accuracy, load_reference  # noqa: E402

CLASSIFIER = Path(__file__).resolve().parent / "classifier"
QUICK_NUM = 24


def ladder_rows(recommended) -> list[tuple[int | None, list[str], SamplingOptions]]:
    """(rung, names of the named points it is, options) for rung 0, each rung, then each named point
    that is no rung (named points may coincide: one row each setting)."""
    names: dict = {}
    for name, point in recommended.points.items():
        names.setdefault(point.options, []).append(name)
    rows = [(k, names.pop(o, []), o) for k, o in enumerate(recommended.rungs)]
    return rows + [(None, points, options) for options, points in names.items()]


def measured_by_tuner(recommended, rung: int | None, points: list[str]) -> dict:
    if rung == 0:
        return recommended.measured
    if rung is not None:
        return recommended.ladder[rung - 1].measured
    return recommended.points[points[0]].measured


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--num", default=2000, show_default=True, help="Images per row.")
@click.option("--seed", default=2, show_default=True, help="Noise seed (the tuner searched on 0 and validated on 1).")
@click.option("--batch", default=100, show_default=True, help="Images per denoiser call.")
@click.option("--features", default=str(CLASSIFIER / "fmnist-features.onnx"), show_default=True)
@click.option("--reference", default=str(CLASSIFIER / "fmnist-test.ref.npz"), show_default=True)
@click.option("--out", default=None, help="Writes OUT.json, OUT.md and OUT.features.npz [default: print only].")
@click.option("--quick", is_flag=True, help=f"A smoke run: {QUICK_NUM} images a row unless --num is given.")
@one_line_errors
def main(engines: str, num: int, seed: int, batch: int, features: str, reference: str, out: str | None, quick: bool):
    """Sample and score every rung of the manifest's quality ladder and every named point."""
    if quick and click.get_current_context().get_parameter_source("num") is ParameterSource.DEFAULT:
        num = QUICK_NUM
    pipe = LegoPipeline.from_engines(engines, "onnxruntime")
    recommended = pipe.manifest.recommended
    if recommended is None:
        raise click.ClickException(f"{engines}: no recommended setting (lego-export tune writes one and its ladder)")
    net = FeatureNet(features, (pipe.channels, pipe.resolution, pipe.resolution))
    stats = load_reference(reference, net)
    rows: list[dict[str, Any]] = []
    kept = []
    for rung, points, options in ladder_rows(recommended):
        result = pipe(options, num=num, seed=seed, batch=batch)
        feats, logits = net.run(result.images)
        accuracy = class_accuracy(logits, result.labels) if logits is not None and result.labels is not None else None
        kept.append(feats.astype(np.float16))
        full_chain = evaluations(options.sampler, options.steps) * (1 - result.timing.flops_saved)
        rows.append(
            {
                "rung": rung,
                "points": points,
                "setting": options.describe(),
                "fid": frechet_distance(FeatureStats.of(feats), stats),
                "class_accuracy": accuracy,
                "brick_flops_vs_reference": full_chain / evaluations("heun", 50),
                "images_per_s": result.timing.images / result.timing.total_s,
                "tuner": measured_by_tuner(recommended, rung, points),
            }
        )
        shown = "-" if accuracy is None else f"{accuracy:.3f}"
        label = ", ".join(points) or "-"
        click.echo(f"rung {rung}, {label}, {options.describe()}: FID {rows[-1]['fid']:.2f}, acc. {shown}", err=True)
    command = "python benchmarks/ladder.py " + " ".join(sys.argv[1:])
    table = markdown_table(
        [
            {**r, "rung": "-" if r["rung"] is None else str(r["rung"]), "points": ", ".join(r["points"]) or "-"}
            for r in rows
        ],
        [
            ("rung", "rung", "s"),
            ("points", "named point", "s"),
            ("setting", "setting", "s"),
            ("fid", "FID", ".2f"),
            ("class_accuracy", "class acc.", ".3f"),
            ("brick_flops_vs_reference", "brick FLOPs / Heun 50", ".4f"),
            ("images_per_s", "images/s (this run)", ".1f"),
        ],
    )
    text = (
        f"# The quality ladder and the named points\n\n`{command}`\n\n{num} images per row, seed {seed}, on "
        f"{machine()['cpu']}; rung 0 is the recommended setting. The rungs, the points and their rules: "
        f"`lego-export tune`.\n\n{table}\n"
    )
    print(text)
    if out is None:
        return
    # "rows" and "features": the rungs, in order (serve_load.py scores a served mix of them); the named
    # points that are no rung apart, in "points" and "point_features"
    rungs = sum(r["rung"] is not None for r in rows)
    write_json(
        Path(out + ".json"),
        {"command": command, "machine": machine(), "num": num, "seed": seed, "rows": rows[:rungs],
         "points": rows[rungs:]},
    )  # fmt: skip
    arrays = {"features": np.stack(kept[:rungs]), "test_mu": stats.mu, "test_sigma": stats.sigma}
    if len(kept) > rungs:
        arrays["point_features"] = np.stack(kept[rungs:])
    with atomic_write(Path(out + ".features.npz")) as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    write_text(Path(out + ".md"), text)


if __name__ == "__main__":
    main()
