"""FID against images/s for sampler x steps x skip x residual-reuse combinations, same noise for all.

    python benchmarks/frontier.py --engines engines/ --num 1000

Quality as in quality.py (FID / KID in the feature space of the committed Fashion-MNIST classifier,
against the 10k test images); the reference row is Heun, 50 steps, full chain. Speed is each row's
own wall time on this machine (rows run one after another, so machine drift enters the ratio) and
its denoiser evaluations and brick FLOPs, which do not drift. Writes benchmarks/results/frontier.{json,md}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_json  # noqa: E402
from quality import features_and_logits, fid, kid, load_classifier, to_input  # noqa: E402

from lego_export.runtime.pipeline import LegoPipeline  # noqa: E402
from lego_train.data import load_idx_dir  # noqa: E402

# (sampler, steps, t_break of --skip-late-bricks, residual reuse); the first row is the reference.
COMBOS = [
    ("heun", 50, 0.0, False),
    ("heun", 50, 0.2, False),  # today's default
    ("heun", 18, 0.0, False),
    ("heun", 18, 0.2, False),
    ("euler", 18, 0.0, False),
    ("dpm2m", 18, 0.0, False),
    ("dpm2m", 18, 0.4, False),
    ("dpm2m", 18, 0.4, True),
    ("dpm2m", 12, 0.0, False),
    ("dpm2m", 12, 0.3, True),
]


def evaluations(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--num", default=1000, show_default=True, help="Images per row (same seed and classes for all).")
@click.option("--batch", default=64, show_default=True)
@click.option("--backend", default="onnxruntime", show_default=True)
@click.option("--out", default="benchmarks/results/frontier", show_default=True, help="Writes OUT.json and OUT.md.")
def main(engines: str, num: int, batch: int, backend: str, out: str) -> None:
    torch.set_num_threads(2)
    classifier = load_classifier(False)
    test = load_idx_dir(Path("/usr/share/datasets/fashion-mnist"), split="test")
    test_feats, _ = features_and_logits(classifier, to_input(test.images))
    pipe = LegoPipeline.from_engines(engines, backend)
    rows = []
    for sampler, steps, t_break, reuse in COMBOS:
        start = time.perf_counter()
        result = pipe(
            num=num, steps=steps, sampler=sampler, batch=batch, skip="late", t_break=t_break, reuse_residual=reuse
        )
        seconds = time.perf_counter() - start
        feats, logits = features_and_logits(classifier, torch.from_numpy(result.images))
        accuracy = float(np.mean([(logits.argmax(1)[result.labels == k] == k).mean() for k in range(10)]))
        flops_run = evaluations(sampler, steps) * (1 - result.timing.flops_saved)
        rows.append(
            {
                "sampler": sampler,
                "steps": steps,
                "t_break": t_break,
                "reuse": "yes" if reuse else "no",
                "evaluations": evaluations(sampler, steps),
                "full_chain_evaluations": flops_run,  # brick FLOPs in units of one full-chain evaluation
                "fid": fid(feats, test_feats),
                "kid": kid(feats, test_feats),
                "class_accuracy": accuracy,
                "images_per_s": num / seconds,
            }
        )
        click.echo(f"{rows[-1]}", err=True)
    reference = rows[0]
    for r in rows:
        r["fid_vs_reference"] = r["fid"] / reference["fid"]
        r["speed_vs_reference"] = r["images_per_s"] / reference["images_per_s"]
        r["flops_vs_reference"] = reference["full_chain_evaluations"] / r["full_chain_evaluations"]
    command = "python benchmarks/frontier.py " + " ".join(sys.argv[1:])
    write_json(Path(f"{out}.json"), {"command": command, "machine": machine(), "num": num, "rows": rows})
    columns = [
        ("sampler", "sampler", ""),
        ("steps", "steps", "d"),
        ("t_break", "t-break", ".1f"),
        ("reuse", "reuse", ""),
        ("evaluations", "evaluations", "d"),
        ("fid", "FID", ".2f"),
        ("fid_vs_reference", "FID / ref.", ".2f"),
        ("class_accuracy", "class acc.", ".3f"),
        ("images_per_s", "images/s", ".2f"),
        ("speed_vs_reference", "speed / ref.", ".2f"),
        ("flops_vs_reference", "brick FLOPs / ref. (inverse)", ".2f"),
    ]
    table = markdown_table(rows, columns)
    Path(f"{out}.md").write_text(
        f"# Quality against speed ({num} images per row, same noise)\n\n`{command}`\n\n"
        f"Reference: Heun, 50 steps, full chain. Rows ran one after another on {machine()['cpu']}.\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
