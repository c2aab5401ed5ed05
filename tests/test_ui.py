"""The playground page of lego-serve in a real browser: headless Chromium (the system's, driven by
Playwright) against a live lego-serve on the tiny engines. The page shows the brick plan the API
gives, runs a job with live progress and shows its grid and run record, cancels a long job, shows
refusals in the API's own words, fits a phone's width, and asks no other host for anything. The
plan endpoint, GET /v1/model and --no-ui are checked over plain HTTP. Servers listen on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="lego-serve needs FastAPI: pip install '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the HTTP tests need httpx: pip install '.[dev]'")

from lego_export.config import get_preset  # noqa: E402
from lego_export.flops import model_brick_flops  # noqa: E402
from lego_export.manifest import Manifest, Recommended  # noqa: E402
from lego_export.options import SamplingOptions  # noqa: E402
from lego_export.plan import flop_fraction_saved, plan  # noqa: E402
from lego_export.serve.ui import PAGES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny-engines"  # pg-tiny: 16 x 16, 10 classes, bricks 4 / 8 / 16
NAMES = ["tee", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
RECOMMENDED = {"sampler": "dpm2m", "steps": 6, "skip_policy": "2@0.5:", "reuse_residual": True}
RUNG = {"sampler": "dpm2m", "steps": 4, "skip_policy": "2@1:", "reuse_residual": True, "measured": {"fid": 11.0}}
HAS_POINTS = "points" in Recommended.__dataclass_fields__  # named points (fast, balanced, best) in the manifest
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGE_S = 20.0  # deadline for the page to reach a state that needs no sampling
RUN_S = 60.0  # deadline for a job to end


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    """The tiny engines with class names, a recommended setting (guided over part of the trajectory,
    the last brick skipped at low noise), one rung below it and, where manifests have them, a named point."""
    folder = tmp_path_factory.mktemp("ui") / "engines"
    shutil.copytree(TINY, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["class_names"] = NAMES
    manifest["recommended"] = {**RECOMMENDED, "guidance": 1.5, "guidance_interval": "0.3:2.4",
                               "checkpoint_sha256": "a" * 64, "measured": {"fid": 9.0}, "ladder": [RUNG]}  # fmt: skip
    if HAS_POINTS:
        manifest["recommended"]["points"] = {"fast": RUNG}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    Manifest.read(folder)  # the fixture is a valid manifest
    return folder


@contextlib.contextmanager
def lego_serve(engines: Path, *flags: str) -> Iterator[str]:
    """A live lego-serve process on 127.0.0.1 (a free port); its base URL once /healthz answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "lego_export.serve.cli", "--engines", str(engines), "--port", str(port)]
    cmd += ["--backend", "onnxruntime", "--threads", "1", "--no-calibrate", "--log-level", "warning"]
    cmd += ["--drain-timeout", "1", *flags]  # a test's server stops at once, whatever still runs
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a server that logs much never blocks on it
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2, trust_env=False).status_code == 200
        except httpx.TransportError:
            if server.poll() is not None:
                log.seek(0)
                raise AssertionError(f"lego-serve exited: {log.read()}") from None
            return False

    try:
        wait_for(up, 30, "lego-serve to start")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def server(engines) -> Iterator[str]:
    with lego_serve(engines) as url:
        yield url


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30, trust_env=False) as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the dev extra)")
    if CHROMIUM is None:
        pytest.skip("the browser tests need Chromium: apt-get install chromium")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@dataclass
class Visit:
    """The page open in a fresh browser context, and every request that context made."""

    page: object
    base: str
    requests: list[str] = field(default_factory=list)

    def only_this_host(self) -> None:
        """Every request the page made went to the server it came from (a blob: URL is the page's own)."""
        origin = urlsplit(self.base)
        for url in self.requests:
            parts = urlsplit(url[len("blob:") :] if url.startswith("blob:") else url)
            assert (parts.scheme, parts.netloc) == (origin.scheme, origin.netloc), f"the page asked {url}"
        assert any("/v1/" in url for url in self.requests), self.requests  # the recorder saw the API calls


@contextlib.contextmanager
def open_page(browser, server: str, width: int = 1280, height: int = 900) -> Iterator[Visit]:
    """The page at this viewport in a fresh browser context that records every request, once it is ready."""
    context = browser.new_context(viewport={"width": width, "height": height})
    visit = Visit(None, server)
    context.on("request", lambda request: visit.requests.append(request.url))
    try:
        visit.page = context.new_page()
        visit.page.set_default_timeout(PAGE_S * 1000)
        answer = visit.page.goto(f"{server}/")
        assert answer.status == 200 and "default-src 'none'" in answer.headers["content-security-policy"]
        visit.page.wait_for_selector("body[data-ready=true]")
        yield visit
    finally:
        context.close()


@pytest.fixture
def visit(browser, server) -> Iterator[Visit]:
    with open_page(browser, server) as opened:
        yield opened


@pytest.fixture
def phone(browser, server) -> Iterator[Visit]:
    with open_page(browser, server, width=390, height=844) as opened:
        yield opened


def wait_for_plan(page, plan: dict) -> None:
    """The page shows this plan: its summary, and a table cell per brick and step as the plan says."""
    page.wait_for_function(
        "([runs, full]) => document.getElementById('plan-summary').textContent"
        ".includes(`brick runs ${runs} of ${full}`)",
        arg=[plan["brick_runs"], plan["brick_runs_full"]],
    )
    table = page.locator("#plan-table")
    assert table.locator("thead th").count() == len(plan["steps"]) + 1
    assert table.locator("td.run").count() == plan["brick_runs"]
    assert table.locator("td.skip").count() == plan["brick_runs_full"] - plan["brick_runs"]
    assert table.locator("td.guided:not(:empty)").count() == plan["guided_steps"]
    assert plan["saving"] in page.locator("#plan-summary").inner_text()


def events_seen(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#events li", "items => items.map(li => ({status: li.dataset.status, done: li.dataset.stepsDone}))"
    )


def shown_pixels(page) -> np.ndarray:
    """The grid image as the page shows it, at its own size: its pixels drawn on a canvas."""
    width, height, rgba = page.evaluate(
        """() => {
            const img = document.getElementById('grid');
            const canvas = document.createElement('canvas');
            [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
            const context = canvas.getContext('2d');
            context.drawImage(img, 0, 0);
            const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
            return [canvas.width, canvas.height, Array.from(pixels)];
        }"""
    )
    return np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[..., :3]


def png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_the_page_shows_the_plan_runs_a_job_live_and_shows_its_grid_and_run_record(visit, http):
    page = visit.page
    page.get_by_label("Class", exact=True).select_option("sneaker")
    page.get_by_label("Images", exact=True).fill("4")
    page.get_by_role("button", name="Canvas 16 by 48 (wide)").click()
    page.get_by_label("Seed", exact=True).fill("7")
    # With no steps given, the model's recommended setting: the last brick off at low noise, guided in part.
    asked = {"class": "sneaker", "num": 4, "seed": 7, "resolution": "16x48", "quality": "elastic"}
    recommended = http.post("/v1/plan", json=asked).json()
    assert recommended["recommended"] and recommended["brick_runs"] < recommended["brick_runs_full"]
    assert 0 < recommended["guided_steps"] < len(recommended["steps"])
    wait_for_plan(page, recommended)

    page.get_by_label("Steps", exact=True).fill("30")
    page.get_by_label("Quality", exact=True).select_option("exact")
    asked.update(steps=30, quality="exact")
    full_chain = http.post("/v1/plan", json=asked).json()
    assert full_chain["brick_runs"] == full_chain["brick_runs_full"] == 30 * 3
    wait_for_plan(page, full_chain)

    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#status[data-status=done]", timeout=RUN_S * 1000)
    events = events_seen(page)
    running = [int(e["done"]) for e in events if e["status"] == "running"]
    assert events[0]["status"] in ("queued", "running") and events[-1]["status"] == "done", events
    assert len(set(running)) >= 2 and running == sorted(running), events  # progress arrived step by step
    page.wait_for_selector("#result:not([hidden])")

    # The grid shown is the server's answer to the same request.
    shown = shown_pixels(page)
    answer = http.post("/v1/images", json=asked)
    assert answer.status_code == 200, answer.text
    assert shown.shape == (2 + 16 + 2, 2 + 4 * (48 + 2), 3)  # one row of four 16 x 48 images, 2 px apart
    np.testing.assert_array_equal(shown, png_pixels(answer.content))

    record = page.locator("#record").inner_text()
    run = json.loads(answer.headers["x-lego-run"])
    canvas = "16\u00d748, 4 images, seed 7"
    for words in ("heun 30 steps", "none: the request's own options", "exact", run["backend"], canvas):
        assert words in record, (words, record)
    assert "seconds" in record and "sampling" in record
    visit.only_this_host()


def test_a_long_job_is_cancelled_from_the_page_and_frees_its_slot(visit, http):
    page = visit.page
    page.get_by_label("Images", exact=True).fill("8")
    page.get_by_role("button", name="Canvas 32 by 32 (large)").click()
    page.get_by_label("Steps", exact=True).fill("1000")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#events li')]"
        ".some(li => li.dataset.status === 'running' && +li.dataset.stepsDone > 0)",
        timeout=RUN_S * 1000,
    )
    job = page.locator("#job-section").get_attribute("data-job")
    assert http.get(f"/v1/jobs/{job}").json()["status"] == "running"
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_selector("#status[data-status=cancelled]")
    assert "cancelled by the client" in page.locator("#status").inner_text()
    assert http.get(f"/v1/jobs/{job}").json()["status"] == "cancelled"
    wait_for(lambda: http.get("/healthz").json()["in_flight"] == 0, PAGE_S, "the cancelled job's slot")
    assert page.get_by_role("button", name="Generate").is_enabled()
    assert page.locator("#result").is_hidden()
    visit.only_this_host()


@pytest.mark.parametrize(
    "label, value, body, status",
    [
        ("Steps", "0", {"steps": 0}, 400),
        ("Guidance (cfg)", "500", {"cfg": 500}, 400),
        ("Images", "65", {"num": 65}, 413),  # over the server's --max-images
    ],
)
def test_refused_values_show_the_apis_own_words(visit, http, label, value, body, status):
    page = visit.page
    page.get_by_label(label, exact=True).fill(value)
    answer = http.post("/v1/images", json=body)
    words = answer.json()["error"]
    assert answer.status_code == status and words
    # The plan says it before anything runs, and so does a try to generate.
    plan_error = page.locator("#plan-error")
    plan_error.wait_for(state="visible")
    page.wait_for_function(
        "w => document.querySelector('#plan-error .words')?.textContent === w", arg=words
    )
    assert plan_error.inner_text().startswith(f"HTTP {status}")
    page.get_by_role("button", name="Generate").click()
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert error.locator(".words").inner_text() == words
    assert error.inner_text().startswith(f"HTTP {status}")
    assert http.get("/healthz").json()["in_flight"] == 0
    visit.only_this_host()


def test_queue_position_a_full_queue_and_a_passed_deadline_on_the_page(browser, engines):
    """With one slot and one place in the queue: the page's job waits and says so, and is cancelled
    while it waits; with the queue full, the 429 (and its Retry-After) in the API's words; a job whose
    deadline (the server's --slo) passed while it sampled, the 504 in the API's words."""
    long = {"steps": 1000, "num": 8, "resolution": "32x32", "async": True}
    flags = ("--slo", "5s", "--max-active", "1", "--max-queue", "1")
    with lego_serve(engines, *flags) as url, httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        with open_page(browser, url) as visit:
            page = visit.page
            first = http.post("/v1/images", json=long).json()
            assert first["status"] == "running"
            page.get_by_role("button", name="Generate").click()
            page.wait_for_selector("#status[data-status=queued]")
            assert "next to run" in page.locator("#status").inner_text()
            assert page.locator("#events li").first.text_content().startswith("queued (position 1)")
            refused = http.post("/v1/images", json={})  # the slot taken, the queue full
            assert refused.status_code == 429
            page.get_by_role("button", name="Cancel").click()
            page.wait_for_selector("#status[data-status=cancelled]")
            assert http.get("/healthz").json()["queued"] == 0

            waiting = http.post("/v1/images", json=long)
            assert waiting.json()["status"] == "queued"
            page.get_by_role("button", name="Generate").click()
            error = page.locator("#error")
            error.wait_for(state="visible")
            assert error.locator(".words").inner_text() == refused.json()["error"]
            assert error.inner_text().startswith("HTTP 429")
            assert f"retry after {refused.headers['retry-after']} s" in error.inner_text()
            for job in (waiting.json()["id"], first["id"]):
                assert http.delete(f"/v1/jobs/{job}").json()["status"] == "cancelled"
            wait_for(lambda: http.get("/healthz").json()["in_flight"] == 0, PAGE_S, "the slot to be freed")

            page.get_by_label("Images", exact=True).fill("8")
            page.get_by_role("button", name="Canvas 32 by 32 (large)").click()
            page.get_by_label("Steps", exact=True).fill("1000")
            page.get_by_role("button", name="Generate").click()
            page.wait_for_selector("#status[data-status=expired]", timeout=RUN_S * 1000)
            job = page.locator("#job-section").get_attribute("data-job")
            expired = http.get(f"/v1/jobs/{job}/result")
            assert expired.status_code == 504 and "deadline passed" in expired.json()["error"]
            page.wait_for_function(
                "w => document.querySelector('#error .words')?.textContent === w", arg=expired.json()["error"]
            )
            assert error.inner_text().startswith("HTTP 504")
            visit.only_this_host()


def test_the_page_fits_a_phone_labels_every_control_and_lists_the_ladder(phone, http):
    page = phone.page
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{overflow} px wider than a phone"
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('input, select, button')]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
            .map(el => el.outerHTML)"""
    )
    assert unnamed == []
    model = http.get("/v1/model").json()
    qualities = page.eval_on_selector_all("#quality option", "options => options.map(o => o.value)")
    expected = ["elastic", "exact", *map(str, range(len(model["ladder"]))), *model["points"]]
    assert qualities == expected and len(model["ladder"]) == 2
    assert ("fast" in qualities) == HAS_POINTS
    classes = page.eval_on_selector_all("#class option", "options => options.map(o => o.textContent)")
    assert classes == ["every class in turn", *NAMES]
    phone.only_this_host()


# ---- over plain HTTP -------------------------------------------------------------------------------

REFUSED = [
    {"steps": 0},
    {"num": 65},
    {"class": "unicorn"},
    {"resolution": "16x20"},
    {"resolution": "512x512"},
    {"cfg": 500},
    {"quality": 5},
    {"sampler": "dpm2m", "churn": 1},
    {"t_break": 0.5},
    {"bogus": 1},
    {"async": True, "stream": True},
    [1],
]


@pytest.mark.parametrize("body", REFUSED, ids=lambda b: json.dumps(b)[:40])
def test_the_plan_endpoint_refuses_exactly_what_generation_refuses(http, body):
    generation, planned = (http.post(path, json=body) for path in ("/v1/images", "/v1/plan"))
    assert generation.status_code in (400, 413), generation.text
    assert (planned.status_code, planned.json()) == (generation.status_code, generation.json())


def test_the_plan_endpoint_refuses_bodies_as_generation_does(http):
    for raw in (b"{", b"\x00" * (64 * 1024 + 1), b'{"cfg": NaN}'):
        generation, planned = (http.post(path, content=raw) for path in ("/v1/images", "/v1/plan"))
        assert generation.status_code in (400, 413)
        assert (planned.status_code, planned.json()) == (generation.status_code, generation.json())


def test_the_plan_endpoint_gives_the_brick_plan_and_its_savings(http):
    model = get_preset("pg-tiny")
    flops = model_brick_flops(model)
    full = http.post("/v1/plan", json={"steps": 10}).json()
    assert full["brick_runs"] == full["brick_runs_full"] == 30 and full["flops_saved"] == 0 == full["guided_steps"]

    # The last brick off for the last half of the trajectory: brick2's FLOPs saved at those steps.
    late = http.post("/v1/plan", json={"steps": 10, "skip": "late", "t_break": 0.5}).json()
    expected = plan(SamplingOptions(steps=10, skip="late", t_break=0.5), model, (16, 16))
    off = sum(p.bricks < 3 for p in expected)
    assert 0 < off < 10 and [s["runs"] for s in late["steps"]] == [list(range(p.bricks)) for p in expected]
    assert late["brick_runs"] == 30 - off
    assert late["flops_saved"] == pytest.approx(off * flops[2] / (10 * sum(flops)), abs=1e-6)
    assert late["flops_saved"] == pytest.approx(flop_fraction_saved(expected, flops), abs=1e-6)

    # Guidance at every step runs every brick twice: twice the work of the unguided full chain.
    guided = http.post("/v1/plan", json={"steps": 10, "cfg": 2}).json()
    assert guided["guided_steps"] == 10 and guided["flops_saved"] == pytest.approx(-1.0)
    assert all(s["halves"] == 2 for s in guided["steps"])

    # The seed moves the tile grid of a wide canvas, as sampling does; the canvas and count are echoed.
    wide = http.post("/v1/plan", json={"steps": 4, "resolution": "16x48", "num": 3, "seed": 5}).json()
    assert wide["canvas"] == [16, 48] and wide["images"] == 3 and len(wide["steps"]) == 4

    # The model's recommended setting when no trajectory field is given, as for generation.
    default = http.post("/v1/plan", json={}).json()
    assert default["recommended"] and default["options"]["steps"] == RECOMMENDED["steps"]
    assert default["options"]["skip"] == RECOMMENDED["skip_policy"]
    assert default["brick_runs"] < default["brick_runs_full"]


def test_the_model_endpoint_lists_classes_canvas_limits_and_the_ladder(http):
    model = http.get("/v1/model").json()
    assert model["class_names"] == NAMES and model["num_classes"] == 10
    assert model["resolution"] == [16, 16] and model["canvas_multiple"] == 16 and model["bricks"] == [4, 8, 16]
    assert model["limits"] == {"max_resolution": 256, "max_steps": 1000, "max_images": 64}
    assert [r["options"]["steps"] for r in model["ladder"]] == [RECOMMENDED["steps"], RUNG["steps"]]
    assert model["recommended"] == model["ladder"][0] and model["ladder"][1]["measured"] == {"fid": 11.0}
    assert set(model["points"]) == ({"fast"} if HAS_POINTS else set())


def test_no_ui_turns_the_page_off_and_keeps_the_api(engines, http):
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    with lego_serve(engines, "--no-ui") as url, httpx.Client(base_url=url, timeout=30, trust_env=False) as off:
        for path in PAGES:
            answer = off.get(path)
            assert answer.status_code == 404 and "error" in answer.json(), path
        assert off.get("/v1/model").status_code == 200
        assert off.post("/v1/plan", json={"steps": 3}).status_code == 200


def test_the_page_is_package_data():
    """pip install . ships every file the page serves (setuptools' package-data), and only those."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "lego_export.serve.ui" in setuptools["packages"]
    globs = setuptools["package-data"]["lego_export.serve.ui"]
    folder = ROOT / "lego_export" / "serve" / "ui"
    shipped = {p.name for g in globs for p in folder.glob(g)}
    assert shipped == {name for name, _ in PAGES.values()}


def test_ray_serve_replicas_take_the_ui_option(engines):
    from lego_export.errors import LegoError
    from lego_export.serve.ray_app import RayOptions

    assert RayOptions.from_args({"engines": str(engines)}).serve.ui is True
    assert RayOptions.from_args({"engines": str(engines), "ui": "false"}).serve.ui is False
    with pytest.raises(LegoError, match="ui must be true or false"):
        RayOptions.from_args({"engines": str(engines), "ui": "maybe"})
