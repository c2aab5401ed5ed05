"""The quality ladder as the manifest holds it, measured on more images than the tuner's.

    python benchmarks/ladder.py --engines engines

`lego-export tune` chooses the rungs (settings cheaper than the recommended one, within its rule on
FID and class accuracy) on 1,000 images of seed 2. This benchmark samples the recommended setting
(rung 0) and each rung on --num images of the same noise and classes (default 2,000, seed 2) and
scores them as quality.py does: FID against the 10k test images in the committed classifier's
feature space, and the classifier's accuracy on the classes asked for. lego-serve steps down these
rungs under load (docs/serving.md). Writes OUT.json, OUT.md and OUT.features.npz: every rung's
features (float16, image i of each rung from the same noise) and the test images' statistics, from
which serve_load.py scores the mix of rungs a server served as one set of images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_json, write_text  # noqa: E402
from quality import features_and_logits, load_classifier, to_input  # noqa: E402

from lego_export.atomic import atomic_write  # noqa: E402
from lego_export.edm import evaluations  # noqa: E402
from lego_export.fid import FeatureStats, frechet_distance  # noqa: E402
from lego_export.runtime.pipeline import LegoPipeline  # noqa: E402
from lego_export.tune import class_accuracy  # noqa: E402
from lego_train.data import load_idx_dir  # noqa: E402


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--num", default=2000, show_default=True, help="Images per rung.")
@click.option("--seed", default=2, show_default=True, help="Noise seed (the tuner searched on 0 and validated on 1).")
@click.option("--out", default="benchmarks/results/ladder", show_default=True, help="Writes OUT.json and OUT.md.")
def main(engines: str, num: int, seed: int, out: str) -> None:
    """Sample and score every rung of the manifest's quality ladder."""
    torch.set_num_threads(2)
    pipe = LegoPipeline.from_engines(engines, "onnxruntime")
    recommended = pipe.manifest.recommended
    if recommended is None:
        raise click.ClickException(f"{engines}: no recommended setting (lego-export tune writes one and its ladder)")
    classifier = load_classifier(retrain=False)
    test = load_idx_dir(Path("/usr/share/datasets/fashion-mnist"), split="test")
    test_feats, _ = features_and_logits(classifier, to_input(test.images))
    test_stats = FeatureStats.of(test_feats)  # once: every rung is scored against it, and it is saved
    rows, features = [], []
    for rung, options in enumerate(recommended.rungs):
        result = pipe(options, num=num, seed=seed, batch=100)
        feats, logits = features_and_logits(classifier, torch.from_numpy(result.images))
        accuracy = class_accuracy(logits, result.labels)
        features.append(feats.astype(np.float16))
        full_chain = evaluations(options.sampler, options.steps) * (1 - result.timing.flops_saved)
        rows.append(
            {
                "rung": rung,
                "setting": options.describe(),
                "fid": frechet_distance(FeatureStats.of(feats), test_stats),
                "class_accuracy": accuracy,
                "brick_flops_vs_reference": full_chain / evaluations("heun", 50),
                "images_per_s": result.timing.images / result.timing.total_s,
                "tuner": recommended.measured if rung == 0 else recommended.ladder[rung - 1].measured,
            }
        )
        click.echo(f"rung {rung}, {options.describe()}: FID {rows[-1]['fid']:.2f}, class acc. {accuracy:.3f}", err=True)
    command = "python benchmarks/ladder.py " + " ".join(sys.argv[1:])
    write_json(Path(out + ".json"), {"command": command, "machine": machine(), "num": num, "seed": seed, "rows": rows})
    with atomic_write(Path(out + ".features.npz")) as f:
        np.savez_compressed(f, features=np.stack(features), test_mu=test_stats.mu, test_sigma=test_stats.sigma)
    table = markdown_table(
        rows,
        [
            ("rung", "rung", "d"),
            ("setting", "setting", "s"),
            ("fid", "FID", ".2f"),
            ("class_accuracy", "class acc.", ".3f"),
            ("brick_flops_vs_reference", "brick FLOPs / Heun 50", ".4f"),
            ("images_per_s", "images/s (this run)", ".1f"),
        ],
    )
    text = (
        f"# The quality ladder\n\n`{command}`\n\n{num} images per rung, seed {seed}, on {machine()['cpu']}; "
        f"rung 0 is the recommended setting. The rungs and their rule: the manifest's recommended setting "
        f"(`lego-export tune`).\n\n{table}\n"
    )
    write_text(Path(out + ".md"), text)
    print(text)


if __name__ == "__main__":
    main()
