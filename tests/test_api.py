"""The Python API checks its arguments at its entry points: a value of the wrong type is a TypeError
naming the argument, a value out of range an OptionError naming the field, and settings are given by
keyword."""

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lego_export.edm import Churn, sample
from lego_export.errors import LegoError
from lego_export.manifest import Manifest
from lego_export.options import OptionError, SamplingOptions, check_request
from lego_export.runtime import LegoPipeline
from lego_export.runtime.backends import make_backend

TINY = Path(__file__).resolve().parent / "fixtures" / "tiny-engines"
CKPT = Path(__file__).resolve().parent / "fixtures" / "tiny-pg.safetensors"


@pytest.fixture(scope="module")
def pipe():
    return LegoPipeline.from_engines(TINY, "onnxruntime")


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda p: p.plan(5), "options"),
        (lambda p: p.plan(None), "options"),
        (lambda p: p.plan("heun"), "options"),
        (lambda p: p.options(5), "options"),
        (lambda p: p.options(recommended="no"), "recommended"),
        (lambda p: p(5, num=1), "options"),
        (lambda p: p({"steps": 2}, num=1), "options"),
        (lambda p: p(num=1, steps=2, recommended=1), "recommended"),
        (lambda p: p(num=1, steps=2, progress="bar"), "progress"),
    ],
)
def test_pipeline_arguments_of_the_wrong_type_are_type_errors_naming_them(pipe, call, argument):
    with pytest.raises(TypeError, match=f"^{argument} must be"):
        call(pipe)


def test_the_right_types_still_run(pipe):
    steps = pipe.plan(SamplingOptions(steps=3))
    assert len(steps) == 3
    assert pipe.options(SamplingOptions(steps=3)).steps == 3
    seen = []
    result = pipe(SamplingOptions(steps=2), num=4, progress=seen.append, indices=np.array([3]))
    assert result.images.shape == (1, 1, 16, 16) and seen
    assert result.labels.tolist() == [7]  # image 3 of 4: the fourth block of the 10 classes


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(folder=5), "folder"),
        (dict(backend=3), "backend"),
        (dict(ckpt=1.5), "ckpt"),
        (dict(device=0), "device"),
        (dict(threads="2"), "threads"),
        (dict(threads=True), "threads"),
        (dict(cuda_graphs="no"), "cuda_graphs"),
        (dict(profile=1), "profile"),
        (dict(precision=16), "precision"),
    ],
)
def test_from_engines_checks_its_argument_types(kwargs, argument):
    folder = kwargs.pop("folder", TINY)
    with pytest.raises(TypeError, match=f"^{argument} must be"):
        LegoPipeline.from_engines(folder, **kwargs)


def test_manifest_read_checks_its_argument_type():
    with pytest.raises(TypeError, match="^folder must be a path"):
        Manifest.read(5)
    assert Manifest.read(str(TINY)).model.bricks


@pytest.mark.parametrize(
    "kwargs, field, library_words",
    [
        (dict(name="nope"), "backend", "backend must be one of"),
        (dict(name="onnxruntime", precision="fp8"), "precision", "precision must be one of"),
        (dict(name="onnxruntime", precision="bf16"), "precision", "precision bf16 runs on openvino only"),
        (dict(name="torch"), "ckpt", "ckpt is needed by the torch backend"),
        (dict(name="torch", ckpt=str(Path(__file__))), "ckpt", "is not the checkpoint these engines were built"),
        (dict(name="tensorrt", streams=2), "streams", "streams 2: parallel engine streams"),
    ],
)
def test_backend_errors_name_arguments_not_flags(kwargs, field, library_words):
    with pytest.raises(OptionError) as caught:
        make_backend(kwargs.pop("name"), TINY, Manifest.read(TINY), **kwargs)
    assert caught.value.field == field and library_words in str(caught.value)
    assert "--" not in str(caught.value)  # each command line maps the field to its flag
    assert str(caught.value.renamed({field: f"--{field}"})).startswith(f"--{field} ")


def test_threads_out_of_range_is_an_option_error():
    with pytest.raises(OptionError) as caught:
        LegoPipeline.from_engines(TINY, "onnxruntime", threads=-1)
    assert caught.value.field == "threads"


def test_settings_are_keyword_only():
    for fn, settings in (
        (sample, ("method", "on_step", "churn", "fresh_noise")),
        (check_request, ("num", "batch", "seed", "canvas", "channels", "indices")),
    ):
        params = inspect.signature(fn).parameters
        assert all(params[s].kind is inspect.Parameter.KEYWORD_ONLY for s in settings), fn
    from lego_export.tune import Tuner

    params = inspect.signature(Tuner).parameters
    assert [n for n, p in params.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY] == [
        "pipe",
        "features",
        "reference",
    ]
    manifest = Manifest.read(TINY)
    with pytest.raises(TypeError):
        Manifest(manifest.model, manifest.source, manifest.toolchain, manifest.engines)
    copy = Manifest(
        model=manifest.model, source=manifest.source, toolchain=manifest.toolchain, engines=manifest.engines
    )
    assert copy.engines == manifest.engines and copy.recommended is None
    with pytest.raises(TypeError):
        check_request(1, 1, 0, (16, 16), 1)
    with pytest.raises(TypeError):
        sample(lambda x, s, i: x, np.zeros(2), np.array([1.0, 0.0]), "euler")


def test_check_request_refuses_indices_that_are_not_a_list():
    base = dict(num=1, batch=1, seed=0, canvas=(16, 16), channels=1)
    check_request(**base, indices=[0])
    for indices in (5, "12", [1], [-1]):  # image 1 of num=1 does not exist: its class would be out of range
        with pytest.raises(OptionError) as caught:
            check_request(**base, indices=indices)
        assert caught.value.field == "indices"


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(denoise=None), "denoise"),
        (dict(sigmas=3.0), "sigmas"),
        (dict(sigmas=np.array([80.0])), "sigmas"),
        (dict(method=2), "method"),
        (dict(on_step="log"), "on_step"),
        (dict(churn=10), "churn"),
        (dict(churn=Churn(s_churn=10)), "fresh_noise"),
    ],
)
def test_sample_checks_its_argument_types(kwargs, argument):
    args = dict(denoise=lambda x, s, i: x * 0, noise=np.ones(2), sigmas=np.array([2.0, 1.0, 0.0]))
    args.update(kwargs)
    positional = [args.pop(k) for k in ("denoise", "noise", "sigmas")]
    with pytest.raises(TypeError, match=f"^{argument} (must be|is needed)"):
        sample(*positional, **args)


def test_sample_by_keyword_runs_the_method_asked_for():
    # D = 0: the probability-flow ODE shrinks x in proportion to sigma: Euler and Heun both land on 0.
    out = {m: sample(lambda x, s, i: x * 0, np.ones(2), np.array([2.0, 1.0, 0.0]), method=m) for m in ("euler", "heun")}
    assert all(np.allclose(v, 0.0) for v in out.values())
    halfway = sample(lambda x, s, i: x * 0, np.ones(2), np.array([2.0, 1.0]), method="euler")
    assert np.allclose(halfway, 1.0)  # x = 2 at sigma 2, scaled with sigma to 1


def test_a_tensorrt_only_manifest_is_refused_naming_the_field(tmp_path):
    folder = tmp_path / "plans-only"
    shutil.copytree(TINY, folder)
    data = json.loads((folder / "manifest.json").read_text())
    for engine in data["engines"]:
        engine["files"] = {"tensorrt": engine["files"]["onnx"]}
    (folder / "manifest.json").write_text(json.dumps(data))
    backends = ["onnxruntime", "auto"]
    try:
        import openvino  # noqa: F401

        backends.append("openvino")
    except ImportError:
        pass
    for backend in backends:
        with pytest.raises(LegoError) as caught:
            LegoPipeline.from_engines(folder, backend)
        assert "engines[0].files.onnx: missing (embedder lists tensorrt)" in str(caught.value), backend
