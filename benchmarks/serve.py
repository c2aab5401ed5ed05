"""lego-serve against a one-request-at-a-time server, both over HTTP, under the same Poisson load.

    python benchmarks/serve.py --engines engines --out benchmarks/results/serve   # about 13 minutes on 2 quiet cores
    python benchmarks/serve.py --requests 8 --rates 0.6   # a smoke run, about 2 minutes

Two servers answer the same API (POST /v1/images, the same body, parsed by the same
lego_export.serve.validation), each in its own process on 127.0.0.1, with the same backend and
thread count, one server at a time, never both at once:

  baseline    a small FastAPI + uvicorn server (`serve.py baseline-server`, started by this script)
              that runs each request through its own LegoPipeline call, one request at a time under
              a lock, as diffusers-style servers do;
  lego-serve  the real server: the tiles of every request in flight share engine calls.

The workload is a seeded list of requests that mixes canvases (32x32, 32x96, 64x64), 18 and 50
steps, the full chain and --skip-late-bricks, guidance 1 and 2, and 1 to 4 images. Each server gets
it first all at once (saturation: its throughput; the baseline's gives its capacity), then with
Poisson arrivals at each --rates fraction of the baseline's capacity; the arrival times are drawn
once, so both servers see the same ones.

Reported per server and arrival rate: images/s (images over the time from the first request sent to
the last answer), p50 / p95 / p99 latency (sent to answered), and, for lego-serve, from its /metrics:
tiles per engine call and fill ratio (over the chunk it aims at), the scheduler's share of tick time
(merging and scattering, outside engine calls) and how busy the engines were. Also: the saturation
throughput ratio (lego-serve / baseline), the targets (that ratio at least 2; lego-serve's p99 no
worse than the baseline's at every Poisson rate; the scheduler under 5% of tick time), and the
largest difference between served images and LegoPipeline's offline images for the first --check
requests. A load pattern starts only if it can end within --time-limit (20 minutes: its last
arrival plus the time the server took to answer the whole workload at once); what is left out is
noted. Once started, a pattern's requests are answered however long they wait (up to 15 minutes
each), so that no row is lost to the time limit midway.
Prints the report; with --out PREFIX also writes PREFIX.json, PREFIX.md and PREFIX.png (throughput and
p99 latency against the offered rate). A run in which requests failed exits non-zero after the report.
"""

import io
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, one_line_errors, out_option, save_figure, save_results  # noqa: E402

from lego_export.errors import LegoError  # noqa: E402
from lego_export.runtime.pipeline import LegoPipeline  # noqa: E402
from lego_export.serve.cli import make_config  # noqa: E402
from lego_export.serve.validation import Limits, RequestError, parse_body, parse_image_request  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE, LEGO = "baseline", "lego-serve"
SATURATION = "all at once"
# A request waits this long for its answer whatever the run's --time-limit: a request queued behind
# the others may take the whole workload's time. An answer later than this is a stuck server.
REQUEST_TIMEOUT_S = 900.0


# -- the workload ---------------------------------------------------------------------------------


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


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> list[float]:
    """n arrival times (seconds, the first at 0) of a Poisson process of `rate` requests per second."""
    gaps = rng.exponential(1.0 / rate, size=n)
    return [float(t) for t in np.cumsum(gaps) - gaps[0]]


# -- the baseline server --------------------------------------------------------------------------


def baseline_app(engines: str, backend: str, threads: int):
    """POST /v1/images like lego-serve's (same parsing, same answers), each request through its own
    LegoPipeline call, one at a time; GET /healthz."""
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    from lego_export.serve.service import encode

    pipe = LegoPipeline.from_engines(engines, backend, threads=threads)
    manifest, limits = pipe.manifest, Limits()  # lego-serve's default limits
    lock = threading.Lock()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def run(request) -> bytes:
        with lock:
            result = pipe(**request.pipe_kwargs())
        return encode(result, request)

    @app.post("/v1/images")
    async def images(request: Request) -> Response:
        try:
            req = parse_image_request(parse_body(await request.body()), manifest, limits)
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        return Response(await asyncio.to_thread(run, req), media_type=req.media_type)

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok", "model": pipe.manifest.model.name, "backend": backend})

    return app


@click.command(name="baseline-server")
@click.option("--engines", default="engines")
@click.option("--backend", default="onnxruntime")
@click.option("--threads", default=0)
@click.option("--port", type=int, required=True)
def baseline_server(engines: str, backend: str, threads: int, port: int) -> None:
    """The baseline: one request at a time, each through its own LegoPipeline call (127.0.0.1 only)."""
    import uvicorn

    app = baseline_app(engines, backend, threads)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5)


# -- servers as subprocesses ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on 127.0.0.1, up (GET /healthz) and warmed up; stopped with SIGTERM."""

    def __init__(self, kind: str, engines: str, backend: str, threads: int, lego_options: list[str]):
        import httpx

        self.kind, self.port = kind, free_port()
        common = ["--engines", engines, "--backend", backend, "--threads", str(threads), "--port", str(self.port)]
        if kind == BASELINE:
            cmd = [sys.executable, str(Path(__file__).resolve()), "baseline-server", *common]
        else:
            cmd = [sys.executable, "-m", "lego_export.serve.cli", *common, "--log-level", "warning", *lego_options]
        self.process = subprocess.Popen(cmd, cwd=ROOT)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=None, limits=limits, trust_env=False)
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{kind} did not start (exit {self.process.returncode}; its error is above)")
            time.sleep(0.2)
        warm = self.http.post("/v1/images", json={"steps": 2, "format": "npz"})  # warm-up: sessions allocate
        if warm.status_code != 200:
            self.close()
            raise RuntimeError(f"{kind} answered its warm-up request with {warm.status_code}: {warm.text[:200]}")

    def metrics(self) -> dict[str, float]:
        if self.kind != LEGO:
            return {}
        samples = {}
        for line in self.http.get("/metrics").text.splitlines():
            match = re.match(r"^(\w+(?:\{[^}]*\})?) (\S+)$", line)
            if match:
                samples[match.group(1)] = float(match.group(2))
        return samples

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- one load pattern against one server ----------------------------------------------------------


def send_all(server: Server, bodies: list[dict], arrivals: list[float], timeout: float = REQUEST_TIMEOUT_S):
    """Send request i at arrivals[i] seconds from now, each from its own thread, and wait for every
    answer, each for up to timeout seconds. Latencies (None where unanswered), images (npz bodies
    decoded), the time from start to the last answer, and the errors (one per unanswered request)."""
    import httpx

    n = len(bodies)
    latencies: list[float | None] = [None] * n
    images: list[np.ndarray | None] = [None] * n
    errors: list[str] = []
    start = time.perf_counter()

    def one(i: int) -> None:
        delay = arrivals[i] - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()
        try:
            response = server.http.post("/v1/images", json=bodies[i], timeout=timeout)
        except httpx.HTTPError as e:
            errors.append(f"request {i}: {type(e).__name__}")
            return
        if response.status_code != 200:
            errors.append(f"request {i}: {response.status_code} {response.text[:200]}")
            return
        latencies[i] = time.perf_counter() - sent
        images[i] = np.load(io.BytesIO(response.content))["images"]

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    last = start + max(arrivals, default=0.0) + timeout + 5.0  # every request sent and timed out by then
    for t in threads:
        t.join(max(0.0, last - time.perf_counter()))
    errors += [f"request {i}: no answer" for i, t in enumerate(threads) if t.is_alive()]
    return latencies, images, time.perf_counter() - start, errors


def engine_stats(before: dict, after: dict) -> dict:
    """Calls, tiles per call, fill ratio and engine seconds per engine between two /metrics scrapes."""
    out = {}
    pattern = re.compile(r'lego_serve_engine_calls_total\{engine="(\w+)"')
    for e in sorted({m.group(1) for k in after if (m := pattern.match(k))}):

        def delta(name: str, e=e) -> float:
            key = f'{name}{{engine="{e}"}}'
            return after.get(key, 0.0) - before.get(key, 0.0)

        calls, tiles = delta("lego_serve_engine_calls_total"), delta("lego_serve_engine_tiles_total")
        chunk = after.get(f'lego_serve_engine_chunk_rows{{engine="{e}"}}', 0.0)
        per_call = tiles / calls if calls else 0.0
        out[e] = {
            "calls": int(calls),
            "tiles_per_call": per_call,
            "chunk": int(chunk),
            "fill": per_call / chunk if chunk else 0.0,
            "engine_s": delta("lego_serve_engine_seconds_total"),
        }
    return out


def pattern_fits(arrivals: list[float], workload_s: float, left_s: float) -> bool:
    """Whether a load pattern can end within the time left: its last arrival, plus the time the
    server took to answer the whole workload sent at once (the longest its last request could wait)."""
    return arrivals[-1] + workload_s <= left_s


def measure(server: Server, bodies, arrivals, reference: list[np.ndarray]) -> dict:
    """One load pattern against one server: throughput, latency percentiles, batching, image check."""
    before = server.metrics()
    latencies, images, makespan, errors = send_all(server, bodies, arrivals)
    after = server.metrics()
    done = [x for x in latencies if x is not None]
    served = sum(b["num"] for b, x in zip(bodies, latencies, strict=True) if x is not None)
    checked = [(a, b) for a, b in zip(images, reference, strict=False) if a is not None]
    row = {
        "requests": len(done),
        "errors": errors,
        "images_per_s": served / makespan,
        "makespan_s": makespan,
        "p50_s": float(np.percentile(done, 50)) if done else None,
        "p95_s": float(np.percentile(done, 95)) if done else None,
        "p99_s": float(np.percentile(done, 99)) if done else None,
        "max_s": max(done, default=None),
        "max_abs_diff_vs_offline": max((float(np.abs(a - b).max()) for a, b in checked), default=None),
        "images_checked": len(checked),
    }
    if after:
        engines = engine_stats(before, after)
        tick_s = after["lego_serve_tick_seconds_total"] - before["lego_serve_tick_seconds_total"]
        engine_s = sum(v["engine_s"] for v in engines.values())
        row.update(
            engines=engines,
            ticks=int(after["lego_serve_ticks_total"] - before["lego_serve_ticks_total"]),
            scheduler_share=1.0 - engine_s / tick_s if tick_s else None,  # of tick time: merge + scatter
            engine_busy=engine_s / makespan,  # of wall time
        )
    return row


def offline_reference(engines: str, backend: str, threads: int, bodies: list[dict]) -> list[np.ndarray]:
    """LegoPipeline's own images (lego-run's code, in this process) for the given requests."""
    pipe = LegoPipeline.from_engines(engines, backend, threads=threads)
    return [pipe(**parse_image_request(b, pipe.manifest, Limits()).pipe_kwargs()).images for b in bodies]


# -- the report -----------------------------------------------------------------------------------


def targets(rows: list[dict], ratio: float | None) -> dict:
    """The issue's targets, each with its measured value and whether it was met."""

    def find(server: str, arrivals: str) -> dict | None:
        return next((r for r in rows if r["server"] == server and r["arrivals"] == arrivals), None)

    below = []
    for r in rows:
        if r["server"] == BASELINE and r["arrivals"] != SATURATION:
            lego = find(LEGO, r["arrivals"])
            if lego and lego["p99_s"] is not None and r["p99_s"] is not None:
                below.append({"arrivals": r["arrivals"], "lego_p99_s": lego["p99_s"], "baseline_p99_s": r["p99_s"]})
    shares = [r["scheduler_share"] for r in rows if r.get("scheduler_share") is not None]
    return {
        "saturation_throughput_ratio_at_least_2": {"value": ratio, "met": ratio is not None and ratio >= 2.0},
        "p99_no_worse_than_baseline_below_saturation": {
            "value": below,
            "met": bool(below) and all(b["lego_p99_s"] <= b["baseline_p99_s"] for b in below),
        },
        "scheduler_share_under_5_percent": {
            "value": max(shares, default=None),
            "met": bool(shares) and max(shares) < 0.05,
        },
    }


def plot(rows: list[dict], path: Path) -> None:
    """Throughput and p99 latency against the offered rate (all at once drawn right of the rates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offered = sorted({r["offered_images_per_s"] for r in rows if r["offered_images_per_s"] is not None})
    x_saturation = 1.25 * max(offered, default=1.0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for server, style in ((BASELINE, "s--"), (LEGO, "o-")):
        rs = [r for r in rows if r["server"] == server]
        xs = [x_saturation if r["offered_images_per_s"] is None else r["offered_images_per_s"] for r in rs]
        order = np.argsort(xs)
        for ax, key in ((axes[0], "images_per_s"), (axes[1], "p99_s")):
            ax.plot([xs[i] for i in order], [rs[i][key] for i in order], style, label=server)
    axes[0].plot([0, max(offered, default=1.0)], [0, max(offered, default=1.0)], ":", color="grey", label="offered")
    axes[0].set(ylabel="images/s served", title="throughput")
    axes[1].set(ylabel="p99 latency (s)", yscale="log", title="p99 latency")
    for ax in axes:
        ax.set_xticks([*offered, x_saturation], [*(f"{x:.2f}" for x in offered), SATURATION])
        ax.set_xlabel("offered load (images/s)")
        ax.set_xlim(left=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def report(data: dict) -> str:
    rows = data["rows"]
    table = markdown_table(
        rows,
        [
            ("server", "server", "s"),
            ("arrivals", "arrivals", "s"),
            ("offered_images_per_s", "offered images/s", ".2f"),
            ("images_per_s", "images/s", ".2f"),
            ("p50_s", "p50 (s)", ".2f"),
            ("p95_s", "p95 (s)", ".2f"),
            ("p99_s", "p99 (s)", ".2f"),
            ("scheduler_share", "scheduler share of tick time", ".1%"),
            ("engine_busy", "engines busy", ".0%"),
            ("max_abs_diff_vs_offline", "max diff vs offline", ".1e"),
        ],
    )
    engine_rows = [
        {"arrivals": r["arrivals"], "engine": e, **v}
        for r in rows
        if r["server"] == LEGO
        for e, v in r["engines"].items()
    ]
    engine_table = markdown_table(
        engine_rows,
        [
            ("arrivals", "arrivals", "s"),
            ("engine", "engine", "s"),
            ("calls", "calls", "d"),
            ("tiles_per_call", "tiles/call", ".1f"),
            ("chunk", "chunk aimed at", "d"),
            ("fill", "fill", ".0%"),
        ],
    )
    s = data["summary"]
    lines = [
        "# lego-serve against a one-at-a-time server",
        "",
        f"`{data['command']}`",
        "",
        f"{s['requests']} requests, {s['images']} images ({data['mix']} workload); baseline capacity "
        f"{s['baseline_capacity_requests_per_s'] or 0:.3f} requests/s (offered loads are fractions of it); "
        f"{data['machine']['cores']} cores ({data['machine']['cpu']}).",
        "",
        table,
        "",
        "Saturation throughput ratio (lego-serve / baseline, all at once): "
        + (f"**{s['saturation_throughput_ratio']:.2f}x**" if s["saturation_throughput_ratio"] else "-"),
        "",
        "Targets:",
        "",
    ]
    for name, t in data["targets"].items():
        lines.append(f"- {name.replace('_', ' ')}: {'met' if t['met'] else 'not met'}")
    lines += ["", "lego-serve's engine calls:", "", engine_table, ""]
    if s["notes"]:
        lines += ["Notes:", "", *(f"- {n}" for n in s["notes"]), ""]
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------------


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--backend", default="onnxruntime", show_default=True, help="For both servers.")
@click.option("--threads", default=0, show_default=True, help="Engine threads for both servers (0: all cores).")
@click.option("--requests", "n", default=48, show_default=True, help="Requests in the workload.")
@click.option(
    "--rates",
    default="0.3,0.6,0.9",
    show_default=True,
    help="Poisson arrival rates, as fractions of the baseline's measured capacity (saturation is always run).",
)
@click.option("--mix", type=click.Choice(["mixed", "single"]), default="mixed", show_default=True)
@click.option("--check", default=4, show_default=True, help="Compare the first CHECK requests with offline images.")
@click.option("--max-active", default=16, show_default=True, help="lego-serve's --max-active.")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True, help="lego-serve's --calibrate.")
@click.option(
    "--time-limit",
    default=1200.0,
    show_default=True,
    help="Seconds for the whole run: no load pattern starts that could not end within it.",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--small", is_flag=True, help="16-pixel canvases (the tiny test engines).")
@out_option("benchmarks/results/serve")
@one_line_errors
def main(engines, backend, threads, n, rates, mix, check, max_active, calibrate, time_limit, seed, small, out) -> None:
    """Throughput and latency of lego-serve against a one-request-at-a-time server, same load."""
    from lego_export.manifest import Manifest

    try:  # lego-serve's own check of its options, before any server starts
        make_config(max_active=max_active)
    except LegoError as e:
        raise click.UsageError(str(e)) from None
    deadline = time.monotonic() + time_limit
    bodies = workload(n, seed, Manifest.read(engines).model.num_classes, mix, small)
    images_total = sum(b["num"] for b in bodies)
    fractions = [float(x) for x in rates.split(",") if x.strip()]
    rng = np.random.default_rng(seed + 1)
    print(f"{n} requests, {images_total} images; offline reference for {min(check, n)} ...", flush=True)
    reference = offline_reference(engines, backend, threads, bodies[:check])
    lego_options = ["--max-active", str(max_active), "--max-queue", str(max(64, n))]
    lego_options += ["--calibrate" if calibrate else "--no-calibrate"]
    lego_options += ["--drain-timeout", "5"]

    rows: list[dict] = []
    notes: list[str] = []
    patterns: list[tuple[str, float, list[float]]] = []  # Poisson: name, offered images/s, arrival times

    def run(server: Server, name: str, offered: float | None, arrivals: list[float]) -> bool:
        """Measure one pattern into rows; False when the run must stop (time limit, failed requests).
        A pattern starts only if it can end in time, its requests then answered however long they
        take: a pattern cut short by the time limit would lose its row."""
        done = [r["makespan_s"] for r in rows if r["arrivals"] == SATURATION and r["server"] in (server.kind, BASELINE)]
        workload_s = done[-1] if done else 0.0  # this server's own saturation run, else the baseline's
        if not pattern_fits(arrivals, workload_s, deadline - time.monotonic()):
            notes.append(f"{server.kind}, {name}: not run, the time limit would run out")
            return False
        print(f"{server.kind}: {name} ...", flush=True)
        row = measure(server, bodies, arrivals, reference)
        rows.append({"server": server.kind, "arrivals": name, "offered_images_per_s": offered, **row})
        p50, p99 = row["p50_s"] or 0.0, row["p99_s"] or 0.0
        print(f"  {row['images_per_s']:.2f} images/s, p50 {p50:.2f} s, p99 {p99:.2f} s", flush=True)
        if row["errors"]:
            notes.append(f"{server.kind}, {name}: {len(row['errors'])} requests failed ({row['errors'][0]})")
        return not row["errors"]

    for kind in (BASELINE, LEGO):  # one server at a time, the baseline first: its capacity sets the rates
        if any(r["errors"] for r in rows) or time.monotonic() > deadline:
            notes.append(f"{kind}: not run")
            continue
        server = Server(kind, engines, backend, threads, lego_options)
        try:
            if not run(server, SATURATION, None, [0.0] * n):
                continue
            if kind == BASELINE:
                capacity = rows[-1]["requests"] / rows[-1]["makespan_s"]  # requests/s, one at a time
                for f in fractions:
                    arrivals = poisson_arrivals(n, f * capacity, rng)
                    patterns.append((f"Poisson {f:.0%}", f * capacity * images_total / n, arrivals))
            for name, offered, arrivals in patterns:
                if not run(server, name, offered, arrivals):
                    break
        finally:
            server.close()

    def saturation(kind: str) -> dict | None:
        return next((r for r in rows if r["server"] == kind and r["arrivals"] == SATURATION), None)

    base, lego = saturation(BASELINE), saturation(LEGO)
    ratio = lego["images_per_s"] / base["images_per_s"] if base and lego else None
    data = {
        "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "mix": mix,
        "workload": bodies,
        "lego_serve_options": lego_options,
        "rows": rows,
        "summary": {
            "requests": n,
            "images": images_total,
            "baseline_capacity_requests_per_s": base["requests"] / base["makespan_s"] if base else None,
            "saturation_throughput_ratio": ratio,
            "notes": notes,
        },
    }
    data["targets"] = targets(rows, ratio)
    save_results(out, data, report(data), lambda path: plot(rows, path))
    failed = [r for r in rows if r["errors"]]
    if failed:
        first = failed[0]
        raise click.ClickException(
            f"{sum(len(r['errors']) for r in failed)} requests failed ({first['server']}, {first['arrivals']}: "
            f"{first['errors'][0]})"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["baseline-server"]:
        baseline_server(sys.argv[2:], prog_name="serve.py baseline-server")
    else:
        main()
