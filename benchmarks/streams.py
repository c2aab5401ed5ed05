"""Parallel inference streams: do two 1-thread engine streams serve more than one 2-thread stream?

    python benchmarks/streams.py --engines engines --out benchmarks/results/streams   # about 3 minutes on 2 quiet cores

lego-serve runs one engine call at a time, each with every core (the batcher's tick). On a CPU a
small call may not keep every core busy, so two calls side by side, each on its own share of the
cores, could serve more. This measures it on the serving workload's requests (the recommended
setting, the same canvas and image-count mix as serve_load.py): R requests run back to back by S
worker threads, each with its own pipeline whose engines use T threads, for (S, T) = (1, cores),
(1, 1) (a request alone on one stream's share: what lego-serve would cost a request alone if it
never went back to all the threads) and (cores, 1). Each configuration runs in its own process
(one runtime's spinning thread pool slows the next), alternating, ROUNDS times; the medians and
their ratio are printed, and with --out PREFIX written to PREFIX.json and PREFIX.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, one_line_errors, out_option, save_results  # noqa: E402
from serve_load import CANVASES, SMALL_CANVASES, workload  # noqa: E402

from lego_export.options import parse_canvas  # noqa: E402


def run_streams(engines: str, backend: str, streams: int, threads: int, n: int, seed: int, canvases) -> dict:
    """R requests through `streams` pipelines at once; requests/s and per-request seconds."""
    from lego_export.runtime.pipeline import LegoPipeline

    pipes = [LegoPipeline.from_engines(engines, backend, threads=threads) for _ in range(streams)]
    bodies = workload(n, seed, pipes[0].manifest.model.num_classes, canvases)
    calls = [
        dict(
            num=b["num"],
            seed=b["seed"],
            resolution=parse_canvas(b["resolution"]),
            classes=[b["class"]] * b["num"] if "class" in b else None,
        )
        for b in bodies
    ]
    for pipe in pipes:  # warm-up: every canvas once per pipeline
        for side in canvases:
            pipe(num=1, resolution=parse_canvas(side))
    todo, lock, seconds = list(calls), threading.Lock(), []

    def worker(pipe) -> None:
        while True:
            with lock:
                if not todo:
                    return
                call = todo.pop(0)
            start = time.perf_counter()
            pipe(**call)
            seconds.append(time.perf_counter() - start)

    start = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(p,)) for p in pipes]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    return {"requests_per_s": n / wall, "median_request_s": statistics.median(seconds)}


def child_result(command: list[str]) -> dict:
    """One measurement's JSON from its own process; its error's last line if it failed."""
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise click.ClickException(f"measurement {command[-1]} failed: {why}")
    return json.loads(lines[-1])


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--backend", default="onnxruntime", show_default=True, help="onnxruntime or openvino")
@click.option(
    "--requests", "n", default=60, show_default=True, type=click.IntRange(1), help="Requests per measurement."
)
@click.option(
    "--rounds", default=3, show_default=True, type=click.IntRange(1), help="Alternating repeats; medians reported."
)
@click.option("--seed", default=0, show_default=True)
@click.option("--small", is_flag=True, help="16-pixel canvases (the tiny test engines).")
@out_option("benchmarks/results/streams")
@click.option("--child", default=None, hidden=True, help="STREAMS,THREADS: run one measurement and print JSON.")
@one_line_errors
def main(
    engines: str, backend: str, n: int, rounds: int, seed: int, small: bool, out: str | None, child: str | None
) -> None:
    """Requests/s of one engine stream with every thread against parallel one-thread streams."""
    canvases = SMALL_CANVASES if small else CANVASES
    if child is not None:
        streams, threads = (int(x) for x in child.split(","))
        print(json.dumps(run_streams(engines, backend, streams, threads, n, seed, canvases)))
        return
    cores = os.cpu_count() or 2
    configs = [(1, cores), (1, 1), (cores, 1)]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    for r in range(rounds):
        for streams, threads in configs:
            command = [
                sys.executable,
                __file__,
                "--engines",
                engines,
                "--backend",
                backend,
                "--requests",
                str(n),
                "--seed",
                str(seed),
                "--child",
                f"{streams},{threads}",
                *(["--small"] if small else []),
            ]
            runs[(streams, threads)].append(child_result(command))
            print(
                f"round {r + 1}: {streams} stream(s) x {threads} thread(s): {runs[(streams, threads)][-1]}", flush=True
            )
    result: dict[str, Any] = {"machine": machine(), "backend": backend, "requests": n, "rounds": rounds, "configs": []}
    base = statistics.median(x["requests_per_s"] for x in runs[configs[0]])
    for streams, threads in configs:
        rate = statistics.median(x["requests_per_s"] for x in runs[(streams, threads)])
        result["configs"].append(
            {
                "setup": f"{streams} x {threads}",
                "streams": streams,
                "threads": threads,
                "requests_per_s": rate,
                "vs_one": rate / base,
                "median_request_s": statistics.median(x["median_request_s"] for x in runs[(streams, threads)]),
                "runs": runs[(streams, threads)],
            }
        )
    columns = [
        ("setup", "streams x threads", ""),
        ("requests_per_s", "requests/s", ".2f"),
        ("vs_one", "vs 1 stream", ".2f"),
        ("median_request_s", "median request (s)", ".3f"),
    ]
    table = markdown_table(result["configs"], columns)
    text = (
        "# Parallel inference streams\n\n"
        f"`python benchmarks/streams.py --engines {engines} --backend {backend} --requests {n} --rounds {rounds}"
        f"{' --small' if small else ''}`\n\n"
        f"{n} requests of the serving workload (recommended setting; canvases {', '.join(canvases)}; 1-2 images), "
        f"run back to back by each stream; medians of {rounds} alternating rounds, each configuration in its "
        f"own process; {backend}; {machine().get('cpu', '')}.\n\n{table}\n"
    )
    save_results(out, result, text)


if __name__ == "__main__":
    main()
