"""Hostile-but-fair input: each test attempts one attack or mistake and pins that it is refused in one
line, writes nothing partial, and runs nothing from outside the engines folder."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lego_export.atomic import folder_lock
from lego_export.checkpoint import FORMAT, FORMAT_VERSION
from lego_export.cli import export_main
from lego_export.config import get_preset
from lego_export.errors import LegoError
from lego_export.manifest import Manifest
from lego_export.runtime import LegoPipeline
from lego_export.runtime.cli import main as lego_run
from lego_train.cli import main as lego_train

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CKPT = FIXTURES / "tiny-pg.safetensors"


@pytest.fixture
def engines(tmp_path):
    """A private copy of the committed tiny engines, free to tamper with."""
    folder = tmp_path / "engines"
    shutil.copytree(FIXTURES / "tiny-engines", folder)
    return folder


def run(args, **kwargs):
    return CliRunner().invoke(lego_run, [str(a) for a in args], catch_exceptions=False, **kwargs)


def refused(result, message):
    """Exit status 1, the message, one line, no traceback; or, for a range click checks itself
    (message "Invalid value for ..."), click's usage error: status 2, its message last."""
    assert "Traceback" not in result.output, result.output
    if message.startswith("Invalid value for"):
        assert result.exit_code == 2 and message in result.output.strip().splitlines()[-1], result.output
        return
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert message in result.output, result.output
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("sampling ")]
    assert len(lines) == 1, result.output  # the one line before sampling starts is not an error


def edit_manifest(folder: Path, change) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    change(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".lego-tmp" in p.name or ".lego-staging" in p.name]


# -- security ---------------------------------------------------------------------------------------


def test_a_planted_symlink_is_never_written_through(engines, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    # The old predictable temp name, and the target itself, both pointing at the victim.
    for pid in range(os.getpid() - 5, os.getpid() + 50):
        (out / f".grid.png.tmp-{pid}.png").symlink_to(victim)
    (out / "grid.png").symlink_to(victim)
    assert run(["--engines", engines, "--steps", 2, "--num", 2, "--out", out / "grid.png"]).exit_code == 0
    assert victim.read_text() == "precious"
    assert not (out / "grid.png").is_symlink() and (out / "grid.png").read_bytes()[:4] == b"\x89PNG"


SWAPPER = """
import os, sys
path, stop = sys.argv[1], sys.argv[4]
good, bad = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
while not os.path.exists(stop):  # until the test has seen enough loads, however slow the machine
    for data in (bad, good):
        with open(path + ".swap", "wb") as f:
            f.write(data)
        os.replace(path + ".swap", path)
"""


def test_an_engine_swapped_by_another_process_never_runs(engines, tmp_path):
    """A second process keeps replacing brick1.onnx with another model's brick (same shapes). Every
    load must either refuse the file or run exactly the verified one."""
    other = tmp_path / "other"
    torch.manual_seed(1)
    from lego_export.checkpoint import save_checkpoint
    from lego_export.export.build import BuildOptions, build
    from lego_export.model import LegoModel

    model = LegoModel(get_preset("pg-tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    save_checkpoint(tmp_path / "other.safetensors", model)
    build(BuildOptions(ckpt=str(tmp_path / "other.safetensors"), out=str(other), max_batch=8, opt_batch=4, fuse=False))
    good, bad = (engines / "brick1.onnx").read_bytes(), (other / "brick1.onnx").read_bytes()
    assert good != bad
    expected = LegoPipeline.from_engines(engines)(num=2, steps=2).images

    (tmp_path / "good.onnx").write_bytes(good)
    swapper = subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(engines / "brick1.onnx"), str(tmp_path / "good.onnx")]
        + [str(other / "brick1.onnx"), str(tmp_path / "stop")]
    )
    ran = refused_loads = 0
    try:
        deadline = time.monotonic() + 120
        while (ran + refused_loads <= 5 or not refused_loads) and time.monotonic() < deadline:
            try:
                images = LegoPipeline.from_engines(engines)(num=2, steps=2).images
            except LegoError as e:
                assert "brick1.onnx: sha256 differs" in str(e) or "brick1.onnx: missing" in str(e)
                refused_loads += 1
                continue
            np.testing.assert_array_equal(images, expected)
            ran += 1
    finally:
        (tmp_path / "stop").touch()
        swapper.wait(timeout=30)
    assert ran + refused_loads > 5 and refused_loads > 0


@pytest.mark.parametrize("path", ["../victim.onnx", "/etc/passwd", "sub/brick1.onnx", ".hidden.onnx", ""])
def test_manifest_paths_must_be_plain_names_in_the_folder(engines, tmp_path, path):
    shutil.copy(engines / "brick1.onnx", tmp_path / "victim.onnx")

    def point_outside(data):
        data["engines"][2]["files"]["onnx"]["path"] = path

    edit_manifest(engines, point_outside)
    refused(run(["--engines", engines, "--steps", 1, "--num", 1, "--out", tmp_path / "g.png"]), "files.onnx.path")
    result = CliRunner().invoke(export_main, ["verify", str(engines)])
    refused(result, "expected a plain file name in the engines folder")


def test_an_engine_file_that_is_a_symlink_is_refused(engines, tmp_path):
    shutil.move(engines / "brick1.onnx", tmp_path / "elsewhere.onnx")
    (engines / "brick1.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    refused(run(["--engines", engines, "--steps", 1, "--num", 1, "--out", tmp_path / "g.png"]), "symbolic link")


def test_tensorrt_plans_are_verified_before_they_are_loaded(engines):
    """Whatever picks the TensorRT backend (auto included), plans go through the same check. TensorRT is
    not installed here: the loader is driven with a stand-in deserializer that records what it got."""
    from lego_export.manifest import EngineFile
    from lego_export.runtime.backends import load_plans

    manifest = Manifest.read(engines)
    for spec in manifest.engines:  # pretend the ONNX files were plans
        spec.files["tensorrt"] = EngineFile(**{**spec.files["onnx"].__dict__})
    loaded = load_plans(engines, manifest, lambda data: data, lambda _f: None)
    assert loaded["brick0"] == (engines / "brick0.onnx").read_bytes()
    with open(engines / "brick2.onnx", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(LegoError, match="brick2.onnx: sha256 differs"):
        load_plans(engines, manifest, lambda data: data, lambda _f: None)


# -- silent wrong results ---------------------------------------------------------------------------


def test_an_engine_returning_nan_at_run_time_is_named(engines, tmp_path, monkeypatch):
    pipe = LegoPipeline.from_engines(engines)
    calls = {"n": 0}
    real = pipe.bricks[1].runner.infer

    def poisoned(feeds):
        calls["n"] += 1
        out = real(feeds)
        if calls["n"] == 3:  # step 1's first evaluation
            out["out"][0, 0, 0, 0] = np.nan
        return out

    pipe.bricks[1].runner.infer = poisoned
    with pytest.raises(LegoError, match="brick1 returned NaN or infinity at step 1"):
        pipe(num=1, steps=4)


@pytest.mark.parametrize("cfg", ["nan", "inf", "-inf", "-1e308", "101"])
def test_non_finite_or_absurd_guidance_is_refused(engines, tmp_path, cfg):
    # nan passes click's range (no comparison holds for it): the options' own check refuses it
    message = "--cfg must be a finite number" if cfg == "nan" else "Invalid value for '--cfg'"
    refused(run(["--engines", engines, "--cfg", cfg, "--steps", 1, "--out", tmp_path / "g.png"]), message)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("sigma_data", 0, "sigma_data must be a finite positive number"),
        ("sigma_max", -80, "sigma_max must be a finite positive number"),
        ("sigma_min", 100.0, "sigma_min 100.0 must be below sigma_max"),
        ("rho", "7", "rho must be a finite positive number"),
    ],
)
def test_bad_edm_constants_in_a_manifest_are_refused(engines, tmp_path, field, value, message):
    edit_manifest(engines, lambda d: d["model"]["edm"].__setitem__(field, value))
    refused(run(["--engines", engines, "--steps", 1, "--out", tmp_path / "g.png"]), message)


def test_nan_literals_in_a_manifest_are_refused(engines, tmp_path):
    text = (engines / "manifest.json").read_text().replace('"sigma_data": 0.5', '"sigma_data": NaN')
    (engines / "manifest.json").write_text(text)
    refused(run(["--engines", engines, "--steps", 1, "--out", tmp_path / "g.png"]), "NaN is not a number JSON allows")


def test_train_with_nothing_to_train_is_refused(tiny_npz, tmp_path):
    result = CliRunner().invoke(
        lego_train, ["--data", str(tiny_npz), "--preset", "tiny", "--kimg", "0", "--out", str(tmp_path / "r")]
    )
    refused(result, "--kimg must be a positive number")
    assert not (tmp_path / "r").exists()


def test_out_suffix_is_honest(engines, tmp_path):
    assert run(["--engines", engines, "--steps", 1, "--num", 1, "--out", tmp_path / "g.jpg"]).exit_code == 0
    assert (tmp_path / "g.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes
    refused(run(["--engines", engines, "--steps", 1, "--out", tmp_path / "g.gif"]), "write a picture as .png or .jpg")
    refused(run(["--engines", engines, "--steps", 1, "--out", ""]), "--out is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines", "g.jpg"]


# -- half-written files -----------------------------------------------------------------------------


def test_save_npz_without_suffix_writes_what_numpy_names(engines, tmp_path):
    result = run(
        ["--engines", engines, "--steps", 1, "--num", 2, "--out", tmp_path / "g.png", "--save-npz", tmp_path / "s"]
    )
    assert result.exit_code == 0 and "s.npz" in result.output
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 1, 16, 16)
    assert not leftovers(tmp_path)


def test_leftovers_of_killed_runs_are_cleaned_by_the_next_run(engines, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    out = tmp_path / "out"
    out.mkdir()
    (out / f".grid.png.{dead.pid}.x1y2z3.lego-tmp").write_bytes(b"")
    (out / f".each.{dead.pid}.abcdef.lego-staging").mkdir()
    (out / f".mine.{os.getpid()}.abcdef.lego-tmp").write_bytes(b"")  # a live writer's file stays
    assert run(["--engines", engines, "--steps", 1, "--num", 1, "--out", out / "grid.png"]).exit_code == 0
    assert leftovers(out) == [f".mine.{os.getpid()}.abcdef.lego-tmp"]


class Lines:
    """Every line of a child's stream, read in a thread, so that a test can look at them while it runs."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def text(self, timeout: float = 0.0) -> str:
        self.thread.join(timeout)
        return "".join(self.lines)


def signalled(script: str, args: list, ready, sig: int) -> tuple[int, str]:
    """Run one of the console scripts, send it sig as soon as ready(stderr so far) is true (polled,
    120 s at most), and return its exit status and its whole stderr (killed if not ended in 60 s)."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / script), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = Lines(proc.stderr)
    try:
        deadline = time.monotonic() + 120
        while not ready(err.text()):
            assert proc.poll() is None and time.monotonic() < deadline, err.text()
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err.text(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_sampling_cleans_up_and_says_so(engines, tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()  # lego-run refuses an output whose folder does not exist
    args = ["--engines", str(engines), "--steps", "1000", "--num", "4", "--batch", "1", "--out", str(out / "g.png")]
    args += ["--out-dir", str(out / "each")]
    # "sampling 4 image(s)" is printed before the first of 4000 steps
    status, err = signalled("lego-run", args, lambda err: "sampling 4 image(s)" in err, sig)
    assert status == 1 and "interrupted" in err and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_ctrl_c_while_writing_outputs_says_what_is_on_disk(engines, tmp_path, monkeypatch):
    import lego_export.images as images

    real = images.save_image

    def interrupt_on_grid(pixels, path, text=None):
        if Path(path).name == "g.png":
            raise KeyboardInterrupt
        real(pixels, path, text)

    monkeypatch.setattr(images, "save_image", interrupt_on_grid)
    result = run(
        ["--engines", engines, "--steps", 1, "--num", 2, "--out", tmp_path / "g.png", "--save-npz", tmp_path / "s.npz"]
        + ["--out-dir", tmp_path / "each"]
    )
    refused(result, "written whole before it: ")
    assert "s.npz" in result.output and "each/ (2 PNGs)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["each", "engines", "s.npz"]
    assert len(list((tmp_path / "each").iterdir())) == 2 and not leftovers(tmp_path)


@pytest.mark.parametrize("engine", ["brick0", "last"])
def test_a_signal_whose_exception_native_code_swallowed_still_ends_a_build(tmp_path, monkeypatch, engine):
    """A handler's KeyboardInterrupt raised inside a destructor or a native callback can be swallowed
    ("Exception ignored in ..."); the signal is noted too, and the build stops at its next step or,
    after its last engine, before it publishes anything."""
    import lego_export.cli_common as cli_common
    import lego_export.export.build as build
    from lego_export.checkpoint import read_config

    real = build.onnx_export.clean_graph
    last = f"brick{len(read_config(CKPT).bricks) - 1}"

    def swallowed_signal(path):
        real(path)
        if path.stem == (last if engine == "last" else engine):
            cli_common._signalled.set()

    monkeypatch.setattr(build.onnx_export, "clean_graph", swallowed_signal)
    out = tmp_path / "e"
    args = ["build", "--ckpt", str(CKPT), "--out", str(out), "--max-batch", "2", "--no-fuse", "--no-verify"]
    result = CliRunner().invoke(export_main, args)
    refused(result, "interrupted; nothing partial was left behind")
    assert not out.exists() and not leftovers(tmp_path)


def test_two_builds_into_one_folder_do_not_both_succeed(tmp_path):
    out = tmp_path / "e"
    with folder_lock(out, "lego-export build"):
        result = CliRunner().invoke(export_main, ["build", "--ckpt", str(CKPT), "--out", str(out), "--max-batch", "2"])
    refused(result, "another lego-export build is writing to")
    assert not (out / "manifest.json").exists()


def test_build_refuses_a_folder_of_other_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "brick0.onnx").write_text("my own file")
    result = CliRunner().invoke(export_main, ["build", "--ckpt", str(CKPT), "--out", str(out), "--max-batch", "2"])
    refused(result, "is not an engines folder (it holds brick0.onnx)")
    assert (out / "brick0.onnx").read_text() == "my own file"


# -- resource blow-ups and hangs --------------------------------------------------------------------


def test_a_small_checkpoint_claiming_a_huge_model_is_refused_before_allocation(tmp_path):
    cfg = json.loads(get_preset("pg-tiny").to_json())
    for brick in cfg["bricks"]:
        brick["width"], brick["heads"] = 60000, 1
    header = json.dumps(
        {"__metadata__": {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(cfg)}}
    )
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    code = f"""
import resource, sys
from click.testing import CliRunner
from lego_export.cli import export_main
r = CliRunner().invoke(export_main, ["build", "--ckpt", {str(path)!r}, "--out", {str(tmp_path / "e")!r}])
print(r.exit_code, r.output.strip())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    status, rss = proc.stdout.strip().splitlines()[-2:]
    assert status.startswith("1 ") and "weights do not match the config" in status, proc.stdout + proc.stderr
    assert int(rss) < 2_000_000  # KiB: nowhere near the 50+ GB the claimed model would take


def test_a_huge_label_is_refused_before_allocation(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, images=np.zeros((4, 16, 16), np.uint8), labels=np.array([0, 1, 2, 10**9]))
    result = CliRunner().invoke(
        lego_train, ["--data", str(data), "--preset", "tiny", "--kimg", "1", "--out", str(tmp_path / "r")]
    )
    refused(result, "label 1000000000 is beyond")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--resolution", "100000x16"], "--resolution height must be an integer from 1 to 16384"),
        (["--resolution", "16384x16384", "--batch", "64", "--num", "64"], "needs about"),
        (["--num", str(10**9)], "Invalid value for '--num'"),
        (["--threads", "100000"], "Invalid value for '--threads'"),
        (["--batch", "0"], "Invalid value for '--batch'"),
        (["--seed", "-1"], "Invalid value for '--seed'"),
        (["--columns", "0"], "Invalid value for '--columns'"),
        (["--steps", "100000"], "Invalid value for '--steps'"),
        (["--t-break", "0.3"], "--t-break applies only when the late bricks are skipped"),
        (["--skip-policy", "2@nan:nan"], "--skip-policy rule '2@nan:nan': bounds must be numbers"),
        (["--s-max", "5"], "--s-max applies with --churn only"),
    ],
)
def test_limits_hold_before_anything_is_allocated(engines, tmp_path, args, message):
    start = time.perf_counter()
    refused(run(["--engines", engines, "--steps", 1, *args, "--out", tmp_path / "g.png"]), message)
    assert time.perf_counter() - start < 10 and not (tmp_path / "g.png").exists()


# -- tracebacks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d["model"]["bricks"][0].__setitem__("size", "4"), "model:"),
        (lambda d: d["engines"][1]["batch"].__setitem__("max", "x"), "engines[1].batch.max"),
        (lambda d: d["engines"][1]["batch"].__setitem__("min", 100), "expected min <= opt <= max"),
        (lambda d: d["engines"][0]["files"]["onnx"].__setitem__("sha256", 5), "files.onnx.sha256"),
        (lambda d: d["engines"][0]["files"]["onnx"].__setitem__("bytes", -1), "files.onnx.bytes"),
        (lambda d: d["engines"][2]["inputs"][0].__setitem__("shape", ["N", 3, 8, 9]), "engines.brick1: role, index"),
        (lambda d: d["engines"].pop(), "engines: expected embedder"),
        (lambda d: d.__setitem__("engines", {}), "engines: expected a list"),
        (lambda d: d.__setitem__("extra", 1), "unknown field 'extra'"),
        (lambda d: d["source"].__setitem__("sha256", "zz"), "source.sha256"),
        (lambda d: d["toolchain"].__setitem__("opset", 1e400), "not valid JSON"),
    ],
)
def test_every_manifest_field_is_checked(engines, tmp_path, change, message):
    if message == "not valid JSON":  # json.dumps writes Infinity for 1e400
        (engines / "manifest.json").write_text(
            (engines / "manifest.json").read_text().replace('"opset": 17', '"opset": Infinity')
        )
    else:
        edit_manifest(engines, change)
    for result in (
        run(["--engines", engines, "--steps", 1, "--out", tmp_path / "g.png"]),
        CliRunner().invoke(export_main, ["inspect", str(engines)]),
        CliRunner().invoke(export_main, ["verify", str(engines)]),
    ):
        refused(result, message if message != "not valid JSON" else "Infinity is not a number JSON allows")


def test_outputs_are_checked_before_sampling(engines, tmp_path):
    (tmp_path / "afile").write_text("x")
    cases = [
        (["--out", tmp_path / "afile" / "g.png"], "is not a folder"),
        (["--out", tmp_path], "is a folder"),
        (["--out-dir", tmp_path / "afile"], "is a file"),
    ]
    for args, message in cases:
        start = time.perf_counter()
        refused(run(["--engines", engines, "--steps", 500, "--num", 64, *args]), message)
        assert time.perf_counter() - start < 5  # refused before 500 steps of sampling


def test_bad_training_inputs_are_one_line(tmp_path, tiny_npz):
    empty = tmp_path / "empty.npz"
    np.savez(empty, images=np.zeros((0, 16, 16), np.uint8))
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes(tiny_npz.read_bytes()[:300])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train-state.pt").write_bytes(b"PK\x03\x04 not a torch file")
    cases = [
        (["--data", empty], "holds no images"),
        (["--data", truncated], "npz"),
        (["--data", tiny_npz, "--batch", "0"], "--batch must be from 1"),
        (["--data", tiny_npz, "--seed", "-1"], "--seed must be from 0"),
        (["--data", tiny_npz, "--resume", run_dir], "is not a readable training state"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        result = CliRunner().invoke(lego_train, [*map(str, args), "--preset", "tiny", "--kimg", "1", "--out", str(out)])
        refused(result, message)
        assert "weights_only" not in result.output


# -- manifests and engine files from elsewhere ------------------------------------------------------


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_engine_files_swapped_with_their_hashes_are_refused_at_load(engines, tmp_path, backend):
    pytest.importorskip(backend)

    def swap(data):
        by_name = {e["name"]: e for e in data["engines"]}
        by_name["brick0"]["files"], by_name["brick1"]["files"] = by_name["brick1"]["files"], by_name["brick0"]["files"]

    edit_manifest(engines, swap)
    args = ["--engines", engines, "--steps", 1, "--num", 1, "--backend", backend, "--out", tmp_path / "g.png"]
    refused(run(args), "the manifest; rebuild the engines")
    assert not (tmp_path / "g.png").exists()


def test_a_fifo_in_place_of_an_engine_file_is_refused_without_waiting(engines, tmp_path):
    (engines / "brick1.onnx").unlink()
    os.mkfifo(engines / "brick1.onnx")
    start = time.monotonic()
    refused(run(["--engines", engines, "--steps", 1, "--num", 1, "--out", tmp_path / "g.png"]), "not a regular file")
    (engines / "manifest.json").unlink()
    os.mkfifo(engines / "manifest.json")
    refused(run(["--engines", engines, "--steps", 1, "--out", tmp_path / "g.png"]), "is not a regular file")
    assert time.monotonic() - start < 30


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d["model"].pop("edm"), "model: missing field 'edm'"),
        (lambda d: d["model"].pop("img_channels"), "model: missing field 'img_channels'"),
        (lambda d: d["model"]["edm"].pop("sigma_max"), "model.edm: missing field 'sigma_max'"),
        (lambda d: d["model"]["bricks"][1].pop("pos_halves"), "model.bricks[1]: missing field 'pos_halves'"),
        (None, "nested deeper than"),
        (lambda d: d.__setitem__("class_names", ["a"] * 10), "class_names: expected one distinct name"),
    ],
)
def test_a_manifest_missing_a_field_or_nested_too_deep_is_refused(engines, tmp_path, change, message):
    if change is None:  # deeper than the standard library's parser can recurse: written by hand
        text = (engines / "manifest.json").read_text().rstrip()[:-1] + ', "deep": ' + "[" * 5000 + "]" * 5000 + "}"
        (engines / "manifest.json").write_text(text)
    else:
        edit_manifest(engines, change)
    refused(run(["--engines", engines, "--steps", 1, "--out", tmp_path / "g.png"]), message)


# -- outputs the system refuses ---------------------------------------------------------------------


def test_outputs_the_system_refuses_are_one_line(engines, tmp_path):
    tiny = [str(CKPT), "--max-batch", "2"]
    cases = [
        (lego_run, ["--engines", engines, "--steps", 1, "--num", 1, "--out", "/proc/lego.png"]),
        (lego_run, ["--engines", engines, "--steps", 1, "--num", 1, "--out", "/sys/lego.png"]),
        (export_main, ["build", "--ckpt", *tiny[:1], "--out", "/proc/lego-engines", *tiny[1:]]),
        (lego_train, ["--data", "fashion-mnist", "--out", "/proc/lego-run", "--kimg", "0.1"]),
    ]
    for command, args in cases:
        result = CliRunner().invoke(command, [str(a) for a in args])
        assert result.exit_code == 1 and "Traceback" not in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and ("/proc/" in result.output or "/sys/" in result.output)


def test_an_immutable_output_file_is_refused_before_sampling(engines, tmp_path):
    target = tmp_path / "g.png"
    target.write_bytes(b"mine")
    if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        result = run(["--engines", engines, "--steps", 1, "--num", 1, "--out", target])
        refused(result, f"--out {target}: cannot write there")
        assert "sampling" not in result.output  # refused before any work
    finally:
        subprocess.run(["chattr", "-i", str(target)], capture_output=True)
    assert target.read_bytes() == b"mine"


def test_written_files_follow_the_umask_like_any_other_file(engines, tmp_path):
    old = os.umask(0o022)
    try:
        assert run(["--engines", engines, "--steps", 1, "--num", 1, "--out", tmp_path / "g.png",
                    "--save-npz", tmp_path / "s.npz"]).exit_code == 0  # fmt: skip
    finally:
        os.umask(old)
    for name in ("g.png", "s.npz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_build_batch_ranges_are_checked(tmp_path):
    for flag in ("--opt-batch", "--max-batch"):
        result = CliRunner().invoke(
            export_main, ["build", "--ckpt", str(CKPT), "--out", str(tmp_path / "e"), flag, "-5"]
        )
        refused(result, f"Invalid value for '{flag}'")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("moment, sig", [("brick1.onnx", signal.SIGINT), ("brick2.ort.onnx", signal.SIGTERM)])
def test_a_signal_during_a_build_leaves_nothing_of_it(tmp_path, moment, sig):
    """At two moments of a build (brick 1 exported; brick 2's last file written, its verification
    ahead), a signal leaves a new --out folder absent and an old build whole."""
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    base = ["build", "--ckpt", str(CKPT), "--max-batch", "2"]
    assert CliRunner().invoke(export_main, [*base, "--out", str(old)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    for out, extra in ((fresh, []), (old, ["--force"])):
        staged = f".{out.name}.*.lego-staging/{moment}"  # the moment: its file in the build's staging folder
        reached = lambda _, staged=staged: any(tmp_path.glob(staged))  # noqa: E731
        status, text = signalled("lego-export", [*base, "--out", out, *extra], reached, sig)
        assert status == 1 and "interrupted; nothing partial was left behind" in text, text
        assert "Traceback" not in text
    assert not fresh.exists(), list(fresh.iterdir())
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before and not leftovers(tmp_path)


HOLDER = """
import fcntl, os, sys
folder = os.path.join(sys.argv[1], f".{sys.argv[2]}.{os.getpid()}.abcdef.lego-staging")
os.mkdir(folder)
fd = os.open(folder, os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print(folder, flush=True)
sys.stdin.read()  # holds the folder and its lock until the test closes our stdin
"""


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_build_killed_with_sigkill_leaves_the_old_folder_or_none_and_the_next_build_cleans_up(tmp_path):
    """kill -9 while brick 1 is being written (nothing can clean up): a new --out does not exist, an
    old one is whole; the next build succeeds without --force and removes the dead builds' staging
    folders, never a live builder's."""
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    base = ["build", "--ckpt", str(CKPT), "--max-batch", "2", "--no-fuse", "--no-verify"]
    assert CliRunner().invoke(export_main, [*base, "--out", str(old)]).exit_code == 0
    (old / "NOTES.md").write_text("my notes")
    before = folder_bytes(old)
    for out, extra in ((fresh, []), (old, ["--force"])):
        staged = f".{out.name}.*.lego-staging/brick1.onnx"
        status, text = signalled(
            "lego-export", [*base, "--out", out, *extra], lambda _, s=staged: any(tmp_path.glob(s)), signal.SIGKILL
        )
        assert status == -signal.SIGKILL, text
        # its staging folder stays until the next build (this one removed the previous killed build's)
        assert [name.split(".")[1] for name in leftovers(tmp_path)] == [out.name]
    assert not fresh.exists()
    assert folder_bytes(old) == before

    # A live builder's staging folder for fresh: the next build is refused and leaves it alone.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), fresh.name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        live = Path(holder.stdout.readline().strip())
        result = CliRunner().invoke(export_main, [*base, "--out", str(fresh)])
        refused(result, f"another lego-export build is writing to {fresh}")
        assert live.is_dir() and not fresh.exists()
    finally:
        holder.stdin.close()
        holder.wait(30)

    for out in (fresh, old):
        result = CliRunner().invoke(export_main, [*base, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert not Manifest.read(out).check_files(out)
    assert not leftovers(tmp_path)
    assert (old / "NOTES.md").read_text() == "my notes"


@pytest.mark.parametrize("exchange", [True, False])
def test_a_rebuild_replaces_the_folder_whole_keeping_what_is_not_the_builds(tmp_path, monkeypatch, exchange):
    """With the atomic exchange of two folders, and where the system has none (renamed aside first)."""
    import lego_export.atomic as atomic

    real = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: real(a, b) if exchange else False)
    out = tmp_path / "e"
    base = ["build", "--ckpt", str(CKPT), "--out", str(out), "--max-batch", "2", "--no-verify"]
    assert CliRunner().invoke(export_main, base).exit_code == 0
    assert (out / "brick0.ort.onnx").is_file()
    (out / "README.md").write_text("notes")
    (out / "sub").mkdir()
    (out / "sub" / "x.txt").write_text("x")
    out.chmod(0o750)
    inode = out.stat().st_ino
    assert CliRunner().invoke(export_main, [*base, "--no-fuse"]).exit_code == 0
    names = sorted(p.name for p in out.iterdir())
    # the fused files only the old build listed are gone; the notes and folder stay; a new folder in its place
    assert names == ["README.md", "brick0.onnx", "brick1.onnx", "brick2.onnx", "embedder.onnx", "manifest.json", "sub"]
    assert (out / "sub" / "x.txt").read_text() == "x" and (out / "README.md").read_text() == "notes"
    assert out.stat().st_ino != inode and out.stat().st_mode & 0o777 == 0o750
    assert not Manifest.read(out).check_files(out) and not leftovers(tmp_path)


def with_metadata(tmp_path: Path, **changes) -> Path:
    """A copy of the tiny checkpoint with its header's metadata fields changed (the weights as they were)."""
    data = CKPT.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"].update(changes)
    text = json.dumps(header).encode()
    path = tmp_path / "changed.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    return path


@pytest.mark.parametrize(
    "extra, message",
    [
        ("{not json", "metadata field 'extra' is not JSON"),
        ("[1, 2]", "metadata field 'extra' is not a JSON object"),
        (7, "metadata field 'extra' is not a string"),
    ],
)
def test_checkpoint_metadata_that_is_not_json_is_refused_naming_the_field(tmp_path, extra, message):
    ckpt = with_metadata(tmp_path, extra=extra)
    out = tmp_path / "e"
    result = CliRunner().invoke(export_main, ["build", "--ckpt", str(ckpt), "--out", str(out), "--max-batch", "2"])
    refused(result, message)
    assert not out.exists() and not leftovers(tmp_path)
    assert "JSONDecodeError" not in result.output


def test_a_manifest_of_tensorrt_plans_only_is_refused_naming_the_field(engines, tmp_path):
    def plans_only(data):
        for engine in data["engines"]:
            engine["files"] = {"tensorrt": engine["files"]["onnx"]}

    edit_manifest(engines, plans_only)
    import importlib.util

    backends = ["auto", "onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    for backend in backends:
        result = run(["--engines", engines, "--num", 1, "--backend", backend, "--out", tmp_path / "g.png"])
        refused(result, "manifest.json: engines[0].files.onnx: missing (embedder lists tensorrt)")
    assert not (tmp_path / "g.png").exists()


def test_a_decoder_without_its_onnx_file_is_refused_when_the_manifest_is_read(engines):
    """The decoder runs on ONNX Runtime under every backend: a decoder entry must list its ONNX file."""

    def plan_only_decoder(data):
        decoder = json.loads(json.dumps(data["engines"][0]))
        decoder.update(name="decoder", role="decoder", files={"tensorrt": decoder["files"]["onnx"]})
        data["engines"].append(decoder)

    edit_manifest(engines, plan_only_decoder)
    with pytest.raises(LegoError, match=r"engines\[4\]\.files\.onnx: missing; a decoder's portable ONNX file"):
        Manifest.read(engines)
