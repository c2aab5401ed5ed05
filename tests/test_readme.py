"""Every command of README.md, run as a reader would run it: each ```bash line and the Python block.

The commands are read from the README itself, not copied here, so a line added there runs here (or
fails test_every_readme_command_is_run_or_skipped until it is). What changes on the way is mechanical
and listed below: FILES puts the committed tiny fixtures in place of the shipped model, the authors'
checkpoint, Fashion-MNIST and the classifier; SMALL makes counts small; APPEND adds arguments a line
needs to stay small or to run beside other tests (a free port). SKIPPED says, line by line, why a
command cannot run here. Each section runs in a folder of its own (pytest's tmp_path), with a copy of
the engines the Export section built, so no command writes into another's files.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # lego-run, lego-export, ... of this environment
TINY_CKPT = ROOT / "tests" / "fixtures" / "tiny-pg.safetensors"  # pg-tiny: 16 x 16, 10 classes
OFFICIAL = ROOT.parent / "shared" / "fixtures" / "official-lego" / "tiny-pg.pkl"  # the authors' format
TIMEOUT_S = 300  # one command; the tiny models take seconds
READY_S = 60  # lego-serve's start, until /healthz answers

# Lines that cannot run here, and why. Their text as in the README, less any trailing comment.
SKIPPED = {
    "make demo": "exports the shipped model (minutes); its lego-run lines run on the tiny engines in test_cli.py",
    "make test": "runs this test suite",
    "lego-export build --from-onnx engines/ --target tensorrt": "needs TensorRT and an NVIDIA GPU (test_tensorrt.py)",
    "serve run lego_export.serve.ray_app:build_app engines=$PWD/engines max_replicas=4 num_cpus=2": (
        "starts a Ray cluster of several processes; the Ray app is tested in test_serve.py"
    ),
    "apt-get install dataset-fashion-mnist": "installs a system package (root and the network)",
    "python benchmarks/feature_files.py": (
        "reads the Fashion-MNIST test set (the package above); test_benchmarks.py runs it on a made data set"
    ),
}
RUNNERS = ("lego-run", "lego-export", "lego-serve", "lego-train", "torchrun", "python", "curl")


def files(work: Path, port: int) -> list[tuple[str, str]]:
    """Stand-ins for the files the README names (regex, replacement), in order."""
    return [
        (r"checkpoints/fmnist-pg-s\.safetensors|\bCKPT\b", str(TINY_CKPT)),
        (r"LEGO-L-PG-64\.pkl", str(OFFICIAL)),
        (r"(?<=python )benchmarks/", f"{ROOT}/benchmarks/"),  # the scripts of this checkout, from any folder
        (r"--data fashion-mnist", f"--data {work / 'fashion.npz'}"),  # made by make_data
        (r"benchmarks/classifier/fmnist-features\.onnx", str(work / "features.onnx")),  # made by make_features
        (r"benchmarks/classifier/fmnist-test\.ref\.npz", str(work / "fashion.npz")),
        (r"\bsneaker\b", "7"),  # the tiny checkpoint stores no class names; 7 is Fashion-MNIST's sneaker
        (r"localhost:8000", f"127.0.0.1:{port}"),
        # torchrun's default rendezvous port may be taken by another test: a standalone one
        (r"^torchrun ", f"{sys.executable} -m torch.distributed.run --standalone "),
    ]


SMALL = [  # counts made small (regex, replacement)
    (r"(?<!\S)(--num|-n) \d+", r"\1 2"),
    (r"--steps \d+", "--steps 3"),
    (r"num=16", "num=2"),
    (r"--kimg (\d+)", lambda m: f"--kimg {int(m[1]) / 100_000:g}"),  # 2000 -> 0.02
    (r"--decay-kimg (\d+)", lambda m: f"--decay-kimg {int(m[1]) / 100_000:g}"),
    (r"--preset pg-s\b", "--preset pg-tiny"),  # the data made here is 16 x 16
    (r"--class 207", "--class 7"),  # the authors' tiny model has 10 classes
]
TRAIN = [("--preset", "pg-tiny"), ("--kimg", "0.01"), ("--batch", "4")]  # kimg: the default 1000, scaled as SMALL
APPEND = {  # command -> (flag, value) added where the line has no such flag (the flag's other spelling counts)
    "lego-run": [("--num", "2")],  # its default is 64 images
    "lego_export.runtime.cli": [("--num", "2")],  # under torchrun
    "lego-train": TRAIN,
    "lego_train.cli": TRAIN,  # under torchrun
    "lego-export tune": [("--quick", None), ("--reference-setting", "heun:4")],
    "lego-serve": [("--port", "{port}"), ("--no-calibrate", None)],
}
SPELLINGS = {"--num": ("--num", "-n", "--images")}


@dataclass(frozen=True)
class Command:
    section: str  # the heading above its block
    text: str  # continuation lines joined, trailing comment removed


def strip_comment(line: str) -> str:
    """The line without a trailing '# ...' outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_blocks(language: str) -> list[tuple[str, str]]:
    """(section, body) of every ```language block of the README."""
    blocks, section, body = [], "", None
    for line in README.read_text().splitlines():
        if body is None and line.startswith("#"):
            section = line.lstrip("#").strip()
        elif body is None and line.strip() == f"```{language}":
            body = []
        elif body is not None and line.strip() == "```":
            blocks.append((section, "\n".join(body)))
            body = None
        elif body is not None:
            body.append(line)
    return blocks


def readme_commands() -> list[Command]:
    """Every command line of the README's bash blocks."""
    commands = []
    for section, body in readme_blocks("bash"):
        joined = re.sub(r"\\\n\s*", "", body)
        commands += [Command(section, strip_comment(line)) for line in joined.splitlines() if strip_comment(line)]
    return commands


def rewrite(text: str, work: Path, port: int = 0) -> str:
    """A README command as run here: FILES, then SMALL, then APPEND."""
    for pattern, new in files(work, port) + SMALL:
        text = re.sub(pattern, new, text)
    for command, extra in APPEND.items():
        if command in text:
            for flag, value in extra:
                if not any(re.search(rf"(?<!\S){re.escape(f)}(?!\S)", text) for f in SPELLINGS.get(flag, [flag])):
                    text += f" {flag}" + ("" if value is None else f" {value.format(port=port)}")
    return text


def environment() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def run(text: str, cwd: Path) -> subprocess.CompletedProcess:
    """One command through bash (pipes, ';' and $PWD as a reader's shell has them); fails with its output."""
    done = subprocess.run(
        ["bash", "-c", text], cwd=cwd, env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, f"{text}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def section(name: str) -> list[Command]:
    found = [c for c in readme_commands() if c.section == name]
    assert found, f"no README section {name!r} with commands"
    return [c for c in found if c.text not in SKIPPED]


def run_section(name: str, cwd: Path, work: Path) -> list[subprocess.CompletedProcess]:
    return [run(rewrite(c.text, work), cwd) for c in section(name)]


SECTIONS = {  # the sections run below; a command in any other section must be in SKIPPED
    "Export": "exported",
    "Run": "test_run_section",
    "Serve": "test_serve_section",
    "Import the LEGO authors' checkpoints": "test_import_section",
    "Train": "test_train_section",
    "Tune": "test_tune_section",
}


def test_every_readme_command_is_run_or_skipped():
    commands = readme_commands()
    assert len(commands) > 30, "the README's bash blocks were not found"
    for c in commands:
        if c.text in SKIPPED:
            continue
        assert c.section in SECTIONS, f"{c.text!r} (section {c.section!r}) is neither run here nor in SKIPPED"
        assert c.text.split()[0] in RUNNERS, f"{c.text!r}: no way to run {c.text.split()[0]!r} here"
    texts = {c.text for c in commands}
    assert not set(SKIPPED) - texts, f"SKIPPED names lines the README no longer has: {set(SKIPPED) - texts}"
    blocks = readme_blocks("python")
    assert [name for name, _ in blocks] == ["Run"], "a Python block outside Run: give it a test"
    texts |= {blocks[0][1]}
    for pattern, _ in files(Path("/w"), 1) + SMALL:  # every stand-in and count rule still does something
        assert any(re.search(pattern, t, flags=re.M) for t in texts), f"{pattern!r} matches no README command"


# -- the sections ---------------------------------------------------------------------------------------


def make_data(work: Path) -> None:
    """A stand-in for Fashion-MNIST: 64 16 x 16 images of 10 classes (a bright square whose place is the class)."""
    labels = np.arange(64) % 10
    images = np.zeros((64, 16, 16), dtype=np.uint8)
    for i, k in enumerate(labels):
        y, x = divmod(int(k), 4)
        images[i, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4] = 255
    np.savez(work / "fashion.npz", images=images, labels=labels)


def make_features(work: Path) -> None:
    """A stand-in for the classifier's feature model: 1 x 16 x 16 images -> 6 features (a fixed projection)."""
    from onnx import TensorProto, helper, numpy_helper, save

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((256, 6)).astype(np.float32) / 16, "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["proj"]),
         helper.make_node("Tanh", ["proj"], ["features"])],  # fmt: skip
        "features",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 6])],
        [w],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(work / "features.onnx"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The Export section, run in order in one folder: engines/ (fp32, then with --int8), engines-fp16/,
    inspect and verify. Returns the folder; the other sections copy its engines."""
    work = tmp_path_factory.mktemp("readme")
    make_data(work)
    make_features(work)
    done = run_section("Export", work, work)
    inspected = next(d.stdout for c, d in zip(section("Export"), done, strict=True) if " inspect " in c.text)
    assert "int8" in inspected and "max error/peak" in inspected
    assert any(work.joinpath("engines-fp16").glob("*.onnx"))
    return work


def copy_engines(exported: Path, cwd: Path) -> None:
    shutil.copytree(exported / "engines", cwd / "engines")


def test_run_section(exported, tmp_path):
    copy_engines(exported, tmp_path)
    done = run_section("Run", tmp_path, exported)
    assert (tmp_path / "sneakers.png").is_file() and (tmp_path / "wide.png").is_file()
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2 and (tmp_path / "t.json").is_file()
    assert not any("//" in line for d in done for line in d.stdout.splitlines() if line.startswith("wrote "))


def test_python_block(exported, tmp_path):
    copy_engines(exported, tmp_path)
    (tmp_path / "block.py").write_text(rewrite(readme_blocks("python")[0][1], exported))
    run(f"{sys.executable} block.py", tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(server: subprocess.Popen, port: int) -> None:
    """Poll /healthz until it answers 200 (or the deadline passes, or the server exits)."""
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"lego-serve exited with {server.returncode}: {server.stderr.read()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"lego-serve did not answer /healthz within {READY_S} s")


def test_serve_section(exported, tmp_path):
    copy_engines(exported, tmp_path)
    port = free_port()
    commands = [rewrite(c.text, exported, port) for c in section("Serve")]
    starts = [c for c in commands if c.startswith("lego-serve ")]
    assert len(starts) == 1
    server = subprocess.Popen(
        shlex.split(starts[0]), cwd=tmp_path, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_until_healthy(server, port)
        for command in commands:
            if command in starts:
                continue
            done = run(command, tmp_path)
            if "-o grid.png" in command:
                assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG", command
            if "/metrics" in command:
                assert "lego_" in done.stdout
    finally:
        server.send_signal(signal.SIGTERM)  # lego-serve drains and exits 0
        server.wait(timeout=60)
    assert server.returncode == 0, server.stderr.read()[-3000:]


@pytest.mark.skipif(not OFFICIAL.is_file(), reason=f"the authors' fixture is not at {OFFICIAL}")
def test_import_section(exported, tmp_path):
    run_section("Import the LEGO authors' checkpoints", tmp_path, exported)
    assert (tmp_path / "dogs.png").is_file() and (tmp_path / "engines-l-pg-64" / "manifest.json").is_file()


def test_train_section(exported, tmp_path):
    """Each --resume line continues the run the first line made (they are alternatives in the README:
    the second stops at a count the first already passed)."""
    first = None
    for c in section("Train"):
        command = rewrite(c.text, exported)
        if "--resume" in command:
            shutil.rmtree(tmp_path / "runs" / "pg-s")
            shutil.copytree(first, tmp_path / "runs" / "pg-s")
        run(command, tmp_path)
        if first is None:
            first = shutil.copytree(tmp_path / "runs" / "pg-s", tmp_path / "first-run")
    for run_dir in ("pg-s", "pg-s-ddp"):
        written = {p.name for p in (tmp_path / "runs" / run_dir).iterdir()}
        assert {"model.safetensors", "train-state.pt", "log.jsonl"} <= written, run_dir


def test_tune_section(exported, tmp_path):
    copy_engines(exported, tmp_path)
    run_section("Tune", tmp_path, exported)
    from lego_export.manifest import Manifest

    assert Manifest.read(tmp_path / "engines").recommended is not None
    assert Manifest.read(tmp_path / "engines-2").recommended is not None
