"""SamplingOptions: one type, one check, one recommended rule, for lego-run, the Python API and lego-serve."""

import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lego_export.edm import Churn
from lego_export.manifest import Manifest, Recommended
from lego_export.options import OptionError, SamplingOptions, parse_canvas, resolve
from lego_export.plan import plan
from lego_export.runtime.cli import main as lego_run
from lego_export.runtime.pipeline import LegoPipeline
from lego_export.serve.validation import Limits, RequestError, parse_image_request

TINY = Path(__file__).resolve().parent / "fixtures" / "tiny-engines"  # pg-tiny: 16 x 16, 10 classes
MODEL = Manifest.read(TINY).model
NAMES = ["tee", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
TUNED = SamplingOptions("euler", 3, "2@1:", reuse_residual=True)


@pytest.fixture
def engines(tmp_path) -> Path:
    """The tiny engines with class names and a recommended setting in their manifest."""
    folder = tmp_path / "engines"
    shutil.copytree(TINY, folder)
    manifest = Manifest.read(folder)
    manifest.class_names = NAMES
    manifest.recommended = Recommended(TUNED, manifest.source["sha256"], {"fid": 1.0})
    manifest.write(folder)
    return folder


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(steps=0), "steps"),
        (dict(steps=True), "steps"),
        (dict(sampler="ddim"), "sampler"),
        (dict(t_break=0.3), "t_break"),  # without skip="late" it would change nothing
        (dict(skip="late", t_break=float("nan")), "t_break"),
        (dict(skip="late", t_break=1.5), "t_break"),
        (dict(skip="2@nan:nan"), "skip"),
        (dict(skip="7@1:"), "skip"),
        (dict(guidance=float("inf")), "guidance"),
        (dict(guidance=-1e308), "guidance"),
        (dict(guidance_interval="4:14"), "guidance_interval"),  # without guidance it would change nothing
        (dict(guidance=2.0, guidance_interval="14:4"), "guidance_interval"),
        (dict(guidance=2.0, guidance_interval="nan:"), "guidance_interval"),
        (dict(guidance=2.0, guidance_interval="4"), "guidance_interval"),
        (dict(guidance=2.0, guidance_interval=4), "guidance_interval"),
        (dict(churn=Churn(10, s_min=-1)), "churn.s_min"),
        (dict(churn=Churn(10, s_max=float("nan"))), "churn.s_max"),
        (dict(churn=Churn(10), sampler="dpm2m"), "churn"),
        (dict(tile_shift="yes"), "tile_shift"),
        (dict(cache="3@1:"), "cache"),  # the tiny model has bricks 0-2
        (dict(cache="1@2:1"), "cache"),
        (dict(cache=5), "cache"),
        (dict(cache="1@1:", forecast=3), "forecast"),
        (dict(cache="1@1:", forecast=1.5), "forecast"),
        (dict(forecast=1), "forecast"),  # nothing is cached: it would change nothing
        (dict(gate=-0.1), "gate"),
        (dict(gate=float("nan")), "gate"),
        (dict(gate=True), "gate"),
        (dict(gate=0.1, gate_signal="noise"), "gate_signal"),
        (dict(gate_signal="input"), "gate_signal"),  # without a gate it would change nothing
        (dict(guidance_cache="0:1"), "guidance_cache"),  # without guidance it would change nothing
        (dict(guidance=2.0, guidance_cache="1:0"), "guidance_cache"),
    ],
)
def test_every_bad_field_is_refused_by_name(change, field):
    with pytest.raises(OptionError) as caught:
        replace(SamplingOptions(), **change).validate(MODEL)
    assert caught.value.field == field and str(caught.value).startswith(field)


def test_the_plan_is_a_function_of_options_model_and_canvas():
    late = SamplingOptions(steps=10, skip="late", t_break=0.5)
    first, again = plan(late, MODEL, (16, 16)), plan(late, MODEL, (16, 16))
    assert first == again and sum(p.bricks < 3 for p in first) == 5  # the last half without brick 2
    assert all(p.shift == (0, 0) for p in first)
    wide = plan(late, MODEL, (16, 48), seed=3)
    assert any(p.shift != (0, 0) for p in wide)  # the tile grid moves above the training size
    assert all(p.shift == (0, 0) for p in plan(replace(late, tile_shift=False), MODEL, (16, 48)))
    with pytest.raises(Exception, match="not a multiple"):
        plan(late, MODEL, (17, 16))


def test_one_rule_for_the_recommended_setting():
    assert resolve({}, TUNED) == (TUNED, True)
    assert resolve({"guidance": 2.0}, TUNED) == (replace(TUNED, guidance=2.0), True)  # guidance combines
    for field, value in (("steps", 9), ("sampler", "heun"), ("skip", "none"), ("churn", Churn(5))):
        options, used = resolve({field: value}, TUNED)
        assert not used and options == replace(SamplingOptions(), **{field: value})
    assert resolve({}, None) == (SamplingOptions(), False)
    # A guided recommended setting: guidance given replaces its scale and interval together.
    guided = replace(TUNED, guidance=1.5, guidance_interval="0.3:3")
    assert resolve({}, guided) == (guided, True)
    assert resolve({"guidance": 2.0}, guided) == (replace(TUNED, guidance=2.0), True)  # every step
    assert resolve({"guidance": 1.0}, guided)[0].validate(MODEL) == TUNED  # guidance off, not an error
    assert resolve({"steps": 9}, guided)[0] == SamplingOptions(steps=9)
    with pytest.raises(OptionError, match="nonsense is not a sampling option"):
        resolve({"nonsense": 1}, TUNED)


def test_canvas_sizes_are_parsed_once():
    assert parse_canvas("32x96") == (32, 96) and parse_canvas("16X16") == (16, 16)
    for text in ("32", "ax3", "0x16", "16x99999", "1x2x3"):
        with pytest.raises(OptionError, match="^resolution"):
            parse_canvas(text)


def test_the_python_api_uses_the_recommended_setting_and_says_so(engines):
    pipe = LegoPipeline.from_engines(engines, "onnxruntime")
    tuned = pipe(num=2)
    assert tuned.recommended and tuned.options == TUNED
    np.testing.assert_array_equal(tuned.images, pipe(TUNED, num=2).images)
    plain = pipe(num=2, recommended=False)
    assert not plain.recommended and plain.options == SamplingOptions()
    assert pipe(num=2, steps=3).options == SamplingOptions(steps=3)
    assert np.abs(pipe(num=2, steps=3).images - tuned.images).max() > 1e-3


def test_api_arguments_are_refused_by_name(engines):
    pipe = LegoPipeline.from_engines(engines, "onnxruntime")
    for kwargs, field in (
        (dict(resolution=(32,)), "resolution"),
        (dict(resolution=(16, "16")), "resolution"),
        (dict(classes=["nope"]), "classes"),
        (dict(classes=[1.5]), "classes"),
        (dict(classes=[10]), "classes"),
        (dict(classes="tee"), "classes"),
        (dict(indices=[-1]), "indices"),
        (dict(indices=[]), "indices"),
        (dict(num=0), "num"),
        (dict(steps="8"), "steps"),
    ):
        with pytest.raises(OptionError) as caught:
            pipe(num=kwargs.pop("num", 2), **kwargs)
        assert caught.value.field == field, (kwargs, caught.value)


def test_classes_by_name_everywhere(engines, tmp_path):
    pipe = LegoPipeline.from_engines(engines, "onnxruntime")
    by_name = pipe(num=2, classes=["Sneaker", "bag"], steps=2)
    assert by_name.labels.tolist() == [7, 8]
    np.testing.assert_array_equal(by_name.images, pipe(num=2, classes=[7, 8], steps=2).images)
    args = ["--engines", str(engines), "--class", "sneaker", "--num", "1", "--steps", "2"]
    out = CliRunner().invoke(lego_run, [*args, "--save-npz", str(tmp_path / "s.npz"), "--out", str(tmp_path / "s.png")])
    assert out.exit_code == 0, out.output
    assert np.load(tmp_path / "s.npz")["labels"].tolist() == [7]
    req = parse_image_request({"class": "sneaker", "steps": 2}, Manifest.read(engines), Limits())
    assert req.classes == [7]
    with pytest.raises(RequestError, match="^class must be class indices 0 to 9; names: tee"):
        parse_image_request({"class": "sneakers", "steps": 2}, Manifest.read(engines), Limits())


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_one_pipeline_runs_two_calls_at_once(engines, backend):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install '.[openvino]'): not tested")
    pipe = LegoPipeline.from_engines(engines, backend)
    a = dict(num=3, steps=4, seed=1, classes=[2])
    b = dict(num=2, steps=6, seed=9, resolution=(16, 32), skip="late", guidance=2.0)
    expected = [pipe(**a), pipe(**b)]
    results: dict[int, object] = {}
    start = threading.Barrier(2)

    def run(i, kwargs):
        start.wait()
        results[i] = pipe(**kwargs)

    threads = [threading.Thread(target=run, args=(i, k)) for i, k in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, want in enumerate(expected):
        got = results[i]
        np.testing.assert_array_equal(got.images, want.images)
        assert got.timing.engine_calls == want.timing.engine_calls  # each call counts its own engine calls
        assert got.timing.bricks_skipped == want.timing.bricks_skipped


def test_a_run_says_what_made_it(engines, tmp_path):
    args = ["--engines", str(engines), "--num", "2", "--cfg", "1.5", "--seed", "4", "--backend", "onnxruntime"]
    args += ["--out", str(tmp_path / "g.png"), "--out-dir", str(tmp_path / "each")]
    args += ["--timing-json", str(tmp_path / "t.json")]
    out = CliRunner().invoke(lego_run, args)
    assert out.exit_code == 0, out.output
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["options"] == replace(TUNED, guidance=1.5).to_dict() and record["recommended"]
    assert record["backend"] == "onnxruntime" and record["precision"] == {"files": "fp32", "runtime": "fp32"}
    assert record["canvas"] == [16, 16] and record["seed"] == 4 and record["images"] == 2
    for png in (tmp_path / "g.png", tmp_path / "each" / "000001.png"):
        made_by = json.loads(Image.open(png).text["lego-export"])
        assert made_by["options"] == record["options"] and all(record[k] == v for k, v in made_by.items())
    assert "brick files fp32, runtime precision fp32" in out.output
