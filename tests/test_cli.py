"""The command lines' edges: --version everywhere, --cfg-interval over the recommended guidance (lego-run
and lego-serve alike), outputs refused before sampling, the default grid and what is said about it, the
one parity measure of inspect and verify, and lego-serve's /docs without any other host."""

import importlib.metadata
import json
import re
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lego_export.cli import ERROR_NAME, export_main
from lego_export.manifest import Manifest, Recommended
from lego_export.options import SamplingOptions
from lego_export.runtime.cli import main as lego_run
from lego_export.serve.cli import main as lego_serve
from lego_export.serve.validation import Limits, RequestError, parse_image_request
from lego_train.cli import main as lego_train
from tests.conftest import run_torchrun

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny-engines"  # pg-tiny: 16 x 16, 10 classes, no int8 graphs
TINY_CKPT = ROOT / "tests" / "fixtures" / "tiny-pg.safetensors"
PAD = 2  # images.make_grid's border between cells
# A recommended setting that guides, as the shipped model's does: scale 1.5 at sigma 0.5 to 5 only.
GUIDED = SamplingOptions("euler", 8, guidance=1.5, guidance_interval="0.5:5")


def run(args) -> object:
    return CliRunner().invoke(lego_run, [str(a) for a in args])


def with_recommended(folder: Path, options: SamplingOptions) -> Path:
    """folder's manifest with options as the model's recommended setting."""
    manifest = Manifest.read(folder)
    manifest.recommended = Recommended(options, manifest.source["sha256"], {"fid": 1.0})
    manifest.write(folder)
    return folder


@pytest.fixture
def guided(tmp_path) -> Path:
    """The tiny engines whose recommended setting guides some of its steps."""
    shutil.copytree(TINY, tmp_path / "engines")
    return with_recommended(tmp_path / "engines", GUIDED)


def guided_sigmas(output: str) -> list[float]:
    """The sigmas of the steps --plan marks as guided."""
    return [float(m) for m in re.findall(r"^\s*\d+\s+([\d.]+)\s.*\(guided", output, flags=re.M)]


# -- --version ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command,name", [(lego_run, "lego-run"), (export_main, "lego-export"), (lego_serve, "lego-serve"),
                     (lego_train, "lego-train")],  # fmt: skip
)
def test_every_command_says_the_installed_package_version(command, name):
    result = CliRunner().invoke(command, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{name}, version {importlib.metadata.version('lego-export')}"


# -- --cfg-interval over the recommended setting's guidance ----------------------------------------------


def test_cfg_interval_alone_moves_the_recommended_guidance_to_those_steps(guided, tmp_path):
    recommended = run(["--engines", guided, "--plan"])
    moved = run(["--engines", guided, "--cfg-interval", "0:1", "--plan"])
    assert recommended.exit_code == 0 and moved.exit_code == 0, moved.output
    assert "the model's recommended" in moved.output and "cfg 1.5, at sigma 0:1" in moved.output
    sigmas = [float(s) for s in re.findall(r"^\s*\d+\s+([\d.]+)\s", moved.output, flags=re.M)]
    assert guided_sigmas(recommended.output) == [s for s in sigmas if 0.5 <= s <= 5]
    assert guided_sigmas(moved.output) == [s for s in sigmas if s <= 1] and guided_sigmas(moved.output)
    # and it samples: the run record says the recommended scale at the interval given
    timing = tmp_path / "t.json"
    args = ["--engines", guided, "--cfg-interval", "0:1", "--num", 2, "--out", tmp_path / "g.png"]
    assert run([*args, "--timing-json", timing]).exit_code == 0
    record = json.loads(timing.read_text())
    assert record["options"]["guidance"] == 1.5 and record["options"]["guidance_interval"] == "0:1"
    assert record["recommended"] is True


def test_cfg_interval_alone_is_still_refused_where_nothing_guides(tmp_path):
    unguided = with_recommended(shutil.copytree(TINY, tmp_path / "engines"), SamplingOptions("euler", 8))
    for engines in (unguided, TINY):  # a recommended setting that does not guide; none at all
        result = run(["--engines", engines, "--cfg-interval", "0:1", "--plan"])
        assert result.exit_code == 1 and "--cfg-interval applies only with guidance" in result.output
    # --cfg replaces the scale and guides every step, not the recommended interval
    every = run(["--engines", with_recommended(unguided, GUIDED), "--cfg", 2, "--plan"])
    assert every.exit_code == 0 and len(guided_sigmas(every.output)) == 8


def test_the_server_and_the_python_api_apply_cfg_interval_alone_to_the_recommended_guidance(guided):
    from lego_export.runtime.pipeline import LegoPipeline

    pipe = LegoPipeline.from_engines(guided, "onnxruntime")
    assert pipe.options(guidance_interval="0:1") == SamplingOptions("euler", 8, guidance=1.5, guidance_interval="0:1")
    assert pipe.options(guidance=2.0) == SamplingOptions("euler", 8, guidance=2.0)  # every step
    manifest = Manifest.read(guided)
    req = parse_image_request({"cfg_interval": "0:1"}, manifest, Limits())
    assert req.recommended and req.options.guidance == 1.5 and req.options.guidance_interval == "0:1"
    assert parse_image_request({"cfg": 2}, manifest, Limits()).options.guidance_interval is None
    with pytest.raises(RequestError, match="^cfg_interval applies only with guidance"):
        parse_image_request({"cfg_interval": "0:1", "recommended": False}, manifest, Limits())


# -- outputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--out", "--out-dir", "--save-npz", "--timing-json"])
def test_an_output_in_a_missing_folder_is_refused_before_sampling(tmp_path, option):
    missing = tmp_path / "nowhere"
    name = {"--out": "g.png", "--out-dir": "each", "--save-npz": "s.npz", "--timing-json": "t.json"}[option]
    start = time.perf_counter()
    result = run(["--engines", TINY, "--steps", 500, "--num", 64, option, missing / name])
    assert time.perf_counter() - start < 5  # refused before 500 steps of sampling
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"Error: {option} {missing / name}: the folder {missing} does not exist; create it first"]
    assert not missing.exists()


def test_without_out_the_grid_goes_to_the_current_folder_and_the_line_says_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(["--engines", TINY, "--steps", 2, "--num", 2, "--out-dir", "samples/", "--save-npz", "s.npz"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grid.png").is_file() and len(list((tmp_path / "samples").iterdir())) == 2
    said = result.output.strip().splitlines()[-1]
    assert said == f"wrote s.npz, samples/ (2 PNGs), grid.png (the default --out, in {tmp_path})"
    named = run(["--engines", TINY, "--steps", 2, "--num", 2, "--out", "mine.png"])
    assert named.output.strip().splitlines()[-1] == "wrote mine.png"


def grid_rows(png: Path, labels: np.ndarray, side: int) -> list[set[int]]:
    """The classes in each row of a grid PNG whose cells are side x side."""
    columns = (Image.open(png).width - PAD) // (side + PAD)
    return [set(labels[i : i + columns].tolist()) for i in range(0, len(labels), columns)]


@pytest.mark.parametrize("num,rows", [(20, 10), (30, 10), (64, 8)])
def test_by_default_each_grid_row_is_one_class_when_the_classes_divide_the_images(tmp_path, num, rows):
    args = ["--engines", TINY, "--steps", 2, "--num", num, "--out", tmp_path / "g.png", "--save-npz", tmp_path / "s"]
    assert run(args).exit_code == 0
    labels = np.load(tmp_path / "s.npz")["labels"]
    per_row = grid_rows(tmp_path / "g.png", labels, 16)
    assert len(per_row) == rows
    if num % 10 == 0:  # one class per row, every class once
        assert all(len(r) == 1 for r in per_row) and sorted(min(r) for r in per_row) == list(range(10))
    else:  # 64 images of 10 classes: blocks of 6 or 7, 8 columns, rows mix classes (as the README says)
        assert any(len(r) > 1 for r in per_row) and sorted(np.bincount(labels)) == [6] * 6 + [7] * 4


def test_the_makefile_demo_grids_have_one_class_per_row(tmp_path):
    """make demo's lego-run lines (README: "80 images, one row per class", "one class per row") on the
    tiny engines, built here with --int8 for the int8 line; outputs into tmp_path, each also saving labels."""
    engines = tmp_path / "engines"
    built = CliRunner().invoke(export_main, ["build", "--ckpt", str(TINY_CKPT), "--out", str(engines), "--int8"])
    assert built.exit_code == 0, built.output
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:")[1].split("\n\n")[0]
    lines = [shlex.split(line.strip())[1:] for line in recipe.splitlines() if "/lego-run " in line]
    assert len(lines) == 3
    for i, args in enumerate(lines):
        args = [str(tmp_path / a) if a.startswith("demo/") else a for a in args]
        args = [str(engines) if a == "engines" else a for a in args]
        (tmp_path / "demo").mkdir(exist_ok=True)
        result = run([*args, "--steps", 2, "--save-npz", tmp_path / f"labels{i}.npz"])
        assert result.exit_code == 0, (args, result.output)
        out = Path(args[args.index("--out") + 1])
        side = 16 if "--resolution" not in args else int(args[args.index("--resolution") + 1].split("x")[1])
        labels = np.load(tmp_path / f"labels{i}.npz")["labels"]
        cells = grid_rows(out, labels, side)
        assert all(len(r) == 1 for r in cells) and sorted(min(r) for r in cells) == list(range(10)), (args, cells)


# -- what is said, and when -----------------------------------------------------------------------------


def test_the_sampling_setting_is_announced_only_once_everything_is_checked(guided, tmp_path):
    ok = run(["--engines", guided, "--num", 2, "--out", tmp_path / "g.png"])
    assert ok.exit_code == 0 and ok.output.count("sampling setting: the model's recommended") == 1
    for bad in (["--class", 12], ["--precision", "int8"], ["--resolution", "16384x16384"]):
        result = run(["--engines", guided, "--num", 2, "--out", tmp_path / "g.png", *bad])
        assert result.exit_code == 1 and "sampling setting" not in result.output, (bad, result.output)


def test_under_torchrun_the_sampling_setting_is_announced_once(guided, tmp_path):
    args = ["--engines", str(guided), "-n", "4", "--threads", "1", "--out", str(tmp_path / "g.png")]
    done = run_torchrun("lego_export.runtime.cli", args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("sampling setting: the model's recommended") == 1, done.stdout


# -- inspect and verify: one measure, one name -------------------------------------------------------------


def test_inspect_and_verify_show_the_same_measure_under_the_same_name(tmp_path):
    engines = tmp_path / "engines"
    runner = CliRunner()
    built = runner.invoke(export_main, ["build", "--ckpt", str(TINY_CKPT), "--out", str(engines), "--int8"])
    assert built.exit_code == 0, built.output
    inspected = runner.invoke(export_main, ["inspect", str(engines)]).output
    verified = runner.invoke(export_main, ["verify", str(engines), "--ckpt", str(TINY_CKPT)])
    assert verified.exit_code == 0, verified.output
    assert ERROR_NAME in inspected.splitlines()[1] and f"{ERROR_NAME}: the largest |engine - PyTorch|" in inspected
    table = {m[0]: float(m[1]) for m in re.findall(r"^\S+\s+\S+\s+(\S+\.onnx)\s.*\s(\S+)$", inspected, flags=re.M)}
    again = dict(re.findall(rf"^ok\s+(\S+): {re.escape(ERROR_NAME)} (\S+) \(", verified.output, flags=re.M))
    assert set(table) == set(again) and any(".int8." in f for f in table)
    for name, value in table.items():  # verify measures on the build's own inputs: the same number
        assert float(again[name]) == pytest.approx(value, rel=0.02), (name, value, again[name])


# -- lego-serve's /docs ----------------------------------------------------------------------------------


def test_the_docs_page_loads_nothing_from_another_host():
    from fastapi.testclient import TestClient

    from lego_export.serve.app import create_app
    from lego_export.serve.cli import load_service, make_config

    service = load_service(make_config(engines=str(TINY), backend="onnxruntime", calibrate=False))
    try:
        with TestClient(create_app(service)) as http:
            page = http.get("/docs")
            fields = http.get("/openapi.json").json()["paths"]["/v1/images"]["post"]["requestBody"]
    finally:
        service.close(5.0)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert not re.search(r"https?:|//[\w.-]+\.\w", html), "an address of another host"
    assert not re.search(r"<(script|link|img|iframe)\b", html), "an element that loads something"
    properties = fields["content"]["application/json"]["schema"]["properties"]
    for name in properties:  # every request field of the document is on the page
        assert f"<code>{name}</code>" in html, name
    assert "/v1/images" in html and "maximum 64" in html  # routes, and the server's limits
