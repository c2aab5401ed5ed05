"""lego-export build --int8 and lego-run --precision: int8 brick graphs, verified, run on ONNX Runtime
and OpenVINO; bf16 on OpenVINO; every wrong combination refused in one line."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from lego_export.checkpoint import save_checkpoint
from lego_export.cli import export_main
from lego_export.config import get_preset
from lego_export.export import quantize
from lego_export.export.verify import TOLERANCE
from lego_export.manifest import Manifest
from lego_export.model import LegoModel
from lego_export.runtime.cli import main as lego_run

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


def export(*args):
    return CliRunner().invoke(export_main, [str(a) for a in args])


def run(*args):
    return CliRunner().invoke(lego_run, [str(a) for a in args])


def refused(result, message):
    """Exit status 1, the message, one line, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A pg-tiny model built with --int8. Random weights, with adaLN biases near one so that attention
    and MLP (what int8 changes) reach the output, as in a trained model; with adaLN-Zero's small gates
    the int8 error would hide below 1e-3."""
    root = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    model = LegoModel(get_preset("pg-tiny"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.05)
            if "ada_ln" in name and name.endswith("bias"):
                p.normal_(1.0, 0.2)
    ckpt = root / "tiny.safetensors"
    save_checkpoint(ckpt, model)
    engines = root / "engines"
    result = export("build", "--ckpt", ckpt, "--out", engines, "--int8", "--max-batch", 4, "--opt-batch", 2)
    assert result.exit_code == 0, result.output
    return ckpt, engines


def test_int8_build_writes_verified_int8_bricks(built):
    ckpt, engines = built
    manifest = Manifest.read(engines)
    assert set(manifest.embedder.files) == {"onnx"}  # the embedder stays fp32
    for spec in manifest.bricks:
        f = spec.files["onnx-int8"]
        assert f.path == f"{spec.name}.int8.onnx" and f.precision == "int8"
        v = f.verification
        assert v["passed"] and v["tolerance"] == TOLERANCE["int8"]
        # lossy, measurably (fp32 is ~1e-7 here), and well inside its tolerance
        assert 1e-4 < v["relative_error"] < TOLERANCE["int8"] / 4, v
        assert f.build["calibration_images"] == quantize.CALIBRATION_IMAGES
        assert f.bytes < spec.files["onnx"].bytes  # int8 weights
    assert manifest.check_files(engines) == []
    assert "onnx-int8" in export("inspect", engines).output
    again = export("verify", engines, "--ckpt", ckpt)  # parity re-checked with the int8 tolerance
    assert again.exit_code == 0 and "FAIL" not in again.output and "brick2.int8.onnx" in again.output, again.output


def test_int8_graph_quantizes_matrix_products_and_keeps_the_rest_fp32(built):
    _, engines = built
    graph = onnx.load(str(engines / "brick1.int8.onnx")).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    initializers = {i.name for i in graph.initializer}
    keep = re.compile("|".join(rule for _, rule in quantize.KEEP_FP32))

    def fed_by_dequantize(node):
        return all(producer.get(i) == "DequantizeLinear" for i in node.input if i not in initializers)

    products = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    quantized = [n.name for n in products if fed_by_dequantize(n)]
    kept = [n.name for n in products if keep.search(n.name)]
    # qkv, proj and both MLP layers of the one block are int8; attention products, adaLN and the
    # final projection read fp32 tensors only
    assert sorted(re.sub(r"^/blocks\.\d+/", "", n) for n in quantized) == sorted(
        ["attn/qkv/MatMul", "attn/proj/MatMul", "mlp/mlp.0/MatMul", "mlp/mlp.2/MatMul"]
    )
    assert kept and not any(
        producer.get(i) == "DequantizeLinear" for n in products if keep.search(n.name) for i in n.input
    )
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= 4
    weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(weights) == 4  # one int8 weight matrix per quantized product
    # nothing but those products reads a dequantized tensor (Shape reads only its shape), and their
    # outputs stay fp32: LayerNorm, softmax, GELU, bias and residual adds compute in fp32
    dequantized = {out for n in graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    readers = {n.op_type for n in graph.node if dequantized & set(n.input)}
    assert readers <= {"MatMul", "Shape"} and "MatMul" in readers, readers
    assert not any(producer.get(n.input[0]) == "MatMul" for n in graph.node if n.op_type == "QuantizeLinear")


def test_smoothing_leaves_the_function_unchanged(built):
    from lego_export.checkpoint import load_model
    from lego_export.export.verify import record_engine_inputs

    ckpt, _ = built
    model = load_model(ckpt)
    rows = record_engine_inputs(model, 4)["brick1"]
    smooth = quantize.smoothed(model.bricks[1], rows)
    tiles, cond = torch.from_numpy(rows["tiles"]), torch.from_numpy(rows["cond"])
    with torch.no_grad():
        ref, out = model.bricks[1](tiles, cond), smooth(tiles, cond)
    assert not torch.equal(smooth.blocks[0].attn.qkv.weight, model.bricks[1].blocks[0].attn.qkv.weight)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def _images(engines, tmp_path, tag, *args):
    npz = tmp_path / f"{tag}.npz"
    out = tmp_path / f"{tag}.png"
    result = run(
        "--engines", engines, "--steps", 4, "--sampler", "dpm2m", "--num", 4, "--out", out, "--save-npz", npz, *args
    )
    assert result.exit_code == 0, result.output
    return np.load(npz)["images"], result.output


@pytest.mark.parametrize(
    "backend, precision",
    [
        ("onnxruntime", "int8"),
        pytest.param("openvino", "int8", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="no openvino")),
        pytest.param("openvino", "bf16", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="no openvino")),
    ],
)
def test_lower_precision_changes_the_images_a_little(built, tmp_path, backend, precision):
    _, engines = built
    if precision == "bf16":
        import openvino

        if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            refused(run("--engines", engines, "--backend", backend, "--precision", "bf16"), "no bf16 units")
            return
    fp32, _ = _images(engines, tmp_path, "fp32", "--backend", backend)
    low, output = _images(engines, tmp_path, precision, "--backend", backend, "--precision", precision)
    diff = np.abs(low - fp32)
    # measured: int8 mean 0.0018, max 0.010; bf16 0.0024, 0.016 (images in [-1, 1]); fp32 of both backends agree to 1e-5
    assert 2e-4 < diff.mean() < 0.02 and diff.max() < 0.15, (diff.mean(), diff.max())
    files = "int8" if precision == "int8" else "fp32"
    assert f"brick files {files}, runtime precision {precision}" in output


def test_int8_needs_int8_files(tmp_path):
    # the committed tiny engines were built without --int8
    refused(run("--engines", FIXTURES / "tiny-engines", "--precision", "int8"), "rebuild with lego-export build --int8")
    if HAS_OPENVINO:
        refused(
            run("--engines", FIXTURES / "tiny-engines", "--precision", "int8", "--backend", "openvino"),
            "rebuild with lego-export build --int8",
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--precision", "bf16", "--backend", "onnxruntime"], "bf16 runs on openvino only"),
        (["--precision", "int8", "--backend", "tensorrt"], "int8 runs on onnxruntime and openvino only"),
    ],
)
def test_precision_a_backend_cannot_run_is_refused(built, args, message):
    _, engines = built
    refused(run("--engines", engines, *args), message)


def test_a_tampered_int8_file_is_refused(built, tmp_path):
    _, engines = built
    copy = tmp_path / "copy"
    shutil.copytree(engines, copy)
    data = bytearray((copy / "brick1.int8.onnx").read_bytes())
    data[-100] ^= 0xFF
    (copy / "brick1.int8.onnx").write_bytes(bytes(data))
    bad = export("verify", copy)
    assert bad.exit_code == 1 and "brick1.int8.onnx: sha256 differs" in bad.output, bad.output
    refused(run("--engines", copy, "--precision", "int8", "--num", 1, "--steps", 1), "brick1.int8.onnx: sha256 differs")


def test_int8_with_fp16_tensorrt_or_from_onnx_is_refused(built, tmp_path):
    ckpt, engines = built
    refused(export("build", "--ckpt", ckpt, "--out", tmp_path / "a", "--int8", "--fp16"), "do not combine")
    refused(export("build", "--ckpt", ckpt, "--out", tmp_path / "b", "--int8", "--target", "tensorrt"), "TensorRT")
    refused(export("build", "--from-onnx", engines, "--target", "tensorrt", "--int8"), "--int8 needs --ckpt")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_rebuild_without_int8_removes_the_int8_files(built, tmp_path):
    ckpt, engines = built
    copy = tmp_path / "copy"
    shutil.copytree(engines, copy)
    result = export("build", "--ckpt", ckpt, "--out", copy, "--max-batch", 4, "--no-fuse")
    assert result.exit_code == 0, result.output
    assert not list(copy.glob("*.int8.onnx")) and not list(copy.glob("*.smoothed.onnx"))
    assert all("onnx-int8" not in e.files for e in Manifest.read(copy).engines)


def test_int8_runs_without_torch(built, tmp_path):
    """The int8 runtime path imports no torch (a process where importing torch fails)."""
    _, engines = built
    backends = ["onnxruntime", "openvino"] if HAS_OPENVINO else ["onnxruntime"]
    code = f"""
import sys
sys.modules["torch"] = None  # any 'import torch' now raises ImportError
from lego_export.runtime.cli import main
for backend in {backends!r}:
    try:
        main(["--engines", {str(engines)!r}, "--steps", "2", "--num", "2", "--precision", "int8",
              "--backend", backend, "--out", {str(tmp_path)!r} + "/" + backend + ".png"])
    except SystemExit as e:
        assert e.code == 0, e.code
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert all((tmp_path / f"{b}.png").is_file() for b in backends)
