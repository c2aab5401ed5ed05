"""lego-serve under a mixed load, against the same requests run one after another offline.

    python benchmarks/serve_load.py --engines engines/ --requests 16 --loads 0.5,0.8

A seeded list of requests mixes canvases (32x32, 32x96, 64x64), 18 and 50 steps, the full chain and
--skip-late-bricks, guidance 1 and 2, and 1 to 4 images. Measured, in this order, never two at once:

  1. baseline: each request through its own LegoPipeline call, one after another (what a server
     that runs requests one at a time does); its service times give its throughput, and its
     latencies for any arrival pattern follow exactly (a FIFO queue in front of those times);
  2. lego-serve (a subprocess on 127.0.0.1, same ONNX Runtime threads), for each scheduling
     policy: every request sent at once (saturation), then (first policy only) Poisson arrivals
     at each load (a fraction of the baseline's capacity, the same arrival times for both).

Reported: images/s, median / p90 latency, engine calls, tiles per call and fill ratio per engine
(from /metrics), the scheduler's share of tick time, and the largest difference between the
server's images and the offline ones.
"""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_json  # noqa: E402

from lego_export.runtime.pipeline import LegoPipeline  # noqa: E402
from lego_export.serve.validation import ImageRequest, Limits, parse_image_request  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def workload(n: int, seed: int, num_classes: int, mix: str = "mixed", small: bool = False) -> list[dict]:
    """n request bodies: drawn from the mix, or ("single") one 32x32 image at 18 steps each (the case
    where one request alone fills an engine call least). small: 16-pixel canvases (tiny test engines)."""
    rng = np.random.default_rng(seed)
    sides = ["16x16", "16x32", "32x32"] if small else ["32x32", "32x96", "64x64"]
    bodies = []
    for i in range(n):
        if mix == "single":
            body = {"resolution": sides[0], "steps": 18, "num": 1, "seed": i, "format": "npz"}
            if num_classes:
                body["class"] = int(rng.integers(num_classes))
            bodies.append(body)
            continue
        body = {
            "resolution": str(rng.choice(sides, p=[0.5, 0.25, 0.25])),
            "steps": int(rng.choice([18, 50], p=[0.6, 0.4])),
            "skip": str(rng.choice(["none", "late"])),
            "cfg": float(rng.choice([1.0, 2.0], p=[0.75, 0.25])),
            "num": int(rng.choice([1, 2, 4])),
            "seed": i,
            "format": "npz",
        }
        if num_classes:
            body["class"] = int(rng.integers(num_classes))
        bodies.append(body)
    return bodies


def percentiles(latencies: list[float]) -> dict:
    a = np.asarray(latencies)
    return {"p50_s": float(np.median(a)), "p90_s": float(np.percentile(a, 90)), "max_s": float(a.max())}


def fifo_latencies(arrivals: list[float], service: list[float]) -> tuple[list[float], float]:
    """Latency of each request and the makespan of a one-at-a-time server with these service times."""
    free, out = 0.0, []
    for t, s in zip(arrivals, service, strict=True):
        free = max(free, t) + s
        out.append(free - t)
    return out, free


def run_offline(engines: str, bodies: list[dict], threads: int) -> tuple[list[float], list[np.ndarray]]:
    """Each request alone through LegoPipeline (lego-run's code), one after another."""
    pipe = LegoPipeline.from_engines(engines, threads=threads)
    pipe(num=1, steps=2)  # warm-up: sessions allocate on first use
    times, images = [], []
    for body in bodies:
        request = parse(pipe, body)
        start = time.perf_counter()
        result = pipe(**{**request.pipe_kwargs(), "batch": 16})
        times.append(time.perf_counter() - start)
        images.append(result.images)
    return times, images


def parse(pipe: LegoPipeline, body: dict) -> ImageRequest:
    return parse_image_request(body, LegoPipeline(pipe.manifest), Limits(4096, 10_000, 1024))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """lego-serve in a subprocess on 127.0.0.1; stopped with SIGTERM (killed if it does not stop)."""

    def __init__(self, engines: str, threads: int, align: bool, max_active: int, calibrate: bool):
        import httpx

        self.port = free_port()
        cmd = [sys.executable, "-m", "lego_export.serve.cli", "--engines", engines, "--port", str(self.port)]
        cmd += ["--threads", str(threads), "--max-active", str(max_active), "--max-queue", "1024"]
        cmd += ["--max-images", "1024", "--max-resolution", "4096", "--log-level", "warning"]
        cmd += ["--align" if align else "--no-align", "--calibrate" if calibrate else "--no-calibrate"]
        self.process = subprocess.Popen(cmd, cwd=ROOT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=600, trust_env=False)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("lego-serve did not start")
            time.sleep(0.2)
        self.http.post("/v1/images", json={"steps": 2})  # warm-up

    def metrics(self) -> dict[str, float]:
        samples = {}
        for line in self.http.get("/metrics").text.splitlines():
            match = re.match(r"^(\w+(?:\{[^}]*\})?) (\S+)$", line)
            if match:
                samples[match.group(1)] = float(match.group(2))
        return samples

    def close(self) -> None:
        self.http.close()
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def send_all(server: Server, bodies: list[dict], arrivals: list[float]) -> tuple[list[float], list, float]:
    """Send request i at arrivals[i] (seconds from now), each from its own thread; latencies, images
    and the makespan."""
    latencies = [0.0] * len(bodies)
    images: list = [None] * len(bodies)
    start = time.perf_counter()

    def one(i: int) -> None:
        delay = arrivals[i] - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()
        response = server.http.post("/v1/images", json=bodies[i])
        latencies[i] = time.perf_counter() - sent
        if response.status_code != 200:
            raise RuntimeError(f"request {i} failed: {response.status_code} {response.text}")
        images[i] = np.load(io.BytesIO(response.content))["images"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, images, time.perf_counter() - start


def engine_stats(before: dict, after: dict) -> dict:
    """Calls, tiles per call, fill ratio and engine time per engine between two /metrics scrapes."""
    out = {}
    pattern = re.compile(r'lego_serve_engine_calls_total\{engine="(\w+)"')
    engines = sorted({m.group(1) for k in after if (m := pattern.match(k))})
    for e in engines:

        def delta(name: str, e=e) -> float:
            key = f'{name}{{engine="{e}"}}'
            return after.get(key, 0.0) - before.get(key, 0.0)

        calls, tiles = delta("lego_serve_engine_calls_total"), delta("lego_serve_engine_tiles_total")
        seconds = delta("lego_serve_engine_seconds_total")
        chunk = after.get(f'lego_serve_engine_chunk_rows{{engine="{e}"}}', 0.0)
        per_call = tiles / calls if calls else 0.0
        out[e] = {
            "calls": int(calls),
            "tiles_per_call": per_call,
            "chunk": int(chunk),
            "fill": per_call / chunk if chunk else 0.0,
            "engine_s": seconds,
        }
    return out


def scenario(server: Server, bodies, arrivals, reference) -> dict:
    before = server.metrics()
    latencies, images, makespan = send_all(server, bodies, arrivals)
    after = server.metrics()
    diff = max(float(np.abs(a - b).max()) for a, b in zip(images, reference, strict=True))
    tick = after["lego_serve_ticks_total"] - before["lego_serve_ticks_total"]
    tick_s = after["lego_serve_tick_seconds_total"] - before["lego_serve_tick_seconds_total"]
    engine_s = sum(v["engine_s"] for v in engine_stats(before, after).values())
    return {
        "images_per_s": sum(b["num"] for b in bodies) / makespan,
        "makespan_s": makespan,
        **percentiles(latencies),
        "engines": engine_stats(before, after),
        "ticks": int(tick),
        "engine_s": engine_s,
        # merging and scattering, as a share of tick time; and engines busy, as a share of wall time
        "scheduler_overhead": 1.0 - engine_s / tick_s if tick_s else 0.0,
        "engine_busy": engine_s / makespan,
        "max_abs_diff_vs_offline": diff,
    }


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--requests", "n", default=16, show_default=True, help="Requests in the workload.")
@click.option(
    "--loads",
    default="0.5,0.8",
    show_default=True,
    help="Poisson arrival rates, as fractions of the baseline's capacity.",
)
@click.option("--threads", default=0, show_default=True, help="ONNX Runtime threads, for both (0: all cores).")
@click.option("--max-active", default=16, show_default=True)
@click.option("--policies", default="align,no-align", show_default=True, help="Scheduling policies to measure.")
@click.option("--mix", type=click.Choice(["mixed", "single"]), default="mixed", show_default=True)
@click.option("--calibrate/--no-calibrate", default=True, show_default=True, help="lego-serve's --calibrate.")
@click.option("--seed", default=0, show_default=True)
@click.option("--small", is_flag=True, help="16-pixel canvases (tiny test engines).")
@click.option("--out", default="benchmarks/results/serve_load", show_default=True, help="Writes OUT.json and OUT.md.")
def main(engines, n, loads, threads, max_active, policies, mix, calibrate, seed, small, out) -> None:
    """Throughput and latency of lego-serve against one-at-a-time offline sampling."""
    from lego_export.manifest import Manifest

    manifest = Manifest.read(engines)
    bodies = workload(n, seed, manifest.model.num_classes, mix, small)
    images_total = sum(b["num"] for b in bodies)
    print(f"{n} requests, {images_total} images; baseline: one after another ...", flush=True)
    service, reference = run_offline(engines, bodies, threads)
    capacity = n / sum(service)  # requests per second the baseline sustains
    rng = np.random.default_rng(seed + 1)
    rows = [
        {
            "system": "baseline (one at a time)",
            "arrivals": "all at once",
            "images_per_s": images_total / sum(service),
            **percentiles(fifo_latencies([0.0] * n, service)[0]),
        }
    ]
    patterns = [("all at once", [0.0] * n)]
    for load in (float(x) for x in loads.split(",") if x):
        gaps = rng.exponential(1.0 / (load * capacity), size=n)
        arrivals = list(np.cumsum(gaps) - gaps[0])
        patterns.append((f"Poisson, {load:.0%} of baseline capacity", arrivals))
        latencies, makespan = fifo_latencies(arrivals, service)
        rows.append(
            {
                "system": "baseline (one at a time)",
                "arrivals": patterns[-1][0],
                "images_per_s": images_total / makespan,
                **percentiles(latencies),
            }
        )
    details = {}
    first = policies.split(",")[0]
    for policy in policies.split(","):
        server = Server(engines, threads, policy == "align", max_active, calibrate)
        try:
            for name, arrivals in patterns:
                if policy != first and name != "all at once":
                    continue  # the other policies at saturation only
                print(f"lego-serve --{policy}: {name} ...", flush=True)
                result = scenario(server, bodies, arrivals, reference)
                details[f"{policy} / {name}"] = result
                rows.append({"system": f"lego-serve --{policy}", "arrivals": name, **result})
        finally:
            server.close()
    saturation = next(r for r in rows if r["system"] == f"lego-serve --{first}" and r["arrivals"] == "all at once")
    summary = {
        "throughput_ratio_at_saturation": saturation["images_per_s"] / rows[0]["images_per_s"],
        "baseline_service_s": service,
    }
    data = {"machine": machine(), "workload": bodies, "rows": rows, "summary": summary, "command": " ".join(sys.argv)}
    write_json(Path(out + ".json"), data)
    table = markdown_table(
        rows,
        [
            ("system", "system", "s"),
            ("arrivals", "arrivals", "s"),
            ("images_per_s", "images/s", ".2f"),
            ("p50_s", "p50 latency (s)", ".2f"),
            ("p90_s", "p90 latency (s)", ".2f"),
            ("scheduler_overhead", "scheduler share of tick time", ".1%"),
            ("engine_busy", "engines busy", ".0%"),
        ],
    )
    engine_rows = [
        {
            "run": key,
            "engine": e,
            "calls": v["calls"],
            "tiles_per_call": v["tiles_per_call"],
            "chunk": v["chunk"],
            "fill": v["fill"],
        }
        for key in details
        for e, v in details[key]["engines"].items()
    ]
    engine_table = markdown_table(
        engine_rows,
        [
            ("run", "run", "s"),
            ("engine", "engine", "s"),
            ("calls", "calls", "d"),
            ("tiles_per_call", "tiles/call", ".1f"),
            ("chunk", "chunk aimed at", "d"),
            ("fill", "fill", ".0%"),
        ],
    )
    text = (
        f"# lego-serve under load\n\n`{data['command']}`\n\n{table}\n\n"
        f"Saturation throughput ratio (lego-serve --{first} / baseline): "
        f"{summary['throughput_ratio_at_saturation']:.2f}x\n\n{engine_table}\n\n"
        f"Largest difference from the offline images: "
        f"{max(d['max_abs_diff_vs_offline'] for d in details.values()):.2e}\n"
    )
    Path(out + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
