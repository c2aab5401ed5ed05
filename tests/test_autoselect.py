"""`--backend auto` on a CPU: measured once per machine, model and runtime versions, cached in a
checked file; `--backend NAME` overrides it; the measurement's processes are gone afterwards.

Which runtime wins depends on the machine: the tests check the bookkeeping around the choice with a
stand-in measurement, and run the real one only to check that it ends cleanly and returns numbers.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lego_export.manifest import Manifest
from lego_export.runtime import autoselect
from lego_export.runtime.backends import Backend, make_backend

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny-engines"
BOTH = ("openvino", "onnxruntime")
needs_both = pytest.mark.skipif(
    not all(importlib.util.find_spec(n) for n in BOTH), reason="needs both openvino and onnxruntime"
)


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Measurement on (conftest turns it off), the cache file in tmp_path; returns the cache path."""
    monkeypatch.delenv(autoselect.MEASURE_ENV, raising=False)
    path = tmp_path / "cache" / "choice.json"
    monkeypatch.setenv(autoselect.CACHE_ENV, str(path))
    return path


@pytest.fixture
def fake_measure(monkeypatch):
    """A stand-in for the measurement: fixed numbers (ONNX Runtime faster at batch 16, OpenVINO at
    batch 1, ONNX Runtime's product smaller), and a count of the calls."""
    calls = []

    def measure(folder, candidates, precision, threads, streams, timeout=autoselect.TIMEOUT_S):
        calls.append((precision, threads, streams))
        ms = {"onnxruntime": {"16": 50.0, "1": 8.0}, "openvino": {"16": 60.0, "1": 7.5}}
        return {n: ms[n] for n in candidates}

    monkeypatch.setattr(autoselect, "measure", measure)
    return calls


def choose(**kw):
    return autoselect.choose(TINY, Manifest.read(TINY), list(BOTH), **kw)


def test_first_use_measures_and_the_next_reads_the_cache(measuring, fake_measure):
    first = choose()
    assert first.backend == "onnxruntime"  # 50 x 8 < 60 x 7.5
    assert first.reason.startswith("onnxruntime: 50.0 ms vs openvino 60.0 ms per full chain at batch 16")
    assert "(8.0 vs 7.5 ms at batch 1)" in first.reason and f"cached in {measuring}" in first.reason
    second = choose()
    assert len(fake_measure) == 1 and second == first
    entry = next(iter(json.loads(measuring.read_text())["entries"].values()))
    assert entry["backend"] == "onnxruntime" and entry["ms"]["openvino"] == {"16": 60.0, "1": 7.5}


def test_a_changed_key_measures_again(measuring, fake_measure, monkeypatch):
    choose()
    choose(threads=1)
    choose(precision="int8")
    choose(streams=2)
    assert len(fake_measure) == 4
    with monkeypatch.context() as m:
        m.setattr(autoselect, "runtime_version", lambda module: f"{module} 99.0")  # an upgrade
        choose()
    with monkeypatch.context() as m:
        m.setattr(autoselect, "cpu_model", lambda: "another CPU")
        choose()
    assert len(fake_measure) == 6
    assert len(json.loads(measuring.read_text())["entries"]) == 6
    choose(threads=1)  # the older entries are still there
    assert len(fake_measure) == 6


def test_the_key_follows_the_engine_files_not_the_folder(tmp_path):
    manifest = Manifest.read(TINY)
    key = autoselect.cache_key(manifest, BOTH, "fp32", 0, 1)
    assert autoselect.cache_key(Manifest.read(TINY), BOTH, "fp32", 0, 1) == key
    data = json.loads((TINY / "manifest.json").read_text())
    data["engines"][1]["files"]["onnx"]["sha256"] = "0" * 64  # another build of one engine
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    other = Manifest.read(tmp_path)
    assert autoselect.cache_key(other, BOTH, "fp32", 0, 1) != key


def _entry(ms=None, backend="onnxruntime", measured="2026-12-08T01:00:00+00:00"):
    ms = ms or {"onnxruntime": {"16": 50.0, "1": 8.0}, "openvino": {"16": 60.0, "1": 7.5}}
    return {"backend": backend, "ms": ms, "measured": measured}


BAD_FILES = {
    "not json": b"{not json",
    "a list": b"[1, 2]",
    "another format": json.dumps({"format": 99, "entries": {}}).encode(),
    "oversized": b" " * (autoselect.MAX_BYTES + 1) + b"{}",
    "deeply nested": b"[" * 100000 + b"]" * 100000,
    "binary": bytes(range(256)),
}
BAD_ENTRIES = {
    "backend contradicts the numbers": _entry(backend="openvino"),
    "negative time": _entry({"onnxruntime": {"16": -1.0, "1": 8.0}, "openvino": {"16": 60.0, "1": 7.5}}),
    "infinite time": _entry({"onnxruntime": {"16": 1e400, "1": 8.0}, "openvino": {"16": 60.0, "1": 7.5}}),
    "string time": _entry({"onnxruntime": {"16": "5", "1": 8.0}, "openvino": {"16": 60.0, "1": 7.5}}),
    "boolean time": _entry({"onnxruntime": {"16": True, "1": 8.0}, "openvino": {"16": 60.0, "1": 7.5}}),
    "unknown runtime": _entry({"onnxruntime": {"16": 5.0, "1": 8.0}, "rm -rf": {"16": 60.0, "1": 7.5}}),
    "missing batch": _entry({"onnxruntime": {"16": 5.0}, "openvino": {"16": 60.0}}),
    "bad date": _entry(measured="yesterday\x1b[31m"),
    "extra field": {**_entry(), "reason": "trust me"},
    "not a dict": "onnxruntime",
}


@pytest.mark.parametrize("content", list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_a_bad_cache_file_is_ignored_and_replaced(measuring, fake_measure, content):
    measuring.parent.mkdir(parents=True)
    measuring.write_bytes(content)
    chosen = choose()
    assert chosen.backend == "onnxruntime" and len(fake_measure) == 1
    doc = json.loads(measuring.read_text())  # rewritten whole, in the right format
    assert doc["format"] == autoselect.FORMAT and len(doc["entries"]) == 1
    assert choose() == chosen and len(fake_measure) == 1


@pytest.mark.parametrize("entry", list(BAD_ENTRIES.values()), ids=list(BAD_ENTRIES))
def test_a_bad_entry_under_the_right_key_is_measured_again(measuring, fake_measure, entry):
    key = autoselect.cache_key(Manifest.read(TINY), BOTH, "fp32", 0, 1)
    measuring.parent.mkdir(parents=True)
    measuring.write_text(json.dumps({"format": autoselect.FORMAT, "entries": {key: entry}}))
    assert choose().backend == "onnxruntime" and len(fake_measure) == 1
    assert json.loads(measuring.read_text())["entries"][key]["ms"]["onnxruntime"] == {"16": 50.0, "1": 8.0}


def test_a_good_entry_written_by_hand_is_used(measuring, fake_measure):
    key = autoselect.cache_key(Manifest.read(TINY), BOTH, "fp32", 0, 1)
    ms = {"onnxruntime": {"16": 70.0, "1": 9.0}, "openvino": {"16": 60.0, "1": 7.5}}
    measuring.parent.mkdir(parents=True)
    doc = {"format": autoselect.FORMAT, "entries": {key: _entry(ms, backend="openvino")}}
    measuring.write_text(json.dumps(doc))
    chosen = choose()
    assert chosen.backend == "openvino" and not fake_measure
    assert chosen.reason.startswith("openvino: 60.0 ms vs onnxruntime 70.0 ms")
    assert "measured 2026-12-08 01:00 UTC" in chosen.reason


def test_an_unwritable_cache_still_chooses(monkeypatch, fake_measure, tmp_path):
    monkeypatch.delenv(autoselect.MEASURE_ENV, raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(autoselect.CACHE_ENV, str(blocker / "choice.json"))  # a folder that is a file
    chosen = choose()
    assert chosen.backend == "onnxruntime" and "not cached" in chosen.reason


def test_the_cache_keeps_the_newest_entries_only(measuring, fake_measure):
    for threads in range(autoselect.MAX_ENTRIES + 3):
        choose(threads=threads)
    entries = json.loads(measuring.read_text())["entries"]
    assert len(entries) == autoselect.MAX_ENTRIES
    assert autoselect.cache_key(Manifest.read(TINY), BOTH, "fp32", autoselect.MAX_ENTRIES + 2, 1) in entries


def test_measurement_off_one_runtime_and_a_named_backend_measure_nothing(measuring, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("measured")

    monkeypatch.setattr(autoselect, "measure", refuse)
    manifest = Manifest.read(TINY)
    only = autoselect.choose(TINY, manifest, ["onnxruntime"])
    assert only.backend == "onnxruntime" and "the only CPU runtime installed" in only.reason
    named = make_backend("onnxruntime", TINY, manifest)
    assert named.name == "onnxruntime" and named.choice == "onnxruntime: asked for by name (auto not used)"
    monkeypatch.setenv(autoselect.MEASURE_ENV, "0")
    ruled = autoselect.choose(TINY, manifest, list(BOTH))
    assert ruled.backend == "openvino" and "not measured" in ruled.reason
    assert not measuring.exists()


def test_auto_reports_its_choice_on_the_backend_the_api_and_lego_run(measuring, fake_measure, tmp_path):
    from click.testing import CliRunner

    from lego_export.runtime import LegoPipeline
    from lego_export.runtime.cli import main

    pytest.importorskip("openvino")
    backend = make_backend("auto", TINY, Manifest.read(TINY))
    assert backend.name == "onnxruntime" and backend.choice.startswith("onnxruntime: 50.0 ms vs openvino 60.0 ms")
    pipe = LegoPipeline.from_engines(TINY)
    assert pipe.backend.choice == backend.choice and len(fake_measure) == 1
    args = ["--engines", str(TINY), "--num", "1", "--steps", "1", "--out", str(tmp_path / "g.png")]
    result = CliRunner().invoke(main, args)
    line = next(s for s in result.output.splitlines() if s.startswith("sampling "))
    assert line.endswith(f"; backend {backend.choice}"), result.output


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_every_backend_has_the_common_attributes(name):
    pytest.importorskip(name)
    backend = make_backend(name, TINY, Manifest.read(TINY))
    assert isinstance(backend, Backend)
    assert (backend.name, backend.precision, backend.device, backend.streams) == (name, "fp32", "cpu", 1)
    assert type(backend.arrays).__name__ == "NumpyArrays" and backend.choice.startswith(f"{name}: ")


@needs_both
def test_the_real_measurement_ends_its_processes(measuring, monkeypatch):
    started = []
    popen = subprocess.Popen

    def recording(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(autoselect.subprocess, "Popen", recording)
    threads_before = threading.active_count()
    begin = time.perf_counter()
    chosen = choose()
    took = time.perf_counter() - begin
    assert chosen.backend in BOTH and "cached in" in chosen.reason, chosen.reason
    assert len(started) == 2 and all(p.returncode is not None for p in started)  # waited for: reaped
    assert all(not Path(f"/proc/{p.pid}").exists() for p in started if Path("/proc").is_dir())
    deadline = time.monotonic() + 10  # the watchdog timer's thread ends once cancelled
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == threads_before
    ms = json.loads(measuring.read_text())["entries"].popitem()[1]["ms"]
    assert set(ms) == set(BOTH) and all(0 < v < took * 1e3 for per in ms.values() for v in per.values())


@needs_both
def test_a_measurement_that_fails_or_overruns_falls_back_and_caches_nothing(measuring, monkeypatch, tmp_path):
    broken = tmp_path / "engines"
    broken.mkdir()
    manifest = Manifest.read(TINY)
    (broken / "manifest.json").write_text((TINY / "manifest.json").read_text())  # but no engine files
    chosen = autoselect.choose(broken, manifest, list(BOTH))
    assert chosen.backend == "openvino" and "measuring failed: openvino exited 1" in chosen.reason, chosen.reason
    assert not measuring.exists()
    with pytest.raises(autoselect.MeasureError, match="took over"):
        autoselect.measure(TINY, list(BOTH), "fp32", 0, 1, timeout=0.05)


def test_worker_lines_other_than_its_own_are_skipped(tmp_path):
    script = "print('a runtime banner'); print('{\"lego-autoselect\": {\"ready\": 1}}')"
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    with open(tmp_path / "log", "w+b") as log:
        assert autoselect._answer("x", proc, log, threading.Event(), 1.0) == {"ready": 1}
    proc.wait()


def test_openvino_outputs_are_not_overwritten_by_the_next_call():
    """The runner reads its inputs in place and returns outputs the next call does not reuse."""
    import numpy as np

    pytest.importorskip("openvino")
    manifest = Manifest.read(TINY)
    spec = manifest.bricks[0]
    runner = make_backend("openvino", TINY, manifest).runner(spec)
    rng = np.random.default_rng(0)
    feeds = [
        {t.name: rng.standard_normal([4 if d == "N" else d for d in t.shape]).astype(np.float32) for t in spec.inputs}
        for _ in range(2)
    ]
    first = runner.infer(feeds[0])
    kept = {k: v.copy() for k, v in first.items()}
    second = runner.infer(feeds[1])
    for name in kept:
        np.testing.assert_array_equal(first[name], kept[name])
        assert not np.array_equal(first[name], second[name])
