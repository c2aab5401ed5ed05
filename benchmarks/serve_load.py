"""Deadlines under load: a one-at-a-time server against lego-serve, exact and elastic, and variants of it.

    python benchmarks/serve_load.py --engines engines --out benchmarks/results/serve-load   # about 30 min on 2 cores

Every request carries a deadline: --slo times the median service time alone of its kind (canvas,
image count, and the steps it names if it names any; measured first, one request at a time on the
one-at-a-time server). C_FIFO is the highest Poisson arrival rate at which the one-at-a-time server
(serve.py's baseline) answers 99% of the requests within their deadline, found by bisection, each
rate offered as the loads are (below). Then 0.5, 1, 1.5, 2 and 3 x C_FIFO are offered, with the
same arrival times, to these servers, each alone on the machine while loaded:

  baseline       one request at a time, in arrival order (answers late rather than never);
  lego-serve     exact: every request as asked ("quality": "exact"): least slack first, refused
                 (429) when it cannot finish in time, expired (504) when its deadline passes;
  lego-serve     elastic (the default): as exact, and a request that would be late runs at the
                 highest rung of the model's serving ladder that finishes in time;
  each --variant NAME=OPTIONS: another lego-serve, started with these extra options, loaded elastic
                 (e.g. "streams-2=--streams 2": what that option changes, side by side).

Each load's requests are sent in --rounds consecutive blocks, each block to every server in turn
(the order rotating from block to block), and a server's answers at a load are pooled over the
blocks: the speed of these shared machines drifts by up to 1.5x within a quarter of an hour, so
servers loaded one after another would compare the machine's moods as much as the servers.

The workload (--mix) is a fixed mix of canvases (32x32, 32x96, 64x64) and 1 or 2 images; each request
takes the model's recommended setting (no sampling options: "recommended"), names its own steps
(Heun 12 or 18: "own"), or, with "both", half the requests one and half the other. Per server and
load: share of requests answered within their deadline, refused and expired shares, p50 / p99
latency per canvas, p99 over the canvas's service time alone, requests per rung and the share
served at a tuned rung, an untuned one, or their own options, and the quality of what was served,
from the images of every setting served (benchmarks/ladder.py, 2,000 per setting, keyed by
SamplingOptions.describe()): the FID of one set of 2,000 in which each setting has the share of the
requests it served (its images of disjoint noise, as distinct requests are), the same for the
settings the requests asked for ("as asked": no request degraded), and the class accuracy weighted
likewise. A setting served that ladder.py did not measure leaves its rows unscored, and the run
exits non-zero naming the `ladder.py --setting` to add; `--rescore` then scores OUT.json again. Also
the cost model's error: lego-serve's predicted service time of each request alone against its
measured service time alone (the median of 3 runs of each). Prints the report; with --out PREFIX
also writes PREFIX.json, PREFIX.md and PREFIX.png (deadline attainment and served FID against
offered load; `--replot` redraws it from PREFIX.json).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
import threading
import time
from collections import Counter
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

from lego_export.edm import Churn  # noqa: E402
from lego_export.errors import LegoError  # noqa: E402
from lego_export.fid import FeatureStats, frechet_distance  # noqa: E402
from lego_export.ladder import serving_ladder  # noqa: E402
from lego_export.manifest import Manifest  # noqa: E402
from lego_export.options import SamplingOptions  # noqa: E402
from lego_export.serve.validation import Limits, RequestError, parse_image_request  # noqa: E402

CANVASES = ("32x32", "32x96", "64x64")
SMALL_CANVASES = ("16x16", "16x32", "32x32")  # the tiny test engines
SERVERS = ((BASELINE, None), (LEGO, "exact"), (LEGO, "elastic"))
MIXES = ("recommended", "own", "both")
OWN_STEPS = (12, 18)  # a request that names its own steps: Heun 12 or 18 (the sampler's default)
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


def parse_variants(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    """--variant NAME=OPTIONS (repeatable) -> {name: options}, names unique and none a server's."""
    out: dict[str, str] = {}
    for text in values:
        name, sep, options = text.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}", name) or not options.strip():
            raise click.BadParameter(f"{text!r}: write NAME=OPTIONS, e.g. 'streams-2=--streams 2'")
        if name in out or name in ("baseline", "exact", "elastic"):
            raise click.BadParameter(f"{text!r}: the name {name!r} is taken (by another variant or a server)")
        out[name] = options.strip()
    return out


def check_variant_options(variants: dict[str, str], engines: str) -> None:
    """Each variant's options as lego-serve reads and checks them, before any server starts."""
    from lego_export.serve.cli import main as lego_serve
    from lego_export.serve.cli import make_config

    for name, options in variants.items():
        try:
            words = shlex.split(options)
            params = lego_serve.make_context("lego-serve", ["--engines", engines, *words]).params
            make_config(**{k: v for k, v in params.items() if k not in ("host", "port", "log_level")})
        except (ValueError, LegoError, click.ClickException) as e:
            message = e.format_message() if isinstance(e, click.ClickException) else str(e)
            raise click.BadParameter(f"{name}={options}: {message}", param_hint="--variant") from None


def workload(n: int, seed: int, num_classes: int, sides: tuple[str, ...], mix: str = "recommended") -> list[dict]:
    """n request bodies; mix: each takes the recommended setting, names its own steps, or (both) half each."""
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
    # A generator of its own: the canvases, counts and classes stay those of every other mix.
    own_rng = np.random.default_rng([seed, 1])
    own = {"recommended": np.zeros(n, bool), "own": np.ones(n, bool), "both": own_rng.permutation(n) < n // 2}[mix]
    steps = own_rng.choice(OWN_STEPS, size=n)
    for body, is_own, k in zip(bodies, own, steps, strict=True):
        if is_own:
            body["steps"] = int(k)
    return bodies


def kind(body: dict) -> tuple:
    """Requests of one kind share a deadline: canvas, images, and the steps named (None: recommended)."""
    return body["resolution"], body["num"], body.get("steps")


def asked_options(bodies: list[dict], manifest: Manifest) -> list[SamplingOptions]:
    """What each request runs at when not degraded, as both servers parse it."""
    out = []
    for body in bodies:
        try:
            out.append(parse_image_request(dict(body), manifest, Limits()).options)
        except RequestError as e:
            raise click.ClickException(f"a workload request is refused by the server's parser: {e.message}") from None
    return out


def options_from_record(options: dict) -> SamplingOptions:
    """The "options" of lego-serve's run record (SamplingOptions.to_dict) as SamplingOptions."""
    churn = options.get("churn")
    if churn is not None:
        churn = Churn(**{**churn, "s_max": math.inf if churn.get("s_max") is None else churn["s_max"]})
    return SamplingOptions(**{**options, "churn": churn})


def setting_hint(options: SamplingOptions) -> str:
    """The ladder.py --setting that measures these options (their fields that differ from the defaults)."""
    default = SamplingOptions().to_dict()
    given = {k: v for k, v in options.to_dict().items() if v != default[k]}
    return f"--setting '{json.dumps(given)}'"


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
    """The images of every setting ladder.py measured, as features (its OUT.features.npz, row i of
    OUT.json's "rows" in features[i]): what a mix of settings scores."""

    def __init__(self, path: Path, settings: list[str]):
        with np.load(path) as data:
            self.features = data["features"].astype(np.float64)  # settings x images x D, image i: the same noise
            self.test = FeatureStats(data["test_mu"], data["test_sigma"])
        if len(settings) != len(self.features):
            raise click.ClickException(f"{path}: {len(self.features)} rows of features for {len(settings)} settings")
        self.index = {s: i for i, s in enumerate(settings)}

    def fid(self, served: dict[str, int]) -> float:
        """FID of the images of a mix of settings (requests served per setting) as one set: of the N
        images, a block of consecutive ones from each setting in proportion to its share."""
        n, total = self.features.shape[1], sum(served.values())
        exact = {self.index[s]: n * count / total for s, count in served.items() if count}
        take = {r: math.floor(x) for r, x in exact.items()}
        for r in sorted(exact, key=lambda r: take[r] - exact[r])[: n - sum(take.values())]:
            take[r] += 1  # largest remainders first, so that the blocks fill the N images
        edges = np.cumsum([0, *(take[r] for r in sorted(take))])
        parts = [self.features[r, a:b] for r, a, b in zip(sorted(take), edges[:-1], edges[1:], strict=True)]
        return frechet_distance(FeatureStats.of(np.concatenate(parts)), self.test)


class LadderResults:
    """ladder.py's OUT.json and OUT.features.npz: each setting's FID, class accuracy and images."""

    def __init__(self, path: Path):
        try:
            data = json.loads(path.read_text())
            self.rows: list[dict] = data["rows"]
            self.by_setting = {r["setting"]: r for r in self.rows}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise click.ClickException(f"--ladder {path}: not as ladder.py writes it ({one_line(e)})") from None
        self.path, self.checkpoint = path, data.get("checkpoint_sha256")
        features = path.with_suffix(".features.npz")
        if not features.is_file():
            raise click.ClickException(f"--ladder {path}: no {features.name} beside it (ladder.py --out writes both)")
        self.images = LadderImages(features, [r["setting"] for r in self.rows])

    def missing(self, settings) -> list[str]:
        return sorted(set(settings) - set(self.by_setting))

    def missing_message(self, options: dict[str, SamplingOptions], what: str) -> str:
        """One line: the settings with no row, and the ladder.py options that would measure them."""
        hints = " ".join(setting_hint(o) for o in options.values())
        return (
            f"{self.path} has no row for {'; '.join(repr(s) for s in options)} ({what}): run benchmarks/ladder.py "
            f"again with {hints}"
        )


def score(row: dict, asked: list[str], ladder: LadderResults | None) -> None:
    """The quality of what one server answered at one load, from row["requests"]: the settings served
    and as asked (counts), and with the ladder's images the FID of each mix and the class accuracy
    served; "unscored": settings served that the ladder has no row for (then no FID served)."""
    settings = row["requests"]["setting"]
    served = Counter(s for s in settings if s is not None)
    as_asked = Counter(a for a, s in zip(asked, settings, strict=True) if s is not None)
    row["settings"], row["settings_as_asked"] = dict(served), dict(as_asked)
    row["fid_served"] = row["fid_as_asked"] = row["class_accuracy_served"] = None
    row["unscored"] = ladder.missing(served) if ladder else []
    if ladder is None or not served:
        return
    row["fid_as_asked"] = ladder.images.fid(as_asked)  # every setting asked for has a row: checked first
    if row["unscored"]:
        return
    row["fid_served"] = ladder.images.fid(served)
    accuracies = {s: ladder.by_setting[s]["class_accuracy"] for s in served}
    if all(a is not None for a in accuracies.values()):
        row["class_accuracy_served"] = sum(accuracies[s] * k for s, k in served.items()) / sum(served.values())


def summarize(
    answers: list[dict], bodies: list[dict], asked: list[SamplingOptions], recommended: list[bool], tuned: bool,
    alone: dict[str, float],
) -> dict:  # fmt: skip
    """One server at one load; alone: median service time alone per canvas; asked: each request's
    options as asked, recommended: whether that is rung 0; tuned: whether the model's ladder is."""
    n = len(answers)
    row: dict = {
        "within_deadline": attainment(answers, bodies),
        "refused": sum(a["status"] == 429 for a in answers) / n,
        "expired": sum(a["status"] == 504 for a in answers) / n,
        "other_errors": sum(a["status"] not in (200, 429, 504) for a in answers),
        "expired_in": dict(Counter(a["expired_in"] for a in answers if a.get("expired_in"))),
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
    rungs: Counter = Counter()
    kinds: Counter = Counter()  # served at a tuned rung, an untuned one, or the request's own options
    degraded = 0
    settings: list[str | None] = []
    for a, options, top in zip(answers, asked, recommended, strict=True):
        if a["status"] != 200:
            settings.append(None)
            continue
        run = a["run"]  # None: the baseline, which runs every request as asked
        rung = run["rung"] if run else (0 if top else None)
        rungs[str(rung)] += 1
        # the record's "tuned" where it has one; else the rung is the model's ladder's, tuned or not
        at_tuned = None if rung is None else (run.get("tuned", tuned) if run else tuned)
        kinds[{True: "tuned", False: "untuned", None: "own"}[at_tuned]] += 1
        degraded += bool(run and run.get("degraded"))
        settings.append(options_from_record(run["options"]).describe() if run else options.describe())
    row["rungs"], row["degraded"] = dict(rungs), degraded
    served = sum(rungs.values())
    row["served_at"] = {k: kinds[k] / served if served else 0.0 for k in ("tuned", "untuned", "own")}
    row["requests"] = {
        **{key: [a.get(key) for a in answers] for key in ("status", "latency_s", "queued_s", "service_s")},
        "setting": settings,  # served, for each request in workload order (None: not answered)
    }
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


def main_rows(rows: list[dict]) -> list[dict]:
    """The rows of the three servers (not the variants)."""
    return [r for r in rows if not r.get("variant")]


def targets(rows: list[dict], canvases: tuple[str, ...], cost_error: float, paced: float | None = None) -> list[str]:
    """The serving targets, each with its measured value, as markdown lines. cost_error: of the
    startup calibration's predictions; paced: of those times the server's pace (what it plans with)."""
    rows = main_rows(rows)

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

    out = []
    for quality in ("exact", "elastic"):
        ratios = light_ratios(quality, (BASELINE, "-"))
        light = [r for r in rows if r["server"] == LEGO and r["quality"] == quality and r["load"] <= 1]
        n_degraded = sum(r["degraded"] for r in light)
        if ratios:
            worst, where, interval = max(ratios, key=lambda x: x[0])
            spread = f", 90% interval {interval[0]:.2f}-{interval[1]:.2f}x" if interval else ""
            out.append(
                f"- <= 1x C_FIFO, {quality}: p99 within 5% of the one-at-a-time server's: worst {worst:.2f}x "
                f"({where}{spread}), {n_degraded} requests degraded: {verdict(worst <= 1.05 and n_degraded == 0)}"
            )
    # The run's own resolution: where no request was degraded, exact and elastic ran the same work on
    # the same server, so how far apart their p99s land is how far two equal servers land in this run.
    if not any(r["degraded"] for r in rows if r["server"] == LEGO and r["load"] <= 1):
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
    for load, within, lost in ((2.0, 0.99, 0.01), (3.0, 0.95, None)):
        r = row(LEGO, "elastic", load)
        if r is None:
            continue
        gone = r["refused"] + r["expired"]
        met = r["within_deadline"] >= within and (lost is None or gone <= lost)
        bound = f" (<= {lost:.0%})" if lost is not None else ""
        out.append(
            f"- {load:g}x C_FIFO, elastic: within deadline {r['within_deadline']:.1%} (>= {within:.0%}), refused + "
            f"expired {gone:.1%}{bound}{quality_text(r)}: {verdict(met)}"
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


def quality_text(r: dict) -> str:
    """', FID served X (as asked Y), served at a tuned rung T%, ...' where measured."""
    text = ""
    if r.get("fid_served") is not None:
        text = f", FID served {r['fid_served']:.2f} (as asked {r['fid_as_asked']:.2f})"
    elif r.get("unscored"):
        text = f", FID served not scored ({len(r['unscored'])} settings without a ladder row)"
    at = r.get("served_at")
    if at:
        text += f"; served at a tuned rung {at['tuned']:.0%}, an untuned one {at['untuned']:.0%}, "
        text += f"their own options {at['own']:.0%}"
    return text


def variant_table(rows: list[dict]) -> list[dict]:
    """Each variant at each load against the elastic server at that load in the same run."""
    elastic = {r["load"]: r for r in main_rows(rows) if r["server"] == LEGO and r["quality"] == "elastic"}
    out = []
    for r in rows:
        e = elastic.get(r["load"])
        if not r.get("variant") or e is None:
            continue
        line = {"variant": r["variant"], "options": r["variant_options"], "load": r["load"]}
        line["within_deadline"], line["within_elastic"] = r["within_deadline"], e["within_deadline"]
        line["lost"], line["lost_elastic"] = r["refused"] + r["expired"], e["refused"] + e["expired"]
        line["p99_all"], line["p99_all_elastic"] = r["p99_all"], e["p99_all"]
        line["fid_served"], line["fid_served_elastic"] = r.get("fid_served"), e.get("fid_served")
        out.append(line)
    return out


def variant_lines(rows: list[dict]) -> list[str]:
    """One line per variant: what it changes against the elastic server, at each load."""
    table = variant_table(rows)
    lines = []
    for name in dict.fromkeys(t["variant"] for t in table):
        parts = []
        for t in (t for t in table if t["variant"] == name):
            part = (
                f"at {t['load']:g}x within deadline {100 * (t['within_deadline'] - t['within_elastic']):+.1f} pt, "
                f"refused + expired {100 * (t['lost'] - t['lost_elastic']):+.1f} pt"
            )
            if t["p99_all"] and t["p99_all_elastic"]:
                part += f", p99 {t['p99_all'] / t['p99_all_elastic']:.2f}x"
            if t["fid_served"] is not None and t["fid_served_elastic"] is not None:
                part += f", FID served {t['fid_served'] - t['fid_served_elastic']:+.2f}"
            parts.append(part)
        options = next(t["options"] for t in table if t["variant"] == name)
        lines.append(f"- {name} (`{options}`) against elastic: " + "; ".join(parts))
    return lines


def plot(data: dict, path: Path) -> None:
    """Deadline attainment and the FID served, against offered load, one line per server and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines = [
        (server, quality, None, style) for (server, quality), style in zip(SERVERS, ("s--", "o-", "^-"), strict=True)
    ]
    lines += [(LEGO, "elastic", name, ".:") for name in data.get("variants", {})]
    for server, quality, variant, style in lines:
        rows = [
            r for r in data["rows"]
            if r["server"] == server and (quality is None or r["quality"] == quality) and r.get("variant") == variant
        ]  # fmt: skip
        if not rows:
            continue
        label = variant or (server if quality is None else f"{server} ({quality})")
        loads = [r["load"] for r in rows]
        axes[0].plot(loads, [100 * r["within_deadline"] for r in rows], style, label=label)
        axes[1].plot(loads, [r.get("fid_served") for r in rows], style, label=label)
    axes[0].axhline(99, color="grey", linestyle=":", linewidth=1)
    axes[0].set(ylabel="requests within deadline (%)", title="deadline attainment")
    asked = [r["fid_as_asked"] for r in data["rows"] if r.get("fid_as_asked")]
    if asked:
        axes[1].axhline(float(np.median(asked)), color="grey", linestyle=":", linewidth=1, label="as asked")
    axes[1].set(ylabel="FID of the images served", title="quality served")
    for ax in axes:
        ax.set_xlabel(f"offered load (x C_FIFO = {data['c_fifo_requests_per_s']:.2f} requests/s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def report(data: dict) -> str:
    """The markdown report of a run (from its JSON: --rescore writes it again)."""
    canvases, results, error = tuple(data["canvases"]), data["rows"], data["cost_model_error"]
    lego_alone = data["time_alone_side_by_side_s"][LEGO]
    columns = [("server", "server", "s"), ("quality", "quality", "s"), ("load", "x C_FIFO", ".1f"),
               ("within_deadline", "within deadline", ".1%"), ("refused", "refused", ".1%"),
               ("expired", "expired", ".1%")]  # fmt: skip
    for c in canvases:
        columns += [(f"p50_{c}", f"p50 {c} (s)", ".2f"), (f"p99_{c}", f"p99 {c} (s)", ".2f")]
    columns += [("p99_all", "p99 all (s)", ".2f"),
                (f"p99_over_alone_{canvases[-1]}", f"p99 / alone {canvases[-1]}", ".1f"),
                ("fid_served", "FID served", ".2f"), ("fid_as_asked", "FID as asked", ".2f"),
                ("class_accuracy_served", "class acc. served", ".3f"), ("served_at_text", "tuned / untuned / own", "s"),
                ("rungs_text", "requests per rung", "s")]  # fmt: skip
    shown = [
        {**r, "rungs_text": " ".join(f"{k}:{v}" for k, v in sorted(r["rungs"].items())),
         "served_at_text": " / ".join(f"{r['served_at'][k]:.0%}" for k in ("tuned", "untuned", "own"))}
        for r in main_rows(results)
    ]  # fmt: skip
    own = f"their own steps (Heun {' or '.join(map(str, OWN_STEPS))})"
    mix = {"recommended": "the recommended setting", "own": own, "both": f"half the recommended setting, half {own}"}
    ladder_kind = "tuned (lego-export tune)" if data["ladder_tuned"] else "untuned (derived from the model)"
    text = [
        "# Deadlines under load",
        "",
        f"`{data['command']}`" + (f", scored with `{data['rescored']}`" if data.get("rescored") else ""),
        "",
        f"{data['requests_per_load']} requests per load in {data['blocks']} blocks, each block to every server in "
        f"turn (requests asking for {mix[data['mix']]}; canvases {', '.join(canvases)}, 1-2 images), each due "
        f"{data['slo_multiple']:g}x the median service time alone of its kind (canvas, images, steps named); "
        f"{data['machine']['cores']} cores ({data['machine']['cpu']}); serving ladder {ladder_kind}. "
        f"C_FIFO = **{data['c_fifo_requests_per_s']:.3f} requests/s** (one-at-a-time capacity "
        f"{data['capacity_alone_requests_per_s']:.3f}). Service time alone (median per canvas of the first "
        f"{error['requests']} requests, each sent to the one-at-a-time server and then to lego-serve): "
        + ", ".join(
            f"{c} {t:.3f} / {lego_alone.get(c, float('nan')):.3f} s"
            for c, t in data["time_alone_side_by_side_s"]["baseline"].items()
        )  # fmt: skip
        + ".",
        "",
        markdown_table(shown, columns),
        "",
        "Targets:",
        "",
        *targets(results, canvases, error["median_abs"], error.get("median_abs_paced")),
        "",
    ]
    if data.get("variants"):
        table = [
            {**t, "d_within": t["within_deadline"] - t["within_elastic"], "d_lost": t["lost"] - t["lost_elastic"],
             "p99_ratio": t["p99_all"] / t["p99_all_elastic"] if t["p99_all"] and t["p99_all_elastic"] else None}
            for t in variant_table(results)
        ]  # fmt: skip
        text += [
            "Variants (each another lego-serve with these options, loaded elastic in the same blocks), against the "
            "elastic server in the same run:",
            "",
            markdown_table(
                table,
                [
                    ("variant", "variant", "s"),
                    ("options", "options", "s"),
                    ("load", "x C_FIFO", ".1f"),
                    ("within_deadline", "within deadline", ".1%"),
                    ("within_elastic", "elastic", ".1%"),
                    ("lost", "refused + expired", ".1%"),
                    ("lost_elastic", "elastic", ".1%"),
                    ("p99_all", "p99 all (s)", ".2f"),
                    ("p99_ratio", "/ elastic", ".2f"),
                    ("fid_served", "FID served", ".2f"),
                    ("fid_served_elastic", "elastic", ".2f"),
                ],
            ),  # fmt: skip
            "",
            "What each changes:",
            "",
            *variant_lines(results),
            "",
        ]
    text += [
        f"Cost model (lego-serve's prediction of each request's service time alone against the service time "
        f"it measured, slot to answer, the median of {error['repeats']} runs of each of {error['requests']} requests "
        f"one at a time): median absolute error **{error['median_abs']:.1%}** (median signed "
        f"{error['median_signed']:+.1%}); against one run's time: {error['median_abs_single_run']:.1%}, as one "
        f"run differs from the median of its repeats by {error['median_jitter']:.1%} (median); against the latency "
        f"the client saw (HTTP included): {error['median_abs_vs_latency']:.1%} "
        f"({error['median_signed_vs_latency']:+.1%})"
        + (
            f"; times the pace at the request's start (what admission plans with): {error['median_abs_paced']:.1%} "
            f"({error['median_signed_paced']:+.1%})."
            if "median_abs_paced" in error
            else "."
        ),
        "",
    ]
    if data["ladder"]:
        images = data.get("ladder_images")
        text += [
            f"Settings ({data['ladder_file']}, benchmarks/ladder.py, {images} images each). FID served: of "
            "those images, one set in which each setting has its share of the requests answered; as asked: the same "
            "for the settings those requests asked for; class accuracy served: the settings' accuracies so weighted:",
            "",
            markdown_table(
                [{**r, "rung": "-" if r.get("rung") is None else str(r["rung"])} for r in data["ladder"]],
                [
                    ("rung", "rung", "s"),
                    ("setting", "setting", "s"),
                    ("fid", "FID", ".2f"),
                    ("class_accuracy", "class acc.", ".3f"),
                    ("brick_flops_vs_reference", "brick FLOPs / Heun 50", ".4f"),
                ],
            ),  # fmt: skip
            "",
        ]
    return "\n".join(text)


def rescore_run(data: dict, out: str, ladder_json: str) -> None:
    """Score a run's served and asked settings again with the ladder at ladder_json, rewrite OUT.*."""
    ladder = LadderResults(Path(ladder_json))
    asked = data["asked_settings"]
    missing = ladder.missing(asked)
    if missing:
        options = {s: options_from_record(data["asked_options"][s]) for s in missing}
        raise click.ClickException(ladder.missing_message(options, "asked for"))
    for row in data["rows"]:
        score(row, asked, ladder)
    attach_ladder(data, ladder)
    data["rescored"] = f"python benchmarks/serve_load.py --rescore --ladder {ladder_json} --out {out}"
    save_results(out, data, report(data), lambda path: plot(data, path))
    check_scored(data, ladder)


def attach_ladder(data: dict, ladder: LadderResults | None) -> None:
    data["ladder"] = ladder.rows if ladder else []
    data["ladder_file"] = str(ladder.path) if ladder else None
    data["ladder_images"] = int(ladder.images.features.shape[1]) if ladder else None


def check_scored(data: dict, ladder: LadderResults | None) -> None:
    """A one-line failure naming the settings served that the ladder has no row for, if any."""
    unscored = sorted({s for r in data["rows"] for s in r.get("unscored", [])})
    if ladder is None or not unscored:
        return
    options = {s: options_from_record(next(r["served_options"][s] for r in data["rows"] if s in r["served_options"]))
               for s in unscored}  # fmt: skip
    then = f"--rescore --out {data['out']}" if data.get("out") else "this run again with --out PREFIX"
    raise click.ClickException(f"{ladder.missing_message(options, 'served')}; then {then}")


@click.command()
@click.option("--engines", default="engines", show_default=True)
@click.option("--backend", default="onnxruntime", show_default=True)
@click.option("--threads", default=0, show_default=True)
@click.option("--requests", "n", default=120, show_default=True, help="Requests per load.")
@click.option("--slo", default=5.0, show_default=True, help="Deadline: this many times the request's time alone.")
@click.option(
    "--loads", default="0.5,1,1.5,2,3", show_default=True, callback=positive_loads, help="Offered loads, x C_FIFO."
)
@click.option(
    "--mix", type=click.Choice(MIXES), default="both", show_default=True,
    help="Requests take the recommended setting, name their own steps (Heun 12 or 18), or half each.",
)  # fmt: skip
@click.option("--ladder", "ladder_json", default="benchmarks/results/ladder.json", show_default=True,
              help="ladder.py's OUT.json for these engines: the FID of what was served (none if missing).")  # fmt: skip
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(1), help="Blocks per load (see above).")
@click.option("--probes", default=6, show_default=True, type=click.IntRange(1), help="Bisection steps for C_FIFO.")
@click.option(
    "--cost-requests", default=40, show_default=True, type=click.IntRange(1),
    help=f"The first this many requests check the cost model (each alone: on the baseline, then {REPEATS}x on "
    "lego-serve).",
)  # fmt: skip
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
@click.option(
    "--variant", "variants", multiple=True, callback=parse_variants, metavar="NAME=OPTIONS",
    help="Also load, elastic, a lego-serve started with these extra options (e.g. 'streams-2=--streams 2'). "
    "Repeatable.",
)  # fmt: skip
@out_option("benchmarks/results/serve-load")
@click.option("--replot", is_flag=True, help="Only redraw OUT.png from OUT.json.")
@click.option("--rescore", is_flag=True, help="Only score OUT.json's served settings again with --ladder.")
@click.option("--servers", default="baseline,exact,elastic", show_default=True, help="Which servers to load.")
@one_line_errors
def main(
    engines, backend, threads, n, slo, loads, mix, ladder_json, rounds, probes, cost_requests, seed, small, max_active,
    streams, given_c_fifo, variants, out, replot, rescore, servers,
):  # fmt: skip
    """C_FIFO, then each server at multiples of it: deadline attainment, refusals, rungs, quality."""
    if replot or rescore:
        flag = "--replot redraws PREFIX.png" if replot else "--rescore scores PREFIX.json again"
        if out is None:
            raise click.UsageError(f"{flag} from PREFIX.json: give --out PREFIX")
        try:
            data = json.loads(Path(out + ".json").read_text())
        except (OSError, ValueError) as e:
            raise click.ClickException(f"{flag.split()[0]} needs {out}.json as this script wrote it: {e}") from None
        if rescore:
            rescore_run(data, out, ladder_json)
        else:
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
    check_variant_options(variants, engines)
    canvases = SMALL_CANVASES if small else CANVASES
    bodies = workload(n, seed, manifest.model.num_classes, canvases, mix)
    asked = asked_options(bodies, manifest)
    asked_settings = [o.describe() for o in asked]
    serving = serving_ladder(manifest)
    is_top = [o == serving.rungs[0] for o in asked]  # rung 0 as asked: what a request with no options gets
    ladder = LadderResults(Path(ladder_json)) if Path(ladder_json).exists() else None
    if ladder is not None:
        if ladder.checkpoint and ladder.checkpoint != manifest.source.get("sha256"):
            raise click.ClickException(f"{ladder_json} measured another checkpoint than {engines}'s: rerun ladder.py")
        needed = {o.describe(): o for o in [*serving.rungs, *asked]}
        missing = ladder.missing(needed)
        if missing:
            what = "the serving ladder's rungs and the settings asked for"
            raise click.ClickException(ladder.missing_message({s: needed[s] for s in missing}, what))
    lego_options = ["--max-queue", str(4 * n), "--drain-timeout", "5"]
    lego_options += ["--max-active", str(max_active)] if max_active else []
    lego_options += ["--streams", str(streams)]

    # 1. Service time alone of every request: one at a time on the baseline.
    started: list[Server] = []
    try:
        base = Server(BASELINE, engines, backend, threads, [])
        started.append(base)
        print("service times alone (baseline, one at a time) ...", flush=True)
        alone_each = []
        for body in bodies:
            start = time.perf_counter()
            answered(base.http.post("/v1/images", json=body, timeout=600))
            alone_each.append(time.perf_counter() - start)
        # Each request is due slo x the median time alone of its kind: one noisy measurement must not
        # make a request's deadline tighter than its kind's.
        kinds: dict[tuple, list[float]] = {}
        for body, t in zip(bodies, alone_each, strict=True):
            kinds.setdefault(kind(body), []).append(t)
        for body in bodies:
            body["deadline_s"] = round(slo * float(np.median(kinds[kind(body)])), 4)
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
            sent = [bodies[j] if quality == "-" else {**bodies[j], "quality": quality} for j in block]
            return send(server, sent, arrivals)

        # lego-serve (and each variant) starts before the probes and waits idle through them, as each
        # server waits through the others' blocks in the loads: the probes meet the machine the loads meet.
        lego = Server(LEGO, engines, backend, threads, lego_options)
        started.append(lego)
        others = {}
        for name, options in variants.items():
            others[name] = Server(LEGO, engines, backend, threads, [*lego_options, *shlex.split(options)])
            started.append(others[name])
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
        for body in bodies[:cost_requests]:
            start = time.perf_counter()
            answered(base.http.post("/v1/images", json=body, timeout=600))
            base_alone_each.setdefault(body["resolution"], []).append(time.perf_counter() - start)
            services, latencies = [], []
            for _ in range(REPEATS):
                start = time.perf_counter()
                r = answered(lego.http.post("/v1/images", json={**body, "quality": "exact", "deadline_s": None},
                                            timeout=600))  # fmt: skip
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

        # 4. Each load in blocks, each block to every chosen server and variant in turn.
        runs = [(base, BASELINE, "-", None)] if "baseline" in chosen else []
        runs += [(lego, LEGO, q, None) for q in ("exact", "elastic") if q in chosen]
        runs += [(server, LEGO, "elastic", name) for name, server in others.items()]
        results = []
        for f in loads:
            answers: dict[int, list] = {i: [None] * n for i in range(len(runs))}
            for b, block in enumerate(blocks):
                for k in range(len(runs)):
                    i = (b + k) % len(runs)  # rotate who goes first
                    server, _, quality, _ = runs[i]
                    for j, answer in zip(block, offer(server, block, f * c_fifo, quality), strict=True):
                        answers[i][j] = answer
            for i, (_, name, quality, variant) in enumerate(runs):
                row = summarize(answers[i], bodies, asked, is_top, serving.tuned, alone)
                row["served_options"] = {
                    s: options_from_record(a["run"]["options"]).to_dict() if a["run"] else o.to_dict()
                    for a, o, s in zip(answers[i], asked, row["requests"]["setting"], strict=True) if s is not None
                }  # fmt: skip
                if name == LEGO and "baseline" in chosen:
                    row["p99_ratio_interval"] = p99_ratio_intervals(answers[i], answers[0], bodies, canvases)
                label: dict[str, str] = {"variant": variant, "variant_options": variants[variant]} if variant else {}
                results.append({"server": name, "quality": quality, "load": f, **label, **row})
                print(
                    f"  {variant or name} {quality} at {f}x: {row['within_deadline']:.1%}, refused "
                    f"{row['refused']:.1%}, expired {row['expired']:.1%} {row['expired_in']}, rungs {row['rungs']}",
                    flush=True,
                )
    finally:
        for server in reversed(started):
            server.close()

    for row in results:
        score(row, asked_settings, ladder)
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
        "command": "python benchmarks/serve_load.py " + shlex.join(sys.argv[1:]),
        "out": out,
        "machine": machine(),
        "slo_multiple": slo,
        "requests_per_load": n,
        "blocks": len(blocks),
        "mix": mix,
        "canvases": list(canvases),
        "variants": variants,
        "workload": bodies,
        "asked_settings": asked_settings,  # each request's setting as asked, in workload order
        "asked_options": {s: o.to_dict() for s, o in zip(asked_settings, asked, strict=True)},
        "ladder_tuned": serving.tuned,
        "service_time_alone_s": alone,
        "time_alone_side_by_side_s": {"baseline": base_alone, LEGO: lego_alone},  # the cost model's requests, in turn
        "capacity_alone_requests_per_s": capacity,
        "c_fifo_requests_per_s": c_fifo,
        "c_fifo_probes": probes_run,
        "cost_model_error": error,
        "rows": results,
    }
    attach_ladder(data, ladder)
    save_results(out, data, report(data), lambda path: plot(data, path))
    failed = sum(r["other_errors"] for r in results)
    if failed:
        raise click.ClickException(f"{failed} requests failed (neither answered, refused nor expired): see the rows")
    check_scored(data, ladder)


if __name__ == "__main__":
    main()
