"""The quality ladder: settings cheaper than the recommended one, measured on seeds the tuner never saw.

    python benchmarks/ladder.py --engines engines --write checkpoints/fmnist-pg-s.recommended.json

Every candidate (and the recommended setting, the top rung) samples --num images of the same noise
and classes (seed --seed; the tuner searched on seed 0 and validated on seed 1) and is scored as
in quality.py: FID against the 10k test images in the committed classifier's feature space, and the
classifier's accuracy on the classes asked for. A candidate is accepted as a rung when its FID is at
most --max-fid-ratio times the top rung's and its class accuracy at most --max-accuracy-drop below
it, and it costs fewer brick FLOPs than the rung above it. lego-serve steps down these rungs under
load (serve/service.py). --write adds the ladder to a recommended-setting JSON (lego-export tune
--save's), which lego-export build --recommended puts into the manifest.
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_json  # noqa: E402
from quality import features_and_logits, load_classifier, to_input  # noqa: E402

from lego_export.atomic import atomic_write  # noqa: E402
from lego_export.edm import evaluations  # noqa: E402
from lego_export.fid import fid  # noqa: E402
from lego_export.flops import model_brick_flops  # noqa: E402
from lego_export.manifest import Recommended, Rung, parse_recommended  # noqa: E402
from lego_export.options import SamplingOptions  # noqa: E402
from lego_export.plan import flop_fraction_saved, plan  # noqa: E402
from lego_export.runtime.pipeline import LegoPipeline  # noqa: E402
from lego_train.data import load_idx_dir  # noqa: E402

# sampler:steps:skip rules:reuse (the recommended setting's skip rule with fewer steps, then more skipping)
CANDIDATES = ",".join(
    [f"dpm2m:{steps}:1@0.318283::reuse" for steps in (7, 6, 5)] + [f"dpm2m:{steps}:1@0.8::reuse" for steps in (8, 7, 6)]
)


def parse_candidates(text: str) -> list[SamplingOptions]:
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        sampler, steps, rest = item.split(":", 2)
        skip, _, reuse = rest.rpartition(":")
        out.append(
            SamplingOptions(sampler=sampler, steps=int(steps), skip=skip or "none", reuse_residual=reuse == "reuse")
        )
    return out


def flops_vs_reference(options: SamplingOptions, pipe: LegoPipeline) -> float:
    """Brick FLOPs per image over those of Heun 50 with the full chain."""
    cfg = pipe.manifest.model
    steps = plan(options, cfg, (cfg.img_resolution,) * 2)
    full = evaluations(options.sampler, options.steps) * (1 - flop_fraction_saved(steps, model_brick_flops(cfg)))
    return full / evaluations("heun", 50)


def measure(pipe: LegoPipeline, settings: list[SamplingOptions], num: int, seed: int) -> list[dict]:
    """FID, class accuracy and brick FLOPs of each setting on the same noise and classes."""
    classifier = load_classifier(retrain=False)
    test = load_idx_dir(Path("/usr/share/datasets/fashion-mnist"), split="test")
    test_feats, _ = features_and_logits(classifier, to_input(test.images))
    rows = []
    for i, options in enumerate(settings):
        result = pipe(options, num=num, seed=seed, batch=100)
        images = torch.from_numpy(result.images)
        feats, logits = features_and_logits(classifier, images)
        labels = result.labels
        accuracy = float(np.mean([(logits.argmax(1)[labels == k] == k).mean() for k in range(10)]))
        row = {
            "setting": options.describe(),
            "options": options.to_dict(),
            "fid": fid(feats, test_feats),
            "class_accuracy": accuracy,
            "brick_flops_vs_reference": flops_vs_reference(options, pipe),
            "images_per_s": result.timing.images / result.timing.total_s,
            "top": i == 0,
        }
        rows.append(row)
        click.echo(f"{row['setting']}: FID {row['fid']:.2f}, class acc. {accuracy:.3f}", err=True)
    return rows


def select_rungs(rows: list[dict], max_fid_ratio: float, max_accuracy_drop: float) -> list[int]:
    """Indices of the rows (after the top, rows[0]) that become rungs, most expensive first: within
    the rule, cheaper than the top, and not dominated (no cheaper row with FID as low and class
    accuracy as high)."""
    head = rows[0]
    for row in rows[1:]:
        row["accepted"], row["rung"] = False, "-"
    ok = [
        i
        for i, row in enumerate(rows[1:], 1)
        if row["fid"] <= max_fid_ratio * head["fid"]
        and row["class_accuracy"] >= head["class_accuracy"] - max_accuracy_drop
        and row["brick_flops_vs_reference"] < head["brick_flops_vs_reference"]
    ]
    ok.sort(key=lambda i: -rows[i]["brick_flops_vs_reference"])
    kept = []
    for i in ok:
        cheaper = [rows[j] for j in ok if rows[j]["brick_flops_vs_reference"] < rows[i]["brick_flops_vs_reference"]]
        if not any(c["fid"] <= rows[i]["fid"] and c["class_accuracy"] >= rows[i]["class_accuracy"] for c in cheaper):
            if not kept or rows[i]["brick_flops_vs_reference"] < rows[kept[-1]]["brick_flops_vs_reference"]:
                kept.append(i)
    for n, i in enumerate(kept, 1):
        rows[i]["accepted"], rows[i]["rung"] = True, str(n)
    rows[0]["rung"] = "0 (the recommended setting)"
    return kept


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--num", default=2000, show_default=True, help="Images per setting.")
@click.option("--seed", default=2, show_default=True, help="Noise seed (the tuner used 0 and 1).")
@click.option("--candidates", default=CANDIDATES, show_default=True, help="SAMPLER:STEPS:SKIP:reuse|-,...")
@click.option("--max-fid-ratio", default=1.15, show_default=True, help="Most FID of a rung over the top rung's.")
@click.option("--max-accuracy-drop", default=0.01, show_default=True)
@click.option("--write", "write_to", default=None, help="A recommended-setting JSON to add the ladder to.")
@click.option("--out", default="benchmarks/results/ladder", show_default=True)
@click.option("--rescore", is_flag=True, help="Apply the rule to the rows of OUT.json again (no sampling).")
def main(engines, num, seed, candidates, max_fid_ratio, max_accuracy_drop, write_to, out, rescore) -> None:
    """Measure the candidates and keep those within the acceptance rule as the ladder."""
    torch.set_num_threads(2)
    pipe = LegoPipeline.from_engines(engines, "onnxruntime")
    top = pipe.manifest.recommended
    if top is None:
        raise click.ClickException(f"{engines}: no recommended setting (lego-export tune) to build a ladder under")
    command = "python benchmarks/ladder.py " + " ".join(sys.argv[1:])
    if rescore:  # the rows measured before, under this run's rule
        before = json.loads(Path(out + ".json").read_text())
        rows, command = before["rows"], f"{before['command']} (rescored: {command})"
    else:
        rows = measure(pipe, [top.options, *parse_candidates(candidates)], num, seed)

    ladder = []
    for i in select_rungs(rows, max_fid_ratio, max_accuracy_drop):
        measured = {k: rows[i][k] for k in ("fid", "class_accuracy", "brick_flops_vs_reference")}
        options = SamplingOptions(**{k: v for k, v in rows[i]["options"].items() if k != "churn"})
        ladder.append(Rung(options, {**measured, "images": num, "seed": seed, "top_fid": rows[0]["fid"]}))
    data = {
        "command": command,
        "machine": machine(),
        "rule": {"max_fid_ratio": max_fid_ratio, "max_accuracy_drop": max_accuracy_drop},
        "rows": rows,
        "ladder": [r.to_dict() for r in ladder],
    }
    write_json(Path(out + ".json"), data)
    table = markdown_table(
        rows,
        [
            ("setting", "setting", "s"),
            ("fid", "FID", ".2f"),
            ("class_accuracy", "class acc.", ".3f"),
            ("brick_flops_vs_reference", "brick FLOPs / Heun 50", ".4f"),
            ("images_per_s", "images/s (this run)", ".1f"),
            ("rung", "rung", "s"),
        ],
    )
    text = "\n".join(
        [
            "# The quality ladder",
            "",
            f"`{data['command']}`",
            "",
            f"{num} images per setting, seed {seed} (not the tuner's); accepted: FID at most {max_fid_ratio}x the "
            f"top rung's, class accuracy at most {max_accuracy_drop} below it, fewer brick FLOPs than the rung above.",
            "",
            table,
            "",
        ]
    )
    Path(out + ".md").write_text(text)
    print(text)
    if write_to:
        current = parse_recommended(json.loads(Path(write_to).read_text()), write_to)
        updated = Recommended(current.options, current.checkpoint_sha256, current.measured, ladder)
        with atomic_write(Path(write_to)) as f:
            f.write((json.dumps(updated.to_dict(), indent=2) + "\n").encode())
        click.echo(f"wrote {len(ladder)} rungs into {write_to}", err=True)


if __name__ == "__main__":
    main()
