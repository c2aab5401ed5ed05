"""Where a brick's time goes, by kind of operation, from ONNX Runtime's per-node profile.

    python benchmarks/op_profile.py --engines engines --batch 16 --out benchmarks/results/op_profile

Measured before deciding on a per-image adaLN contract: the modulation depends only on the image's
conditioning, yet every tile computes it (brick 0 of the shipped model: 64 times per image). Its
share of kernel time bounds what such a contract could save. Prints the table; with --out PREFIX also
writes PREFIX.json and PREFIX.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, one_line_errors, out_option, random_feeds, save_results  # noqa: E402

from lego_export.manifest import Manifest  # noqa: E402

# Node-name fragments (the exporter keeps module paths in node names) -> kind; first match wins.
KINDS = [("ada_ln", "adaLN modulation"), ("attn", "attention"), ("mlp", "MLP"), ("", "other (norms, embed, ...)")]


def kind_of(node: str) -> str:
    return next(kind for fragment, kind in KINDS if fragment in node)


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--batch", default=16, show_default=True, help="Images per step; each brick sees its tiles.")
@click.option("--calls", default=20, show_default=True, type=click.IntRange(1))
@out_option("benchmarks/results/op_profile")
@one_line_errors
def main(engines: str, batch: int, calls: int, out: str | None) -> None:
    """Kernel time of each brick by kind of operation (adaLN modulation, attention, MLP, other)."""
    import onnxruntime as ort

    manifest = Manifest.read(engines)
    cfg = manifest.model
    rng = np.random.default_rng(0)
    per_kind: dict[str, Counter] = {}
    for spec in manifest.bricks:
        file = spec.files.get("onnx-ort") or spec.files["onnx"]
        n = batch * (cfg.img_resolution // cfg.bricks[spec.index].size) ** 2  # tiles at the training size
        options = ort.SessionOptions()
        options.enable_profiling = True
        with tempfile.TemporaryDirectory() as folder:
            options.profile_file_prefix = str(Path(folder) / spec.name)
            session = ort.InferenceSession(manifest.read_engine_file(engines, file), options)
            feeds = random_feeds(spec, n, rng)
            for _ in range(calls):
                session.run(None, feeds)
            events = json.loads(Path(session.end_profiling()).read_text())
        counter: Counter[str] = Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                counter[kind_of(e["name"])] += e["dur"]
        per_kind[spec.name] = counter
    total = sum(sum(c.values()) for c in per_kind.values())
    rows = []
    for name, counter in [*per_kind.items(), ("all bricks", sum(per_kind.values(), Counter()))]:
        whole = sum(counter.values())
        rows.append({"brick": name, "share_of_step": whole / total} | {k: counter[k] / whole for _, k in KINDS})
    command = "python benchmarks/op_profile.py " + " ".join(sys.argv[1:])
    columns = [("brick", "brick", ""), ("share_of_step", "share of step", ".0%")]
    columns += [(k, k, ".1%") for _, k in KINDS]
    table = markdown_table(rows, columns)
    text = (
        f"# Kernel time by kind of operation, batch {batch}\n\n`{command}`\n\nONNX Runtime fused graphs, "
        f"{calls} calls per brick, profile of every node.\n\n{table}\n"
    )
    save_results(out, {"command": command, "machine": machine(), "batch": batch, "rows": rows}, text)


if __name__ == "__main__":
    main()
