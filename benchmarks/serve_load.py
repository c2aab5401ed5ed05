"""Deadlines under load: a one-at-a-time server against lego-serve, exact and elastic.

    python benchmarks/serve_load.py --engines engines --out benchmarks/results/serve-load   # about 30 min on 2 cores

Every request carries a deadline: --slo times the median service time alone of its kind (canvas
and image count; measured first, one request at a time on the one-at-a-time server). C_FIFO is the
highest Poisson arrival rate at which the one-at-a-time server (serve.py's baseline) answers 99% of
the requests within their deadline, found by bisection, each rate offered as the loads are (below).
Then 0.5, 1, 1.5, 2 and 3 x C_FIFO are offered, with the same arrival times, to three servers, each
alone on the machine while loaded:

  baseline       one request at a time, in arrival order (answers late rather than never);
  lego-serve     exact: every request as asked ("quality": "exact"): least slack first, refused
                 (429) when it cannot finish in time, expired (504) when its deadline passes;
  lego-serve     elastic (the default): as exact, and a request that would be late runs at the
                 highest rung of the model's quality ladder that finishes in time.

Each load's requests are sent in --rounds consecutive blocks, each block to the three servers in
turn (the order rotating from block to block), and a server's answers at a load are pooled over the
blocks: the speed of these shared machines drifts by up to 1.5x within a quarter of an hour, so
servers loaded one after another would compare the machine's moods as much as the servers.

The workload asks for the model's recommended setting (no sampling options) on a fixed mix of
canvases (32x32, 32x96, 64x64) and 1 or 2 images. Per server and load: share of requests answered
within their deadline, refused and expired shares, p50 / p99 latency per canvas, p99 over the
canvas's service time alone, requests per rung, and the quality of what was served, from the
ladder's images (benchmarks/ladder.py, 2,000 per rung): the FID of one set of 2,000 in which each
rung has the share of the requests it served (its images of disjoint noise, as distinct requests
are), and the class accuracy weighted likewise. Also the cost model's error: lego-serve's predicted
service time of each request alone against its measured service time alone (the median of 3 runs
of each). Prints the report; with --out PREFIX also writes PREFIX.json, PREFIX.md and PREFIX.png
(deadline attainment and served FID against offered load; `--replot` redraws it from PREFIX.json).
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    machine,
    markdown_table,
    one_line,
    one_line_errors,
    out_option,
    save_figure,
    save_results,
)
from serve import BASELINE, LEGO, Server, poisson_arrivals  # noqa: E402

from lego_export.errors import LegoError  # noqa: E402
from lego_export.fid import FeatureStats, frechet_distance  # noqa: E402
from lego_export.manifest import Manifest  # noqa: E402
from lego_export.serve.service import EXPIRED_IN  # noqa: E402

CANVASES = ("32x32", "32x96", "64x64")
SMALL_CANVASES = ("16x16", "16x32", "32x32")  # the tiny test engines
SERVERS = ((BASELINE, None), (LEGO, "exact"), (LEGO, "elastic"))
REPEATS = 3  # runs alone of each request the cost model is checked on


def positive_rate(ctx, param, value: float | None) -> float | None:
    """--c-fifo: a rate to scale arrivals by, so finite and above 0 (0 would read as not given)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value} is not a positive number of requests per second")
    return value


def positive_loads(ctx, param, value: str) -> list[float]:
    """--loads: '0.5,1,3' -> [0.5, 1.0, 3.0], each a positive multiple of C_FIFO."""
    try:
        loads = [float(x) for x in value.split(",")]
    except ValueError:
        loads = []
    if not loads or not all(math.isfinite(x) and x > 0 for x in loads):
        raise click.BadParameter(f"{value!r}: a comma-separated list of positive numbers, such as 0.5,1,2")
    return loads


def workload(n: int, seed: int, num_classes: int, sides: tuple[str, ...]) -> list[dict]:
    rng = np.random.default_rng(seed)
    bodies = []
    for i in range(n):
        body = {
            "resolution": str(rng.choice(sides, p=[0.6, 0.25, 0.15])),
            "num": int(rng.choice([1, 2], p=[0.7, 0.3])),
            "seed": i,
            "format": "npz",
        }
        if num_classes:
            body["class"] = int(rng.integers(num_classes))
        bodies.append(body)
    return bodies


def send(server: Server, bodies: list[dict], arrivals: list[float]) -> list[dict]:
    """Send request i at arrivals[i]; per request: HTTP status, latency, its X-Lego-Run and (lego-serve)
    X-Lego-Timing's queued_s and service_s (status None and the error where no answer came)."""
    import httpx

    out: list[dict] = [{} for _ in bodies]
    start = time.perf_counter()

    def one(i: int) -> None:
        delay = arrivals[i] - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()
        try:
            r = server.http.post("/v1/images", json=bodies[i], timeout=600)
        except httpx.HTTPError as e:  # counted among other_errors, and the run exits non-zero
            out[i] = {"status": None, "latency_s": time.perf_counter() - sent, "run": None, "error": one_line(e)}
            return
        run = json.loads(r.headers["X-Lego-Run"]) if "X-Lego-Run" in r.headers else None
        timing = json.loads(r.headers["X-Lego-Timing"]) if "X-Lego-Timing" in r.headers else {}
        out[i] = {"status": r.status_code, "latency_s": time.perf_counter() - sent, "run": run, **timing}
        if r.status_code == 504:  # where the deadline passed: queued, while sampling, or with the answer ready
            out[i]["expired_in"] = r.json().get("expired_in") or "other"

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    return out


def answered(response):
    """A response that must be a 200 (a request alone, with no deadline), else a one-line failure."""
    if response.status_code != 200:
        raise click.ClickException(f"a request alone got {response.status_code}: {response.text[:200]}")
    return response


def attainment(answers: list[dict], bodies: list[dict]) -> float:
    ok = [a["status"] == 200 and a["latency_s"] <= b["deadline_s"] for a, b in zip(answers, bodies, strict=True)]
    return float(np.mean(ok))


class LadderImages:
    """The ladder's images as features (ladder.py's OUT.features.npz): what a mix of rungs scores."""

    def __init__(self, path: Path):
        with np.load(path) as data:
            self.features = data["features"].astype(np.float64)  # rungs x images x D, image i: the same noise
            self.test = FeatureStats(data["test_mu"], data["test_sigma"])

    def fid(self, served: dict[str, int]) -> float:
        """FID of the images of a mix of rungs (requests served per rung) as one set: of the N
        images, a block of consecutive ones from each rung in proportion to its share."""
        n, total = self.features.shape[1], sum(served.values())
        exact = {int(r): n * count / total for r, count in served.items()}
        take = {r: math.floor(x) for r, x in exact.items()}
        for r in sorted(exact, key=lambda r: take[r] - exact[r])[: n - sum(take.values())]:
            take[r] += 1  # largest remainders first, so that the blocks fill the N images
        edges = np.cumsum([0, *(take[r] for r in sorted(take))])
        parts = [self.features[r, a:b] for r, a, b in zip(sorted(take), edges[:-1], edges[1:], strict=True)]
        return frechet_distance(FeatureStats.of(np.concatenate(parts)), self.test)


def summarize(
    answers: list[dict], bodies: list[dict], alone: dict[str, float], ladder: list[dict], images: LadderImages | None
) -> dict:
    """One server at one load; alone: median service time alone per canvas."""
    n = len(answers)
    row = {
        "within_deadline": attainment(answers, bodies),
        "refused": sum(a["status"] == 429 for a in answers) / n,
        "expired": sum(a["status"] == 504 for a in answers) / n,
        "other_errors": sum(a["status"] not in (200, 429, 504) for a in answers),
        "expired_in": {w: sum(a.get("expired_in") == w for a in answers) for w in (*EXPIRED_IN, "other")},
    }
    served_lat = [a["latency_s"] for a in answers if a["status"] == 200]
    row["p99_all"] = float(np.percentile(served_lat, 99)) if served_lat else None  # pooled: less noisy
    for canvas in alone:
        lat = [
            a["latency_s"]
            for a, b in zip(answers, bodies, strict=True)
            if a["status"] == 200 and b["resolution"] == canvas
        ]
        row[f"p50_{canvas}"] = float(np.percentile(lat, 50)) if lat else None
        row[f"p99_{canvas}"] = float(np.percentile(lat, 99)) if lat else None
        row[f"p99_over_alone_{canvas}"] = row[f"p99_{canvas}"] / alone[canvas] if lat and canvas in alone else None
    rungs: dict[str, int] = {}
    for a in answers:
        if a["status"] == 200:
            rung = a["run"]["rung"] if a["run"] else 0  # the baseline runs every request as asked (rung 0)
            rungs[str(rung)] = rungs.get(str(rung), 0) + 1
    row["rungs"] = rungs
    served = sum(rungs.values())
    if served and ladder:
        row["fid_served"] = images.fid(rungs)
        row["class_accuracy_served"] = sum(ladder[int(k)]["class_accuracy"] * v for k, v in rungs.items()) / served
    return row


def p99_ratio_intervals(
    answers: list[dict], base: list[dict], bodies: list[dict], canvases: tuple[str, ...], draws: int = 2000
) -> dict[str, list[float]]:
    """90% bootstrap interval of p99(answers) / p99(base), per canvas and over all: both servers had
    the same requests at the same times, so requests are drawn in pairs. A p99 of a few dozen
    requests is their slowest one or two; the interval says how far apart two runs of equal
    servers could land."""
    rng = np.random.default_rng(0)
    out = {}
    for key in [*canvases, "all"]:
        pairs = [
            (a["latency_s"], b["latency_s"])
            for a, b, body in zip(answers, base, bodies, strict=True)
            if a["status"] == 200 and b["status"] == 200 and key in ("all", body["resolution"])
        ]
        if len(pairs) < 2:
            continue
        lat = np.array(pairs)
        picks = rng.integers(len(lat), size=(draws, len(lat)))
        ratios = np.percentile(lat[picks, 0], 99, axis=1) / np.percentile(lat[picks, 1], 99, axis=1)
        out[key] = [float(x) for x in np.percentile(ratios, [5, 95])]
    return out


def targets(
    rows: list[dict], canvases: tuple[str, ...], cost_error: float, full_fid: float | None, paced: float | None = None
) -> list[str]:
    """The serving issue's targets, each with its measured value, as markdown lines. cost_error: of
    the startup calibration's predictions; paced: of those times the server's pace (what it plans with)."""

    def row(server: str, quality: str, load: float) -> dict | None:
        return next((r for r in rows if (r["server"], r["quality"], r["load"]) == (server, quality, load)), None)

    def verdict(met: bool) -> str:
        return "met" if met else "**not met**"

    def light_ratios(quality: str, against: tuple[str, str]) -> list[tuple[float, str, list | None]]:
        """p99 of lego-serve at this quality over against's, per canvas (and all) and load <= 1x."""
        ratios = []
        for r in rows:
            other = row(*against, r["load"])
            if r["server"] != LEGO or r["quality"] != quality or r["load"] > 1 or other is None:
                continue
            for key in [f"p99_{c}" for c in canvases] + ["p99_all"]:
                if r.get(key) and other.get(key):
                    interval = r.get("p99_ratio_interval", {}).get(key[4:]) if against[0] == BASELINE else None
                    ratios.append((r[key] / other[key], f"{key[4:]} at {r['load']:g}x", interval))
        return ratios

    def degraded(r: dict) -> int:
        return sum(v for k, v in r["rungs"].items() if k not in ("0", "None"))  # None: its own options

    out = []
    for quality in ("exact", "elastic"):
        ratios = light_ratios(quality, (BASELINE, "-"))
        light = [r for r in rows if r["server"] == LEGO and r["quality"] == quality and r["load"] <= 1]
        n_degraded = sum(degraded(r) for r in light)
        if ratios:
            worst, where, interval = max(ratios, key=lambda x: x[0])
            spread = f", 90% interval {interval[0]:.2f}-{interval[1]:.2f}x" if interval else ""
            out.append(
                f"- <= 1x C_FIFO, {quality}: p99 within 5% of the one-at-a-time server's: worst {worst:.2f}x "
                f"({where}{spread}), {n_degraded} requests degraded: {verdict(worst <= 1.05 and n_degraded == 0)}"
            )
    # The run's own resolution: where no request was degraded, exact and elastic ran the same work on
    # the same server, so how far apart their p99s land is how far two equal servers land in this run.
    if not any(degraded(r) for r in rows if r["server"] == LEGO and r["load"] <= 1):
        apart = [
            max(light_ratios(a, (LEGO, b)), key=lambda x: x[0], default=None)
            for a, b in (("elastic", "exact"), ("exact", "elastic"))
        ]
        if all(apart):
            (up, up_where, _), (down, down_where, _) = apart
            out.append(
                f"- resolution (not a target): at <= 1x, exact and elastic ran the same work on the same server; "
                f"worst p99 elastic / exact {up:.2f}x ({up_where}), exact / elastic {down:.2f}x ({down_where})"
            )
    for load, within, lost, max_fid_ratio in ((2.0, 0.99, 0.01, 1.10), (3.0, 0.95, 0.05, None)):
        r = row(LEGO, "elastic", load)
        if r is None:
            continue
        met = r["within_deadline"] >= within and r["refused"] + r["expired"] <= lost
        fid_text = ""
        if max_fid_ratio and r.get("fid_served") and full_fid:
            ratio = r["fid_served"] / full_fid
            fid_text, met = f", FID served {ratio:.3f}x full quality", met and ratio <= max_fid_ratio
        out.append(
            f"- {load:g}x C_FIFO, elastic: within deadline {r['within_deadline']:.1%} (>= {within:.0%}), refused + "
            f"expired {r['refused'] + r['expired']:.1%} (<= {lost:.0%}){fid_text}: {verdict(met)}"
        )
    largest = f"p99_over_alone_{canvases[-1]}"
    for quality in ("exact", "elastic"):
        r = row(LEGO, quality, 2.0)
        if r is not None and r.get(largest) is not None:
            out.append(
                f"- 2x C_FIFO, {quality}: {canvases[-1]} p99 {r[largest]:.1f}x its time alone (<= 5x): "
                f"{verdict(r[largest] <= 5)}"
            )
    out.append(f"- cost model median error {cost_error:.1%} (<= 10%): {verdict(cost_error <= 0.10)}")
    if paced is not None:
        out.append(f"- the same, times the pace the server plans with: {paced:.1%} (<= 10%): {verdict(paced <= 0.10)}")
    return out


def plot(data: dict, path: Path) -> None:
    """Deadline attainment and the FID served, against offered load, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (server, quality), style in zip(SERVERS, ("s--", "o-", "^-"), strict=True):
        rows = [r for r in data["rows"] if r["server"] == server and (quality is None or r["quality"] == quality)]
        label = server if quality is None else f"{server} ({quality})"
        loads = [r["load"] for r in rows]
        axes[0].plot(loads, [100 * r["within_deadline"] for r in rows], style, label=label)
        axes[1].plot(loads, [r.get("fid_served") for r in rows], style, label=label)
    axes[0].axhline(99, color="grey", linestyle=":", linewidth=1)
    axes[0].set(ylabel="requests within deadline (%)", title="deadline attainment")
    full = data.get("fid_full_quality") or (data["ladder"][0]["fid"] if data.get("ladder") else None)
    served = [r["fid_served"] for r in data["rows"] if r.get("fid_served")]
    if full and served:  # from full quality to the target or the worst served: a sliver of a rung reads as one
        axes[1].axhline(1.10 * full, color="grey", linestyle=":", linewidth=1, label="1.10x full quality")
        axes[1].set_ylim(0.98 * min(full, *served), 1.04 * max(1.10 * full, *served))
    axes[1].set(ylabel="FID of the images served", title="quality served")
    for ax in axes:
        ax.set_xlabel(f"offered load (x C_FIFO = {data['c_fifo_requests_per_s']:.2f} requests/s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--backend", default="onnxruntime", show_default=True)
@click.option("--threads", default=0, show_default=True)
@click.option("--requests", "n", default=120, show_default=True, help="Requests per load.")
@click.option("--slo", default=5.0, show_default=True, help="Deadline: this many times the request's time alone.")
@click.option(
    "--loads", default="0.5,1,1.5,2,3", show_default=True, callback=positive_loads, help="Offered loads, x C_FIFO."
)
@click.option("--ladder", "ladder_json", default="benchmarks/results/ladder.json", show_default=True)
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(1), help="Blocks per load (see above).")
@click.option("--probes", default=6, show_default=True, type=click.IntRange(1), help="Bisection steps for C_FIFO.")
@click.option("--seed", default=0, show_default=True)
@click.option("--small", is_flag=True, help="16-pixel canvases (the tiny test engines).")
@click.option("--max-active", default=None, type=int, help="lego-serve's --max-active (default: its own).")
@click.option(
    "--streams",
    default=1,
    show_default=True,
    type=click.IntRange(0, 64),
    help="lego-serve's --streams (parallel engine calls; 0: its automatic choice).",
)
@click.option(
    "--c-fifo", "given_c_fifo", default=None, type=float, callback=positive_rate,
    help="Use this C_FIFO (requests/s); no search.",
)  # fmt: skip
@out_option("benchmarks/results/serve-load")
@click.option("--replot", is_flag=True, help="Only redraw OUT.png from OUT.json.")
@click.option("--servers", default="baseline,exact,elastic", show_default=True, help="Which servers to load.")
@one_line_errors
def main(
    engines, backend, threads, n, slo, loads, ladder_json, rounds, probes, seed, small, max_active, streams,
    given_c_fifo, out, replot, servers,
):  # fmt: skip
    """C_FIFO, then each server at multiples of it: deadline attainment, refusals, rungs, quality."""
    if replot:
        if out is None:
            raise click.UsageError("--replot redraws PREFIX.png from PREFIX.json: give --out PREFIX")
        try:
            data = json.loads(Path(out + ".json").read_text())
        except (OSError, ValueError) as e:
            raise click.ClickException(f"--replot needs {out}.json as this script wrote it: {e}") from None
        plot(data, Path(out + ".png"))
        return
    chosen = set(servers.split(","))
    if not chosen <= {"baseline", "exact", "elastic"}:
        hint = "a comma-separated list of baseline, exact, elastic"
        raise click.BadParameter(f"{servers!r}: {hint}", param_hint="--servers")
    try:
        manifest = Manifest.read(engines)
    except LegoError as e:
        raise click.ClickException(str(e)) from None
    canvases = SMALL_CANVASES if small else CANVASES
    bodies = workload(n, seed, manifest.model.num_classes, canvases)
    ladder, images, full_fid = [], None, None
    if Path(ladder_json).exists():
        rows = json.loads(Path(ladder_json).read_text())["rows"]
        ladder = sorted(rows, key=lambda r: r["rung"])  # ladder.py measures the manifest's rungs, all of them
        rungs = manifest.recommended.rungs if manifest.recommended else []
        features = Path(ladder_json).with_suffix(".features.npz")
        if [r["setting"] for r in ladder] != [o.describe() for o in rungs] or not features.is_file():
            raise click.ClickException(f"{ladder_json} measured another ladder than {engines}'s: rerun ladder.py")
        images = LadderImages(features)
        full_fid = images.fid({"0": 1})  # every image at full quality, scored the same way
    lego_options = ["--max-queue", str(4 * n), "--drain-timeout", "5"]
    lego_options += ["--max-active", str(max_active)] if max_active else []
    lego_options += ["--streams", str(streams)]

    # 1. Service time alone of every request: one at a time on the baseline.
    base = Server(BASELINE, engines, backend, threads, [])
    try:
        print("service times alone (baseline, one at a time) ...", flush=True)
        alone_each = []
        for body in bodies:
            start = time.perf_counter()
            answered(base.http.post("/v1/images", json=body, timeout=600))
            alone_each.append(time.perf_counter() - start)
        # Each request is due slo x the median time alone of its kind (canvas, images): one noisy
        # measurement must not make a request's deadline tighter than its kind's.
        kinds: dict[tuple, list[float]] = {}
        for body, t in zip(bodies, alone_each, strict=True):
            kinds.setdefault((body["resolution"], body["num"]), []).append(t)
        for body in bodies:
            body["deadline_s"] = round(slo * float(np.median(kinds[(body["resolution"], body["num"])])), 4)
        alone = {c: float(np.median([t for b, t in zip(bodies, alone_each, strict=True) if b["resolution"] == c]))
                 for c in canvases if any(b["resolution"] == c for b in bodies)}  # fmt: skip
        capacity = n / sum(alone_each)
        # 2. C_FIFO by bisection between 0 and the baseline's capacity, each rate offered as the loads
        # are below (the same arrivals, in the same blocks, each block begun on an idle server): a
        # trace sent unbroken, or other arrivals, keep fewer requests in time than the loads' blocks
        # at the same rate, so a C_FIFO probed that way would make every load lighter than it says.
        blocks = [b for b in np.array_split(np.arange(n), rounds) if len(b)]  # rounds > n: n blocks
        unit = poisson_arrivals(n, 1.0, np.random.default_rng(seed + 2))  # the arrivals at 1 request/s

        def offer(server: Server, block, rate: float, quality: str) -> list[dict]:
            """One block at `rate` requests/s, each request as asked or with this quality."""
            arrivals = [(unit[i] - unit[block[0]]) / rate for i in block]
            asked = [bodies[j] if quality == "-" else {**bodies[j], "quality": quality} for j in block]
            return send(server, asked, arrivals)

        # lego-serve starts before the probes and waits idle through them, as each server waits
        # through the others' blocks in the loads: the probes meet the machine the loads meet.
        lego = Server(LEGO, engines, backend, threads, lego_options)
        try:
            lo, hi, probes_run = 0.0, capacity, []
            for _ in range(0 if given_c_fifo else probes):
                rate = (lo + hi) / 2
                share = attainment([a for block in blocks for a in offer(base, block, rate, "-")], bodies)
                probes_run.append({"rate": rate, "within_deadline": share})
                print(f"  baseline at {rate:.3f} requests/s: {share:.1%} within deadline", flush=True)
                lo, hi = (rate, hi) if share >= 0.99 else (lo, rate)
            c_fifo = given_c_fifo or (lo if lo > 0 else hi / 2)
            print(f"C_FIFO = {c_fifo:.3f} requests/s (capacity alone {capacity:.3f})", flush=True)

            # 3. The cost model alone: each request exact, one at a time, each also on the baseline
            # just before, so that the two servers' times alone are measured side by side. Each is
            # sent to lego-serve REPEATS times: one run's time scatters with the machine's jitter,
            # which no prediction can follow; the median of the repeats is the request's service time.
            errors, paced_errors, latency_errors, single_errors, jitter = [], [], [], [], []
            lego_alone_each: dict[str, list[float]] = {}
            base_alone_each: dict[str, list[float]] = {}
            for body in bodies[: min(n, 40)]:
                start = time.perf_counter()
                answered(base.http.post("/v1/images", json=body, timeout=600))
                base_alone_each.setdefault(body["resolution"], []).append(time.perf_counter() - start)
                services, latencies = [], []
                for _ in range(REPEATS):
                    start = time.perf_counter()
                    asked = {**body, "quality": "exact", "deadline_s": None}
                    r = answered(lego.http.post("/v1/images", json=asked, timeout=600))
                    latencies.append(time.perf_counter() - start)
                    record = json.loads(r.headers["X-Lego-Run"])
                    services.append(json.loads(r.headers["X-Lego-Timing"])["service_s"])  # slot to answer
                predicted, service, latency = record["predicted_s"], float(np.median(services)), np.median(latencies)
                errors.append((predicted - service) / service)
                paced_errors.append((predicted * record["pace"] - service) / service)
                latency_errors.append(float((predicted - latency) / latency))
                single_errors.append((predicted - services[0]) / services[0])
                jitter.append(abs(services[0] - service) / service)
                lego_alone_each.setdefault(body["resolution"], []).append(latencies[0])
            lego_alone = {c: float(np.median(lego_alone_each[c])) for c in canvases if c in lego_alone_each}
            base_alone = {c: float(np.median(base_alone_each[c])) for c in canvases if c in base_alone_each}

            # 4. Each load in blocks, each block to every chosen server in turn.
            runs = [(base, BASELINE, "-")] if "baseline" in chosen else []
            runs += [(lego, LEGO, q) for q in ("exact", "elastic") if q in chosen]
            results = []
            for f in loads:
                answers: dict[int, list] = {i: [None] * n for i in range(len(runs))}
                for b, block in enumerate(blocks):
                    for k in range(len(runs)):
                        i = (b + k) % len(runs)  # rotate who goes first
                        server, _, quality = runs[i]
                        for j, answer in zip(block, offer(server, block, f * c_fifo, quality), strict=True):
                            answers[i][j] = answer
                for i, (_, name, quality) in enumerate(runs):
                    row = summarize(answers[i], bodies, alone, ladder, images)
                    fields = ("status", "latency_s", "queued_s", "service_s")  # each request, in workload order
                    row["requests"] = {key: [a.get(key) for a in answers[i]] for key in fields}
                    if name == LEGO and "baseline" in chosen:
                        row["p99_ratio_interval"] = p99_ratio_intervals(answers[i], answers[0], bodies, canvases)
                    results.append({"server": name, "quality": quality, "load": f, **row})
                    print(
                        f"  {name} {quality} at {f}x: {row['within_deadline']:.1%}, refused {row['refused']:.1%}, "
                        f"expired {row['expired']:.1%} {row['expired_in']}, rungs {row['rungs']}",
                        flush=True,
                    )
        finally:
            lego.close()
    finally:
        base.close()

    error = {
        "median_abs": float(np.median(np.abs(errors))),
        "median_signed": float(np.median(errors)),
        "median_abs_vs_latency": float(np.median(np.abs(latency_errors))),
        "median_signed_vs_latency": float(np.median(latency_errors)),
        "median_abs_paced": float(np.median(np.abs(paced_errors))),  # predicted x pace: what admission uses
        "median_signed_paced": float(np.median(paced_errors)),
        "median_abs_single_run": float(np.median(np.abs(single_errors))),  # against one run's time
        "median_jitter": float(np.median(jitter)),  # one run against the median of its repeats
        "repeats": REPEATS,
        "requests": len(errors),
    }
    data = {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "slo_multiple": slo,
        "requests_per_load": n,
        "workload": bodies,
        "service_time_alone_s": alone,
        "time_alone_side_by_side_s": {"baseline": base_alone, LEGO: lego_alone},  # first 40 requests, in turn
        "capacity_alone_requests_per_s": capacity,
        "c_fifo_requests_per_s": c_fifo,
        "c_fifo_probes": probes_run,
        "cost_model_error": error,
        "ladder": ladder,
        "fid_full_quality": full_fid,  # the FID served counts against: rung 0's images alone, scored the same way
        "rows": results,
    }
    columns = [("server", "server", "s"), ("quality", "quality", "s"), ("load", "x C_FIFO", ".1f"),
               ("within_deadline", "within deadline", ".1%"), ("refused", "refused", ".1%"),
               ("expired", "expired", ".1%")]  # fmt: skip
    for c in canvases:
        columns += [(f"p50_{c}", f"p50 {c} (s)", ".2f"), (f"p99_{c}", f"p99 {c} (s)", ".2f")]
    columns += [("p99_all", "p99 all (s)", ".2f"),
                (f"p99_over_alone_{canvases[-1]}", f"p99 / alone {canvases[-1]}", ".1f"),
                ("fid_served", "FID served", ".2f"), ("class_accuracy_served", "class acc. served", ".3f")]  # fmt: skip
    for r in results:
        r["rungs_text"] = " ".join(f"{k}:{v}" for k, v in sorted(r["rungs"].items()))
    columns.append(("rungs_text", "requests per rung", "s"))
    ladder_rows = [{**r, "rung": i} for i, r in enumerate(ladder)]
    text = "\n".join(
        [
            "# Deadlines under load",
            "",
            f"`{data['command']}`",
            "",
            f"{n} requests per load in {len(blocks)} blocks, each block to every server in turn (the recommended "
            f"setting, canvases {', '.join(canvases)}, 1-2 images), each due "
            f"{slo:g}x the median service time alone of its kind (canvas, images); "
            f"{machine()['cores']} cores ({machine()['cpu']}). "
            f"C_FIFO = **{c_fifo:.3f} requests/s** (one-at-a-time capacity {capacity:.3f}). "
            "Service time alone (median per canvas of 40 requests, each sent to the one-at-a-time server and then "
            "to lego-serve): "
            + ", ".join(f"{c} {t:.3f} / {lego_alone.get(c, float('nan')):.3f} s" for c, t in base_alone.items())
            + ".",
            "",
            markdown_table(results, columns),
            "",
            "Targets:",
            "",
            *targets(results, canvases, error["median_abs"], full_fid, error["median_abs_paced"]),
            "",
            f"Cost model (lego-serve's prediction of each request's service time alone against the service time "
            f"it measured, slot to answer, the median of {REPEATS} runs of each of {len(errors)} requests one at a "
            f"time): median absolute error **{error['median_abs']:.1%}** (median signed "
            f"{error['median_signed']:+.1%}); against one run's time: {error['median_abs_single_run']:.1%}, as one "
            f"run differs from the median of its repeats by {error['median_jitter']:.1%} (median); against the latency "
            f"the client saw (HTTP included): {error['median_abs_vs_latency']:.1%} "
            f"({error['median_signed_vs_latency']:+.1%}); the prediction times the pace at the request's start (the "
            f"startup calibration corrected by the wall time work took since; what admission plans with), against "
            f"the service time: {error['median_abs_paced']:.1%} ({error['median_signed_paced']:+.1%}).",
            "",
            "Ladder (benchmarks/ladder.py). FID served: of its 2,000 images per rung, one set in which each rung "
            "has its share of the requests served; class accuracy served: the rungs' accuracies so weighted:",
            "",
            markdown_table(
                ladder_rows,
                [
                    ("rung", "rung", "d"),
                    ("setting", "setting", "s"),
                    ("fid", "FID", ".2f"),
                    ("class_accuracy", "class acc.", ".3f"),
                    ("brick_flops_vs_reference", "brick FLOPs / Heun 50", ".4f"),
                ],
            ),  # fmt: skip
            "",
        ]
    )
    save_results(out, data, text, lambda path: plot(data, path))
    failed = sum(r["other_errors"] for r in results)
    if failed:
        raise click.ClickException(f"{failed} requests failed (neither answered, refused nor expired): see the rows")


if __name__ == "__main__":
    main()
