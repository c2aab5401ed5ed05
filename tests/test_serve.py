"""lego-serve: merged engine calls give every request its offline images; the HTTP API refuses bad
input with one-line JSON errors, bounds its queue, frees slots on cancel and disconnect, isolates
engine failures, shuts down without hanging and exits 0 after a graceful shutdown; the load benchmark
runs end to end. Servers listen on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="lego-serve needs FastAPI: pip install '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="lego-serve needs uvicorn: pip install '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the HTTP tests need httpx: pip install '.[dev]'")

from click.testing import CliRunner  # noqa: E402

from lego_export.arrays import NumpyArrays  # noqa: E402
from lego_export.edm import Churn  # noqa: E402
from lego_export.errors import LegoError  # noqa: E402
from lego_export.manifest import Manifest  # noqa: E402
from lego_export.runtime.backends import Backend, make_backend  # noqa: E402
from lego_export.runtime.pipeline import LegoPipeline  # noqa: E402
from lego_export.runtime.runner import balanced_chunks  # noqa: E402
from lego_export.serve.app import create_app  # noqa: E402
from lego_export.serve.batcher import CallBatcher  # noqa: E402
from lego_export.serve.cli import main as lego_serve  # noqa: E402
from lego_export.serve.config import ServeConfig  # noqa: E402
from lego_export.serve.cost import CostModel, EngineCost, best_chunk  # noqa: E402
from lego_export.serve.service import ImageService  # noqa: E402
from lego_export.serve.validation import RequestError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny-engines"  # pg-tiny: 16 x 16, 10 classes, bricks 4 / 8 / 16


class HookedBackend(Backend):
    """The real ONNX Runtime backend with a hook before every engine call (a test double: it may
    count, sleep, wait or raise)."""

    name = "onnxruntime+hook"

    def __init__(self, hook=None, engines: Path = TINY):
        self.manifest = Manifest.read(engines)
        self.real = make_backend("onnxruntime", engines, self.manifest)
        self.arrays = self.real.arrays
        self.hook = hook or (lambda engine, feeds: None)
        self.calls: list[tuple[str, int]] = []  # (engine, rows) per real call

    def runner(self, spec):
        return _HookedRunner(self, self.real.runner(spec), spec.name)


class _HookedRunner:
    def __init__(self, backend: HookedBackend, runner, engine: str):
        self.backend, self.runner, self.engine = backend, runner, engine

    def infer(self, feeds: dict) -> dict:
        self.backend.calls.append((self.engine, len(next(iter(feeds.values())))))
        self.backend.hook(self.engine, feeds)
        return self.runner.infer(feeds)


def merging(service: ImageService) -> ImageService:
    """The service with a cost model in which a call costs the same whatever its rows (a GPU with
    room to spare): the batcher then merges the calls of requests for the same engine."""
    costs = {name: EngineCost({1: 0.01, n: 0.01 / n}, n) for name, n in service.batcher.chunks.items()}
    service.prices.model = CostModel(costs)
    return service


def make_service(hook=None, engines: Path = TINY, **config) -> tuple[ImageService, HookedBackend]:
    backend = HookedBackend(hook, engines)
    config.setdefault("calibrate", False)  # hooks count, slow down or hold calls: no timing runs here
    service = ImageService(ServeConfig(engines=str(engines), **config), backend=backend, manifest=backend.manifest)
    return service, backend


@pytest.fixture(scope="module")
def roomy_engines(tmp_path_factory) -> Path:
    """pg-tiny engines that take up to 64 images per call (the shipped model's range), so that calls
    have room for several requests; the committed fixture takes 8."""
    from lego_export.checkpoint import save_checkpoint
    from lego_export.config import get_preset
    from lego_export.export.build import BuildOptions, build
    from lego_export.model import LegoModel

    torch = pytest.importorskip("torch", reason="building test engines needs torch")
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    save_checkpoint(root / "pg-tiny.safetensors", LegoModel(get_preset("pg-tiny")))
    build(BuildOptions(ckpt=str(root / "pg-tiny.safetensors"), out=str(root / "engines"), max_batch=64, opt_batch=16))
    return root / "engines"


@contextlib.contextmanager
def running(service: ImageService):
    """uvicorn serving the app on 127.0.0.1 (a free port) in a thread; stopped and drained on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(service), log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(15)
        service.close(5)
        sock.close()


def offline(body: dict, engines: Path = TINY, backend: str = "onnxruntime") -> np.ndarray:
    """What LegoPipeline (lego-run's code) gives for the same options, at lego-run's default batch, on
    the backend the test's server uses (HookedBackend's, unless a test says otherwise)."""
    pipe = LegoPipeline.from_engines(engines, backend)
    h, w = (int(v) for v in body.get("resolution", "16x16").split("x"))
    churn = body.get("churn")
    if isinstance(churn, dict):
        churn = Churn(churn["s_churn"], churn.get("s_min", 0.0), churn.get("s_max", float("inf")), churn["s_noise"])
    elif churn:
        churn = Churn(churn)
    classes = [body["class"]] if "class" in body else body.get("classes")
    fields = dict(steps=body["steps"], sampler=body.get("sampler", "heun"), skip=body.get("skip", "none"))
    fields.update(t_break=body.get("t_break"), guidance=body.get("cfg", 1.0), tile_shift=body.get("tile_shift"))
    fields.update(guidance_interval=body.get("cfg_interval"))
    fields.update(churn=churn, reuse_residual=body.get("reuse_residual", False))
    kwargs = dict(num=body.get("num", 1), resolution=(h, w), classes=classes, seed=body.get("seed", 0))
    return pipe(**kwargs, **fields).images


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


TERMINAL = ("done", "failed", "cancelled", "expired")


def finished(http, job_id: str, timeout: float = 60.0):
    """GET a job's status until it has ended; then its result (the image, or its error)."""
    deadline = time.monotonic() + timeout
    while True:
        r = http.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
        if r.json()["status"] in TERMINAL:
            return http.get(f"/v1/jobs/{job_id}/result")
        assert time.monotonic() < deadline, f"job {job_id} still {r.json()['status']}"
        time.sleep(0.02)


def one_line_error(response) -> str:
    """The body is one line of JSON with exactly an error message."""
    assert "\n" not in response.text.strip(), response.text
    data = response.json()
    assert set(data) >= {"error"} and isinstance(data["error"], str) and data["error"], data
    return data["error"]


def npz_images(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content))["images"]


MIXED = [
    {"num": 3, "steps": 6, "seed": 1},
    {
        "num": 2,
        "steps": 9,
        "sampler": "euler",
        "resolution": "16x32",
        "seed": 2,
        "skip": "late",
        "cfg": 2.0,
        "class": 3,
    },
    {
        "num": 1,
        "steps": 5,
        "resolution": "32x32",
        "seed": 3,
        "skip": "1@0.5:",
        "churn": {"s_churn": 10, "s_noise": 1.003},
    },
    {"num": 4, "steps": 7, "seed": 4, "cfg": 1.5, "classes": [1, 2], "skip": "late", "t_break": 0.5},
    {"num": 2, "steps": 12, "sampler": "euler", "resolution": "32x32", "seed": 5, "churn": 5},
    {"num": 5, "steps": 4, "resolution": "16x32", "seed": 6, "tile_shift": False, "class": 9},
    {"num": 2, "steps": 8, "resolution": "32x32", "seed": 7, "skip": "2@:5,1@0.1:", "cfg": 3.0},
    {"num": 2, "steps": 6, "sampler": "dpm2m", "seed": 9, "cfg": 2.0, "cfg_interval": "1:20", "class": 4},
    {"num": 2, "steps": 6, "sampler": "dpm2m", "seed": 8, "skip": "late", "t_break": 0.5, "reuse_residual": True},
]


def test_every_request_gets_its_offline_images_whatever_else_is_in_flight(roomy_engines):
    # A slower engine keeps the requests overlapping, so ticks mix steps, canvases, plans and guidance.
    service, backend = make_service(lambda engine, feeds: time.sleep(0.01), roomy_engines)
    merging(service)
    results: dict[int, np.ndarray] = {}

    def client(i: int, body: dict, http) -> None:
        time.sleep(0.02 * i)  # staggered arrivals: requests join while others are mid-sampling
        results[i] = npz_images(http.post("/v1/images", json={**body, "format": "npz"}))

    with running(service) as http:
        threads = [threading.Thread(target=client, args=(i, b, http)) for i, b in enumerate(MIXED)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(results) == len(MIXED)
    for i, body in enumerate(MIXED):
        expected = offline(body, roomy_engines)
        assert results[i].shape == expected.shape
        np.testing.assert_allclose(results[i], expected, atol=1e-5, rtol=0, err_msg=f"request {i}: {body}")
    # Merged: each request submits one call per engine per evaluation; far fewer calls ran.
    stats = service.batcher.stats.engines
    submitted = sum(e.group_requests for e in stats.values())
    assert len(backend.calls) < 0.6 * submitted, (len(backend.calls), submitted)
    limits = service.batcher.limits
    assert all(rows <= limits[engine] for engine, rows in backend.calls)


def test_max_batch_tiles_caps_every_engine_call():
    service, backend = make_service(max_batch_tiles=5)
    job = service.submit(service.parse({"num": 3, "steps": 3, "resolution": "32x32", "cfg": 2.0, "format": "npz"}))
    job.future.result(60)
    service.close(5)
    assert job.state == "done"
    assert max(rows for _, rows in backend.calls) == 5
    expected = offline({"num": 3, "steps": 3, "resolution": "32x32", "cfg": 2.0})
    np.testing.assert_allclose(np.load(io.BytesIO(job.body))["images"], expected, atol=1e-5, rtol=0)


def test_calls_are_cut_at_the_measured_fastest_size_in_balanced_chunks():
    assert balanced_chunks(70, 64) == [(0, 35), (35, 70)]
    assert balanced_chunks(64, 64) == [(0, 64)] and balanced_chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]

    class Curve:
        """Seconds per call a + b n + c n^2: per row, fastest at n = sqrt(a / c) = 64."""

        def infer(self, feeds):
            n = len(feeds["tiles"])
            time.sleep(4e-3 + 1e-4 * n + 1e-6 * n * n)
            return {}

    spec = Manifest.read(TINY).bricks[0]
    chunk, per_row = best_chunk(Curve(), spec, 256, NumpyArrays(), reps=1)
    assert chunk in (32, 64, 128), per_row
    assert set(per_row) == {1, 2, 4, 8, 16, 32, 64, 128, 256}


BAD = [
    (b"not json", 400),
    (b"[1, 2]", 400),
    (b'{"cfg": NaN}', 400),
    (b'{"cfg": 1e400}', 400),
    (b'{"cfg": "2"}', 400),
    (b'{"cfg_interval": "1:5"}', 400),
    (b'{"cfg": 2, "cfg_interval": 5}', 400),
    (b'{"cfg": 2, "cfg_interval": "5:1"}', 400),
    (b'{"class": 10}', 400),
    (b'{"class": -1}', 400),
    (b'{"class": 1.5}', 400),
    (b'{"class": 1, "classes": [2]}', 400),
    (b'{"classes": []}', 400),
    (b'{"steps": 0}', 400),
    (b'{"steps": true}', 400),
    (b'{"steps": 1000000}', 413),
    (b'{"num": 0}', 400),
    (b'{"num": 100}', 413),
    (b'{"resolution": "16x20"}', 400),
    (b'{"resolution": "abc"}', 400),
    (b'{"resolution": 16}', 400),
    (b'{"resolution": "0x16"}', 400),
    (b'{"resolution": "4096x4096"}', 413),
    (b'{"sampler": "ddim"}', 400),
    (b'{"sampler": "dpm2m", "churn": 5}', 400),
    (b'{"reuse_residual": 1}', 400),
    (b'{"skip": "9@0.5:"}', 400),
    (b'{"skip": "1@0.5"}', 400),
    (b'{"skip": "0@1:"}', 400),
    (b'{"skip": 3}', 400),
    (b'{"t_break": 2}', 400),
    (b'{"churn": -1}', 400),
    (b'{"churn": {"s_churn": 1, "bogus": 2}}', 400),
    (b'{"churn": {"s_churn": 1, "s_min": 5, "s_max": 1}}', 400),
    (b'{"seed": -1}', 400),
    (b'{"format": "gif"}', 400),
    (b'{"async": "yes"}', 400),
    (b'{"columns": 0}', 400),
    (b'{"tile_shift": "on"}', 400),
    (b'{"bogus": 1}', 400),
    (b'{"pad": "' + b"x" * 70_000 + b'"}', 413),
]


def test_every_invalid_field_is_refused_with_a_one_line_json_error_before_anything_runs():
    service, backend = make_service(max_resolution=64, max_steps=100, max_images=16)
    with running(service) as http:
        for body, status in BAD:
            r = http.post("/v1/images", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (body[:60], r.status_code, r.text)
            one_line_error(r)
        for method, path, status in (("GET", "/v1/jobs/nope", 404), ("DELETE", "/v1/jobs/nope", 404)):
            assert http.request(method, path).status_code == status
        assert http.get("/v1/images").status_code == 405
        assert "Method Not Allowed" in one_line_error(http.get("/v1/images"))
        alone = http.post("/v1/images", json={"cfg_interval": "1:5"})  # the JSON name, not the library's
        assert one_line_error(alone).startswith("cfg_interval applies only with guidance"), alone.text
    assert service.batcher.stats.requests_joined == 0 and backend.calls == []


def test_every_sampler_and_residual_reuse_reach_the_pipeline():
    """What lego-run accepts, lego-serve accepts: --sampler dpm2m and --reuse-residual each change the
    images, and the server gives the offline ones for each."""
    service, _ = make_service()
    base = {"num": 2, "steps": 6, "seed": 5, "class": 4, "skip": "late", "t_break": 0.5, "format": "npz"}
    variants = {"base": {}, "dpm2m": {"sampler": "dpm2m"}, "reuse": {"reuse_residual": True}}
    with running(service) as http:
        images = {k: npz_images(http.post("/v1/images", json={**base, **v})) for k, v in variants.items()}
        unknown = http.post("/v1/images", json={**base, "sampler": "ddim"})
    assert unknown.status_code == 400 and "heun, euler, dpm2m" in one_line_error(unknown)
    for name, extra in variants.items():
        np.testing.assert_allclose(images[name], offline({**base, **extra}), atol=1e-5, rtol=0, err_msg=name)
    for name in ("dpm2m", "reuse"):
        assert np.abs(images[name] - images["base"]).max() > 1e-3, f"{name} did not change the images"


def test_the_models_recommended_setting_is_the_default_unless_the_request_says_how_to_sample(tmp_path):
    """As lego-run: a manifest's recommended setting applies to a request that names no sampling field."""
    import json
    import shutil

    engines = tmp_path / "engines"
    shutil.copytree(TINY, engines)
    manifest = json.loads((engines / "manifest.json").read_text())
    setting = {"sampler": "dpm2m", "steps": 4, "skip_policy": "2@1:", "reuse_residual": True}
    manifest["recommended"] = {**setting, "checkpoint_sha256": "a" * 64, "measured": {}}
    (engines / "manifest.json").write_text(json.dumps(manifest))
    service, _ = make_service(engines=engines)
    base = {"num": 2, "seed": 3, "class": 1, "format": "npz"}
    with running(service) as http:
        default = npz_images(http.post("/v1/images", json=base))
        plain = npz_images(http.post("/v1/images", json={**base, "recommended": False}))
        fifty = npz_images(http.post("/v1/images", json={**base, "steps": 50}))
        bad = http.post("/v1/images", json={**base, "recommended": "yes"})
    tuned = {"sampler": "dpm2m", "steps": 4, "skip": "2@1:", "reuse_residual": True}
    np.testing.assert_allclose(default, offline({**base, **tuned}, engines), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(plain, fifty)
    assert np.abs(default - plain).max() > 1e-2
    assert bad.status_code == 400 and "recommended must be true or false" in one_line_error(bad)


@pytest.mark.parametrize("streams", [1, 2])
def test_streams_run_that_many_requests_engine_calls_at_once_and_images_stay_exact(streams):
    inside, peak, lock, paired = [0], [0], threading.Lock(), threading.Event()

    def hook(engine, feeds):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
            if inside[0] == streams:
                paired.set()
        if streams > 1:
            paired.wait(10)  # the first call in holds its stream until a second runs beside it
        else:
            time.sleep(0.002)
        with lock:
            inside[0] -= 1

    service, _ = make_service(hook, streams=streams, max_active=2)
    bodies = [{"steps": 3, "seed": seed, "class": 1, "format": "npz"} for seed in (1, 2)]
    with running(service) as http:
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda body: http.post("/v1/images", json=body), bodies))
    assert peak[0] == streams
    for body, answer in zip(bodies, answers, strict=True):
        np.testing.assert_allclose(npz_images(answer), offline(body), atol=1e-5, rtol=0)


def test_a_request_alone_runs_on_every_thread_and_requests_side_by_side_on_their_share():
    inside, peak, lock, paired = [0], [0], threading.Lock(), threading.Event()

    def side_by_side(engine, feeds):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
            if inside[0] == 2:
                paired.set()
        paired.wait(5)  # the first call in holds its stream until another request's runs beside it
        with lock:
            inside[0] -= 1

    wide, narrow = HookedBackend(), HookedBackend(side_by_side)
    batcher = CallBatcher(wide.manifest, wide, ServeConfig(streams=2, calibrate=False), narrow_backend=narrow)

    def sample(slot, seed: int, out: dict) -> threading.Thread:
        def run() -> None:
            try:
                out[seed] = batcher.pipeline(slot)(steps=2, num=1, seed=seed).images
            finally:
                batcher.leave(slot)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    try:
        alone, images = batcher.join(), {}
        sample(alone, 1, images).join(30)
        assert wide.calls and not narrow.calls and batcher.stats.narrow_ticks == 0
        # Two requests sampling, and a third joined but still on host work (it never calls): the
        # second request's calls run beside the first's, on the narrow runners, without waiting for it.
        first, second, idle = batcher.join(), batcher.join(), batcher.join()
        threads = [sample(first, 2, images), sample(second, 3, images)]
        for thread in threads:
            thread.join(30)
        batcher.leave(idle)
        assert paired.is_set() and peak[0] == 2 and batcher.stats.narrow_ticks > 0
    finally:
        batcher.close()
    for seed in (1, 2, 3):
        np.testing.assert_allclose(images[seed], offline({"steps": 2, "seed": seed}), atol=1e-5, rtol=0)


needs_two_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="thread affinity needs Linux and at least two CPUs",
)


@needs_two_cpus
@needs_two_cpus
def test_automatic_streams_are_two_on_onnx_runtime_on_a_cpu_else_one():
    from lego_export.serve.service import default_streams

    def backend(name: str, device: str = "cpu"):
        return types.SimpleNamespace(name=name, device=device)

    assert default_streams(backend("onnxruntime"), threads=2) == 2
    assert default_streams(backend("onnxruntime"), threads=1) == 1
    assert default_streams(backend("onnxruntime", "cuda"), threads=8) == 1
    assert default_streams(backend("openvino"), threads=8) == 1
    service = ImageService(ServeConfig(engines=str(TINY), backend="onnxruntime", calibrate=False, threads=2, streams=0))
    try:
        assert service.config.streams == 2 and service.describe_config()["streams"] == 2
        assert service.batcher.narrow_runners is not service.batcher.runners
    finally:
        service.close()


def test_streams_need_a_backend_that_runs_calls_side_by_side():
    with pytest.raises(LegoError, match="streams 2: parallel engine streams run on onnxruntime and openvino"):
        make_backend("tensorrt", TINY, Manifest.read(TINY), streams=2)
    backend = HookedBackend()
    with pytest.raises(LegoError, match="streams must be at least 1, got 0"):  # no tick thread would ever run
        CallBatcher(backend.manifest, backend, ServeConfig(streams=0, calibrate=False))


def test_a_request_larger_than_memory_is_refused_before_allocation():
    service, backend = make_service(max_resolution=16384, max_steps=100, max_images=1_000_000)
    with pytest.raises(RequestError, match="needs about") as refused:
        service.parse({"resolution": "16384x16384", "num": 64})
    assert refused.value.status == 400
    service.close(5)
    assert backend.calls == []


def test_a_full_queue_gives_429_and_the_queue_drains():
    gate = threading.Event()
    service, _ = make_service(lambda engine, feeds: gate.wait(30), max_active=1, max_queue=1)
    with running(service) as http:
        a = http.post("/v1/images", json={"steps": 2, "async": True})
        b = http.post("/v1/images", json={"steps": 2, "async": True})
        assert (a.status_code, b.status_code) == (202, 202)
        wait_for(lambda: http.get("/healthz").json()["queued"] == 1, what="one job queued")
        full = http.post("/v1/images", json={"steps": 2})
        assert full.status_code == 429 and "queue full" in one_line_error(full)
        assert 'lego_serve_requests_total{outcome="rejected"} 1' in http.get("/metrics").text
        gate.set()
        for job in (a.json()["id"], b.json()["id"]):
            r = finished(http, job)
            assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert http.post("/v1/images", json={"steps": 2}).status_code == 200


def test_cancelling_a_running_job_frees_its_slot():
    service, _ = make_service(lambda engine, feeds: time.sleep(0.01), max_active=1)
    with running(service) as http:
        long = http.post("/v1/images", json={"steps": 250, "async": True}).json()["id"]  # about 20 s
        wait_for(lambda: http.get("/healthz").json()["in_flight"] == 1, what="the long job running")
        short = http.post("/v1/images", json={"steps": 2, "async": True}).json()["id"]
        assert http.get(f"/v1/jobs/{short}").json()["status"] == "queued"
        assert http.delete(f"/v1/jobs/{long}").json()["status"] == "cancelled"
        assert http.get(f"/v1/jobs/{long}").json()["status"] == "cancelled"  # from that moment on
        start = time.monotonic()
        assert finished(http, short, 15).headers["content-type"] == "image/png"
        assert time.monotonic() - start < 10
        gone = finished(http, long)
        assert gone.status_code == 410 and "cancelled" in one_line_error(gone)
        assert 'lego_serve_requests_total{outcome="cancelled"} 1' in http.get("/metrics").text


def test_a_client_that_disconnects_frees_its_slot():
    service, _ = make_service(lambda engine, feeds: time.sleep(0.01), max_active=1)
    with running(service) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/images", json={"steps": 250}, timeout=1.0)  # gives up, closing the connection
        wait_for(lambda: http.get("/healthz").json()["in_flight"] == 0, 10, "the slot to be freed")
        assert 'lego_serve_requests_total{outcome="cancelled"} 1' in http.get("/metrics").text
        assert http.post("/v1/images", json={"steps": 2}).status_code == 200


def test_a_failing_engine_call_fails_only_the_request_it_served():
    hold, held = threading.Event(), threading.Event()
    raised: list[set[int]] = []

    def hook(engine: str, feeds: dict) -> None:
        if not hold.is_set():  # the first call waits, so that the next two requests queue up
            held.set()
            hold.wait(30)
        if engine == "embedder" and (feeds["class_onehot"][:, 9] == 1).any():
            raised.append(set(feeds["class_onehot"].argmax(1).tolist()))
            raise RuntimeError("simulated engine fault on class 9")

    service = merging(make_service(hook, max_active=3)[0])
    with running(service) as http:
        first = http.post("/v1/images", json={"steps": 3, "class": 0, "async": True, "format": "npz"}).json()["id"]
        wait_for(held.is_set, what="the first call to be held")
        poisoned = {"steps": 4, "class": 9, "async": True, "format": "npz", "seed": 11}
        healthy = {"steps": 4, "class": 3, "async": True, "format": "npz", "seed": 12}
        bad = http.post("/v1/images", json=poisoned).json()["id"]
        good = http.post("/v1/images", json=healthy).json()["id"]
        wait_for(lambda: service.batcher.pending == 2, what="both embedder calls pending")
        hold.set()
        failed = finished(http, bad)
        assert failed.status_code == 500 and "simulated engine fault" in one_line_error(failed)
        assert {3, 9} <= raised[0], "the poisoned and the healthy request shared the failing call"
        np.testing.assert_allclose(npz_images(finished(http, good)), offline(healthy), atol=1e-5, rtol=0)
        expected_first = offline({"steps": 3, "class": 0})
        np.testing.assert_allclose(npz_images(finished(http, first)), expected_first, atol=1e-5, rtol=0)
        assert http.post("/v1/images", json={"steps": 2, "class": 4}).status_code == 200  # still serving
        assert http.get("/healthz").json()["status"] == "ok"
        assert 'lego_serve_engine_failures_total{engine="embedder"} 1' in http.get("/metrics").text


def test_metrics_report_queue_fill_and_latency():
    service, _ = make_service()
    with running(service) as http:
        assert http.post("/v1/images", json={"steps": 3, "num": 2}).status_code == 200
        text = http.get("/metrics").text
    for name in (
        "lego_serve_queue_depth 0",
        "lego_serve_requests_in_flight 0",
        'lego_serve_requests_total{outcome="ok"} 1',
        "lego_serve_images_total 2",
        'lego_serve_request_latency_seconds_bucket{le="+Inf"} 1',
        'lego_serve_engine_fill_ratio{engine="brick0"}',
        'lego_serve_tiles_per_call_count{engine="brick2"}',
        "lego_serve_scheduler_overhead_ratio",
    ):
        assert name in text, name
    for line in text.splitlines():  # every sample line is NAME{labels} VALUE with a number
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_health(http: httpx.Client, server: subprocess.Popen) -> dict:
    """A lego-serve process's /healthz, {} while it does not answer yet (failing if it exited)."""
    try:
        return http.get("/healthz").json()
    except httpx.TransportError:
        assert server.poll() is None, server.stdout.read()
        return {}


def test_sigterm_finishes_short_work_fails_long_work_and_exits():
    port = free_port()
    cmd = [sys.executable, "-m", "lego_export.serve.cli", "--engines", str(TINY), "--port", str(port)]
    cmd += ["--drain-timeout", "5", "--max-steps", "5000", "--threads", "1", "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    answers: dict[str, httpx.Response | Exception] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False) as http:

            def health():
                return server_health(http, server)

            wait_for(lambda: health().get("status") == "ok", 30, "lego-serve to start")

            def ask(name: str, body: dict) -> None:
                try:
                    answers[name] = http.post("/v1/images", json=body)
                except Exception as e:  # noqa: BLE001 - recorded and asserted below
                    answers[name] = e

            long = threading.Thread(target=ask, args=("long", {"steps": 5000, "num": 8}))
            long.start()
            wait_for(lambda: health().get("in_flight") == 1, 10, "the long request")
            short = threading.Thread(target=ask, args=("short", {"steps": 20}))
            short.start()
            wait_for(lambda: health().get("in_flight") == 2, 10, "the short request")
            start = time.monotonic()
            server.send_signal(signal.SIGTERM)
            server.wait(30)
            elapsed = time.monotonic() - start
            long.join(10)
            short.join(10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert elapsed < 15, f"shutdown took {elapsed:.1f} s"
    assert server.returncode == 0, f"exit status {server.returncode} after a graceful shutdown"
    assert isinstance(answers["short"], httpx.Response) and answers["short"].status_code == 200
    assert isinstance(answers["long"], httpx.Response), answers["long"]
    assert answers["long"].status_code == 503 and "shutting down" in one_line_error(answers["long"])


CALLS_OF_BRICK0 = 'lego_serve_engine_calls_total{engine="brick0"}'


def test_sigterm_exits_within_the_drain_timeout_while_one_engine_call_is_long():
    """A 64-image 512 x 512 request: each brick-0 call is a million tiles in engine chunks (about 15 s
    here). A drain of 1 s must not wait for the call to end: the process exits within the drain
    plus its grace."""
    port = free_port()
    cmd = [sys.executable, "-m", "lego_export.serve.cli", "--engines", str(TINY), "--port", str(port)]
    cmd += [
        "--drain-timeout",
        "1",
        "--threads",
        "1",
        "--no-calibrate",
        "--max-resolution",
        "512",
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    answer: dict = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, trust_env=False) as http:

            def health():
                return server_health(http, server)

            wait_for(lambda: health().get("status") == "ok", 30, "lego-serve to start")
            body = {"steps": 4, "num": 64, "resolution": "512x512", "format": "npz"}
            thread = threading.Thread(target=lambda: answer.update(r=http.post("/v1/images", json=body)))
            thread.start()
            wait_for(lambda: health().get("in_flight") == 1, 10, "the long request")

            def brick0_chunks() -> int:
                line = next(x for x in http.get("/metrics").text.splitlines() if x.startswith(CALLS_OF_BRICK0))
                return int(float(line.rsplit(" ", 1)[1]))

            wait_for(lambda: brick0_chunks() > 100, 30, "the request to be inside a brick-0 call")
            start = time.monotonic()
            server.send_signal(signal.SIGTERM)
            server.wait(60)
            elapsed = time.monotonic() - start
            thread.join(10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    from lego_export.serve.cli import DRAIN_GRACE_S

    assert elapsed < 1 + DRAIN_GRACE_S, f"shutdown took {elapsed:.1f} s"
    assert server.returncode == 0
    assert answer["r"].status_code == 503 and "shutting down" in one_line_error(answer["r"])


def test_ctrl_c_on_an_idle_server_exits_0_without_a_message():
    port = free_port()
    cmd = [sys.executable, "-m", "lego_export.serve.cli", "--engines", str(TINY), "--port", str(port)]
    cmd += ["--threads", "1", "--no-calibrate", "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False) as http:

            def up() -> bool:
                try:
                    return http.get("/healthz").status_code == 200
                except httpx.TransportError:
                    assert server.poll() is None, server.stdout.read()
                    return False

            wait_for(up, 30, "lego-serve to start")
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, (server.returncode, output)
    assert "Aborted" not in output and "Traceback" not in output, output


def test_cli_refuses_bad_options_and_missing_engines_in_one_line(tmp_path):
    runner = CliRunner()
    for args, needle in (  # ranges click checks: its usage error, status 2
        (["--engines", str(TINY), "--max-active", "0"], "Invalid value for '--max-active'"),
        (["--engines", str(TINY), "--max-resolution", "100000"], "Invalid value for '--max-resolution'"),
    ):
        result = runner.invoke(lego_serve, args)
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output
    result = runner.invoke(lego_serve, ["--engines", str(TINY), "--slo", "0.5x"])  # checked by ServeConfig, not click
    assert result.exit_code == 1 and "--slo must be" in result.output, result.output
    result = runner.invoke(lego_serve, ["--engines", str(tmp_path / "none")])
    assert result.exit_code == 1, result.output
    assert "manifest" in result.output and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("streams", "65", "streams must be an integer from 0 to 64"),
        ("streams", True, "streams must be an integer"),
        ("threads", "1e9", "threads must be an integer"),
        ("num_cpus", "x", "num_cpus must be a number"),
        ("drain_timeout", "nan", "drain_timeout must be 0 to 86400 seconds"),
        ("drain_timeout", "-5", "drain_timeout must be 0 to 86400 seconds"),
        ("target_ongoing_requests", "nan", "target_ongoing_requests must be 0 or more"),
        ("slo", "0.5x", 'slo must be "none"'),
    ],
)
def test_ray_options_are_checked_before_any_replica_starts(key, value, needle):
    from lego_export.serve.ray_app import RayOptions

    with pytest.raises(LegoError, match=needle):
        RayOptions.from_args({"engines": str(TINY), key: value})


class InlineActor:
    """A JobDirectory whose `.remote` calls run at once: the replicas' shared state without Ray."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        method = getattr(self.target, name)
        return types.SimpleNamespace(remote=lambda *args: ("written", method(*args)))


def test_a_cancel_is_published_when_it_is_said_not_when_the_engine_call_ends(monkeypatch):
    """A replica answers 'cancelled' at once, while the job's engine call runs on: the directory,
    which the other replicas read, must say so by then too (else a client that saw 'cancelled'
    and asks another replica for the result is told it is still running)."""
    from lego_export.serve import ray_app

    monkeypatch.setattr(ray_app, "_ray", lambda: types.SimpleNamespace(get=lambda ref: ref[1]))
    gate = threading.Event()
    backend = HookedBackend(lambda engine, feeds: gate.wait(30))
    directory = ray_app.JobDirectory()
    config = ServeConfig(engines=str(TINY), calibrate=False)
    store = ray_app.SharedJobStore(config.keep_jobs, config.job_ttl_s, InlineActor(directory))
    service = ImageService(config, backend=backend, manifest=backend.manifest, store=store)
    store.start(service)
    try:
        job = service.submit(service.parse({"steps": 4, "async": True}))
        wait_for(lambda: len(backend.calls) == 1, what="the job's first call held in the engine")
        service.cancel(job, "cancelled by the client")
        assert job.state == "cancelled" and directory.get(job.id)["state"] == "cancelled"
        assert service.get(job.id) is job
    finally:
        gate.set()
        service.close(10)


def test_a_replica_answers_another_replicas_expired_job_with_where_it_expired():
    from lego_export.serve import ray_app
    from lego_export.serve.app import job_response
    from lego_export.serve.service import Job
    from lego_export.serve.validation import ImageRequest

    job = Job("0" * 32, ImageRequest(is_async=True))
    job.state, job.error, job.status, job.expired_in = "expired", "deadline passed while queued", 504, "queue"
    answer = job_response(ray_app._remote_job(job.id, ray_app._record(job)))
    assert answer.status_code == 504
    assert json.loads(answer.body) == {"error": job.error, "id": job.id, "status": "expired", "expired_in": "queue"}


def test_ray_serve_replicas_give_the_offline_images_and_share_async_jobs():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install '.[ray]'): not tested")
    from lego_export.serve import ray_app

    body = {"steps": 4, "num": 2, "class": 5, "format": "npz", "seed": 3}
    port = free_port()
    # every lego-serve setting away from its default, to be read back inside the replicas
    settings = dict(backend="onnxruntime", threads=1, streams=2, max_batch_tiles=7, max_active=3, slo="600s")
    settings.update(calibrate=False, max_queue=5, max_resolution=32, max_steps=300, max_images=40)
    with ray_app.local_deployment(str(TINY), port=port, cluster_cpus=2, min_replicas=2, max_replicas=2,
                                  **settings) as url:  # fmt: skip
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as http:
            config = http.get("/healthz").json()["config"]
            limits = {k: settings.pop(k) for k in ("max_resolution", "max_steps", "max_images")}
            assert {k: config[k] for k in settings} == settings and config["limits"] == limits, config
            too_large = http.post("/v1/images", json={"steps": 4, "resolution": "48x48"})
            assert too_large.status_code == 413 and "limit of 32" in one_line_error(too_large)
            images = npz_images(http.post("/v1/images", json=body))
            assert one_line_error(http.post("/v1/images", json={"class": 99})).startswith("class 99")
            job = http.post("/v1/images", json={**body, "async": True})
            assert job.status_code == 202
            # Requests go to either replica: every read of the job must find it.
            answers = [finished(http, job.json()["id"]) for _ in range(8)]
            # Ray routes by queue length: a busy moment can send a run of reads to one replica.
            replicas, deadline = set(), time.monotonic() + 30
            while len(replicas) < 2 and time.monotonic() < deadline:
                replicas.add(http.get("/healthz").json()["instance"])
            long = http.post("/v1/images", json={"steps": 250, "num": 32, "async": True}).json()["id"]
            assert http.delete(f"/v1/jobs/{long}").status_code == 200  # from whichever replica
            cancelled = finished(http, long, 20)
    np.testing.assert_allclose(images, offline(body, backend="auto"), atol=1e-5, rtol=0)
    for answer in answers:
        np.testing.assert_allclose(npz_images(answer), images, atol=0, rtol=0)
    assert len(replicas) == 2
    assert cancelled.status_code == 410, cancelled.text


def test_the_load_benchmark_runs_both_servers_and_checks_their_images(tmp_path):
    """benchmarks/serve.py end to end on the tiny engines: the baseline server and lego-serve, each at
    saturation and one Poisson rate, their images equal to the offline ones."""
    import json

    out = tmp_path / "serve"
    cmd = [sys.executable, "benchmarks/serve.py", "--engines", str(TINY), "--small", "--requests", "4"]
    cmd += ["--rates", "0.5", "--check", "2", "--no-calibrate", "--threads", "1", "--out", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert [(r["server"], r["arrivals"]) for r in data["rows"]] == [
        ("baseline", "all at once"),
        ("baseline", "Poisson 50%"),
        ("lego-serve", "all at once"),
        ("lego-serve", "Poisson 50%"),
    ]
    for row in data["rows"]:
        assert row["errors"] == [] and row["requests"] == 4 and row["images_checked"] == 2, row
        assert row["max_abs_diff_vs_offline"] <= 1e-5 and 0 < row["p50_s"] <= row["p99_s"]
    assert data["rows"][2]["engines"]["brick0"]["tiles_per_call"] > 0
    assert data["summary"]["saturation_throughput_ratio"] > 0 and data["summary"]["notes"] == []
    assert "Saturation throughput ratio" in out.with_suffix(".md").read_text()


def test_the_deadline_benchmark_sends_every_block_to_every_server(tmp_path):
    """benchmarks/serve_load.py end to end on the tiny engines: each load's requests in blocks, each
    block to the three servers in turn, every server's answers pooled over the blocks; C_FIFO probed
    with the same blocks on the one-at-a-time server."""
    import json

    out = tmp_path / "serve-load"
    cmd = [sys.executable, "benchmarks/serve_load.py", "--engines", str(TINY), "--small", "--requests", "6"]
    cmd += ["--rounds", "3", "--loads", "1", "--probes", "2", "--threads", "1", "--ladder", str(tmp_path / "none")]
    run = subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert [(r["server"], r["quality"]) for r in data["rows"]] == [
        ("baseline", "-"),
        ("lego-serve", "exact"),
        ("lego-serve", "elastic"),
    ]
    for row in data["rows"]:  # all six requests of the three blocks answered, none lost between blocks
        assert row["other_errors"] == 0 and sum(row["rungs"].values()) + 6 * (row["refused"] + row["expired"]) == 6
    assert set(data["time_alone_side_by_side_s"]) == {"baseline", "lego-serve"}
    assert "in 3 blocks" in out.with_suffix(".md").read_text()
    probes = data["c_fifo_probes"]  # every block's answers count: shares of six requests
    assert len(probes) == 2 and all(round(6 * p["within_deadline"], 9).is_integer() for p in probes)
    assert probes[1]["rate"] in (probes[0]["rate"] / 2, probes[0]["rate"] * 1.5)


def test_serving_needs_no_torch(tmp_path):
    """The server runs where the runtime runs: ONNX Runtime on the CPU, no PyTorch imported."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from lego_export.serve.service import ImageService, ServeConfig\n"
        f"s = ImageService(ServeConfig(engines={str(TINY)!r}))\n"
        "job = s.submit(s.parse({'steps': 2, 'format': 'npz'})); job.future.result(60); s.close(5)\n"
        "print(job.state)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
