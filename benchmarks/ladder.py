"""Every setting a server may answer with, measured on more images than the tuner's: the rungs of the
serving ladder, the named points, and the settings requests ask for.

    python benchmarks/ladder.py --engines engines                           # print the table
    python benchmarks/ladder.py --engines engines --out benchmarks/results/ladder   # and write it
    python benchmarks/ladder.py --engines engines --setting '{"steps": 12}'  # and Heun 12, as a request may ask
    python benchmarks/ladder.py --engines engines --quick                   # a smoke run: 24 images a row

lego-serve steps a request down the rungs of the model's serving ladder under load
(lego_export.ladder.serving_ladder, docs/serving.md): the tuner's ladder when the manifest has one
(`lego-export tune`; rung 0 is the recommended setting), else the default ladder derived from the
model, marked untuned. This benchmark samples each rung, each named point that is not a rung, and
each --setting (a JSON object of sampling option fields over their defaults, as a request's own
options: '{"steps": 12}' is Heun 12) on --num images of another seed (default 2,000, seed 2: the tuner
searched on 0 and validated on 1) and scores them in the feature space of --features (default: the
committed classifier, the space quality.py measures in) against --reference (default: the
Fashion-MNIST test images' statistics): FID, and the classifier's accuracy on the classes asked for.
One row per setting, keyed by SamplingOptions.describe(). Nothing is written without --out; with it,
OUT.json, OUT.md and OUT.features.npz: every row's features (float16, image i of each row from the
same noise) and the reference statistics, from which serve_load.py scores the mix of settings a
server served.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
from click.core import ParameterSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, one_line, one_line_errors, write_json, write_text  # noqa: E402

from lego_export.atomic import atomic_write  # noqa: E402
from lego_export.edm import evaluations  # noqa: E402
from lego_export.errors import LegoError  # noqa: E402
from lego_export.fid import FeatureStats, frechet_distance  # noqa: E402
from lego_export.jsonio import loads_strict  # noqa: E402
from lego_export.ladder import Ladder, serving_ladder  # noqa: E402
from lego_export.manifest import Recommended  # noqa: E402
from lego_export.options import SamplingOptions, resolve  # noqa: E402
from lego_export.runtime.pipeline import LegoPipeline  # noqa: E402
from lego_export.tune import FeatureNet, class_accuracy, load_reference  # noqa: E402

CLASSIFIER = Path(__file__).resolve().parent / "classifier"
QUICK_NUM = 24


def parse_settings(ctx, param, values: tuple[str, ...]) -> list[SamplingOptions]:
    """--setting: each a JSON object of SamplingOptions fields over the defaults (a request's own options)."""
    out = []
    for text in values:
        try:
            given = loads_strict(text)  # refuses NaN and Infinity
            if not isinstance(given, dict):
                raise ValueError("not a JSON object")
            out.append(resolve(given)[0])
        except (ValueError, LegoError, TypeError) as e:
            hint = "a JSON object of sampling options, e.g. '{\"steps\": 12}'"
            raise click.BadParameter(f"{text!r}: {one_line(e)} ({hint})") from None
    return out


def ladder_rows(
    ladder: Ladder, recommended: Recommended | None, settings: list[SamplingOptions]
) -> list[tuple[int | None, list[str], SamplingOptions]]:
    """(rung, names of the named points it is, options): each rung, each named point that is no rung,
    then each setting that is neither; one row per setting (as describe() words it)."""
    names: dict[str, list[str]] = {}
    for name, point in (recommended.points if recommended else {}).items():
        names.setdefault(point.options.describe(), []).append(name)
    rows = [(k, names.pop(o.describe(), []), o) for k, o in enumerate(ladder.rungs)]
    for point in recommended.points.values() if recommended else ():
        if point.options.describe() in names:  # the first of the points of one setting takes them all
            rows.append((None, names.pop(point.options.describe()), point.options))
    for options in settings:
        if all(options.describe() != o.describe() for _, _, o in rows):
            rows.append((None, [], options))
    return rows


def measured_by_tuner(ladder: Ladder, recommended: Recommended | None, rung: int | None, points: list[str]) -> dict:
    """What lego-export tune measured for this row ({} where it measured nothing: an untuned rung, a setting)."""
    if rung is not None:
        return dict(ladder.measured[rung]) if ladder.tuned else {}
    if points and recommended is not None:
        return recommended.points[points[0]].measured
    return {}


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--num", default=2000, show_default=True, help="Images per row.")
@click.option("--seed", default=2, show_default=True, help="Noise seed (the tuner searched on 0 and validated on 1).")
@click.option("--batch", default=100, show_default=True, help="Images per denoiser call.")
@click.option("--features", default=str(CLASSIFIER / "fmnist-features.onnx"), show_default=True)
@click.option("--reference", default=str(CLASSIFIER / "fmnist-test.ref.npz"), show_default=True)
@click.option(
    "--setting", "settings", multiple=True, callback=parse_settings, metavar="JSON",
    help='A setting to measure besides the ladder: SamplingOptions fields over their defaults (guidance, not '
    'the API\'s cfg; \'{"steps": 12}\': Heun 12). Repeatable.',
)  # fmt: skip
@click.option("--out", default=None, help="Writes OUT.json, OUT.md and OUT.features.npz [default: print only].")
@click.option("--quick", is_flag=True, help=f"A smoke run: {QUICK_NUM} images a row unless --num is given.")
@one_line_errors
def main(
    engines: str, num: int, seed: int, batch: int, features: str, reference: str, settings: list[SamplingOptions],
    out: str | None, quick: bool,
):  # fmt: skip
    """Sample and score every rung of the serving ladder, every named point and every --setting."""
    if quick and click.get_current_context().get_parameter_source("num") is ParameterSource.DEFAULT:
        num = QUICK_NUM
    pipe = LegoPipeline.from_engines(engines, "onnxruntime")
    manifest = pipe.manifest
    for options in settings:
        try:
            options.validate(manifest.model)
        except LegoError as e:
            raise click.BadParameter(f"{options.describe()}: {e}", param_hint="--setting") from None
    ladder, recommended = serving_ladder(manifest), manifest.recommended
    net = FeatureNet(features, (pipe.channels, pipe.resolution, pipe.resolution))
    stats = load_reference(reference, net)
    rows: list[dict[str, Any]] = []
    kept = []
    for rung, points, options in ladder_rows(ladder, recommended, settings):
        result = pipe(options, num=num, seed=seed, batch=batch)
        feats, logits = net.run(result.images)
        accuracy = class_accuracy(logits, result.labels) if logits is not None and result.labels is not None else None
        kept.append(feats.astype(np.float16))
        full_chain = evaluations(options.sampler, options.steps) * (1 - result.timing.flops_saved)
        rows.append(
            {
                "setting": options.describe(),
                "options": options.to_dict(),
                "rung": rung,
                "tuned": ladder.tuned if rung is not None else None,
                "points": points,
                "fid": frechet_distance(FeatureStats.of(feats), stats),
                "class_accuracy": accuracy,
                "brick_flops_vs_reference": full_chain / evaluations("heun", 50),
                "images_per_s": result.timing.images / result.timing.total_s,
                "tuner": measured_by_tuner(ladder, recommended, rung, points),
            }
        )
        shown = "-" if accuracy is None else f"{accuracy:.3f}"
        label = ", ".join(points) or "-"
        click.echo(f"rung {rung}, {label}, {options.describe()}: FID {rows[-1]['fid']:.2f}, acc. {shown}", err=True)
    command = "python benchmarks/ladder.py " + shlex.join(sys.argv[1:])
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
    source = (
        "the tuner's (`lego-export tune`; rung 0 is the recommended setting)"
        if ladder.tuned
        else "untuned: the default ladder derived from the model (lego_export/ladder.py; rung 0 is the model's default)"
    )
    text = (
        f"# The serving ladder, the named points and the settings asked for\n\n`{command}`\n\n{num} images per row, "
        f"seed {seed}, on {machine()['cpu']}. Ladder: {source}.\n\n{table}\n"
    )
    print(text)
    if out is None:
        return
    write_json(
        Path(out + ".json"),
        {"command": command, "machine": machine(), "num": num, "seed": seed, "tuned": ladder.tuned,
         "checkpoint_sha256": manifest.source.get("sha256"), "rows": rows},
    )  # fmt: skip
    # features[i]: row i's images (serve_load.py scores a served mix of rows by their "setting")
    with atomic_write(Path(out + ".features.npz")) as f:
        np.savez_compressed(f, features=np.stack(kept), test_mu=stats.mu, test_sigma=stats.sigma)
    write_text(Path(out + ".md"), text)


if __name__ == "__main__":
    main()
