"""TensorRT path. TensorRT cannot be installed on the development and CI machines (no GPU, and its
wheels come from NVIDIA's own index), so the plan-building tests skip there with that reason."""

import importlib.util

import pytest

from lego_export.export.tensorrt import profile_shapes
from lego_export.manifest import EngineSpec, TensorSpec

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def test_profile_covers_n_only():
    spec = EngineSpec(
        "brick0",
        "brick",
        0,
        [TensorSpec("tiles", "float32", ["N", 3, 4, 4]), TensorSpec("cond", "float32", ["N", 128])],
        [TensorSpec("out", "float32", ["N", 1, 4, 4])],
        {"min": 1, "opt": 2048, "max": 4096},
        {},
    )
    shapes = profile_shapes(spec)
    assert shapes["tiles"] == ((1, 3, 4, 4), (2048, 3, 4, 4), (4096, 3, 4, 4))
    assert shapes["cond"] == ((1, 128), (2048, 128), (4096, 128))


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (needs an NVIDIA GPU machine)")
def test_build_plans_from_onnx(tmp_path):
    import torch
    from click.testing import CliRunner

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but there is no CUDA GPU")
    from lego_export.cli import export_main
    from lego_export.manifest import Manifest
    from tests.test_export import random_checkpoint

    ckpt = random_checkpoint(tmp_path / "m.safetensors", "pg-tiny")
    result = CliRunner().invoke(
        export_main,
        ["build", "--ckpt", str(ckpt), "--out", str(tmp_path / "e"), "--target", "tensorrt", "--max-batch", "4"],
    )
    assert result.exit_code == 0, result.output
    manifest = Manifest.read(tmp_path / "e")
    for e in manifest.engines:
        plan = e.files["tensorrt"]
        assert plan.build["compute_capability"] and plan.bytes > 0
