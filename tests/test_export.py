import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lego_export.checkpoint import load_model, save_checkpoint
from lego_export.cli import export_main
from lego_export.config import get_preset
from lego_export.export.verify import measure_error, record_engine_inputs
from lego_export.manifest import SCHEMA_VERSION, Manifest
from lego_export.model import LegoModel
from lego_export.runtime.backends import OnnxRuntimeRunner
from lego_export.tiling import tile, untile

PRESETS = ["pg-tiny", "pr-tiny", "u-tiny", "dit-tiny"]


def random_feeds(spec, n, rng):
    """Unit-scale inputs of an engine's shapes (c_noise over the sampling range, some null labels)."""
    feeds = {}
    for t in spec.inputs:
        shape = [n if d == "N" else d for d in t.shape]
        if t.name == "c_noise":
            value = np.log(rng.uniform(0.002, 80.0, size=shape)) / 4
        elif t.name == "class_onehot":
            value = np.eye(shape[1])[rng.integers(0, shape[1], size=n)] * (rng.random((n, 1)) > 0.2)
        else:
            value = rng.standard_normal(shape)
        feeds[t.name] = value.astype(np.float32)
    return feeds


def random_checkpoint(path, preset):
    torch.manual_seed(0)
    model = LegoModel(get_preset(preset))
    with torch.no_grad():  # non-zero outputs everywhere, so parity is a real check
        for p in model.parameters():
            p.normal_(0, 0.05)
    save_checkpoint(path, model)
    return path


def build(*args):
    return CliRunner().invoke(export_main, ["build", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every tiny preset exported once (fp32), shared by the tests below."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for preset in PRESETS:
        ckpt = random_checkpoint(root / f"{preset}.safetensors", preset)
        engines = root / f"engines-{preset}"
        result = build("--ckpt", ckpt, "--out", engines, "--max-batch", 4, "--opt-batch", 2)
        assert result.exit_code == 0, result.output
        out[preset] = (ckpt, engines)
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_manifest_lists_every_engine_verified(built, preset):
    ckpt, engines = built[preset]
    manifest = Manifest.read(engines)
    cfg = get_preset(preset)
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.model == cfg  # the typed config, EDM constants included, read back unchanged
    assert [e.name for e in manifest.bricks] == [f"brick{k}" for k in range(len(cfg.bricks))]
    assert len(manifest.source["sha256"]) == 64 and manifest.toolchain["opset"] == 17
    for e in manifest.engines:
        assert set(e.files) == ({"onnx", "onnx-ort"} if e.role == "brick" else {"onnx"})
        for f in e.files.values():
            v = f.verification
            assert v["passed"] and v["relative_error"] <= 1e-4 and len(v["batches"]) >= 3
            assert 1 in v["batches"] and e.batch["max"] in v["batches"]
    assert manifest.check_files(engines) == []
    brick0 = manifest.bricks[0]
    tiles = (cfg.img_resolution // cfg.bricks[0].size) ** 2
    assert brick0.batch == {"min": 1, "opt": 2 * tiles, "max": 4 * tiles}
    assert brick0.inputs[0].shape == ["N", 3, cfg.bricks[0].size, cfg.bricks[0].size]


@pytest.mark.parametrize("preset", ["pg-tiny", "u-tiny"])
def test_engines_match_pytorch_at_several_batch_sizes(built, preset):
    ckpt, engines = built[preset]
    model = load_model(ckpt)
    manifest = Manifest.read(engines)
    rng = np.random.default_rng(5)
    for spec in manifest.bricks:
        brick = model.bricks[spec.index]
        for fmt, f in spec.files.items():
            runner = OnnxRuntimeRunner(engines / f.path)
            for n in (1, 2, 7, spec.batch["max"]):
                feeds = random_feeds(spec, n, rng)
                with torch.no_grad():
                    ref = brick(torch.from_numpy(feeds["tiles"]), torch.from_numpy(feeds["cond"])).numpy()
                out = runner.infer(feeds)["out"]
                assert np.abs(ref).max() > 0.1  # a real signal, not zeros
                assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), (fmt, n)
    emb = OnnxRuntimeRunner(engines / manifest.embedder.files["onnx"].path)
    feeds = random_feeds(manifest.embedder, 5, rng)
    with torch.no_grad():
        ref = model.embedder(torch.from_numpy(feeds["c_noise"]), torch.from_numpy(feeds["class_onehot"])).numpy()
    np.testing.assert_allclose(emb.infer(feeds)["cond"], ref, atol=1e-5 * np.abs(ref).max())


def test_fused_graph_really_fuses(built):
    _, engines = built["pg-tiny"]
    ops = {n.op_type for n in onnx.load(str(engines / "brick2.ort.onnx")).graph.node}
    assert {"MultiHeadAttention", "SkipLayerNormalization"} <= ops
    assert "MultiHeadAttention" not in {n.op_type for n in onnx.load(str(engines / "brick2.onnx")).graph.node}


def test_fp16_changes_precision_and_stays_within_tolerance(built, tmp_path):
    ckpt, engines32 = built["pg-tiny"]
    result = build("--ckpt", ckpt, "--out", tmp_path / "e16", "--fp16", "--max-batch", 4)
    assert result.exit_code == 0, result.output
    m16, m32 = Manifest.read(tmp_path / "e16"), Manifest.read(engines32)
    for b16, b32 in zip(m16.bricks, m32.bricks, strict=True):
        f16 = b16.files["onnx"]
        assert f16.precision == "fp16" and set(b16.files) == {"onnx"}
        graph = onnx.load(str(tmp_path / "e16" / f16.path)).graph
        half = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
        assert half, "no weights were converted to fp16"
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O
        # LayerNorm and softmax stay fp32: no LayerNormalization node reads a half tensor directly
        assert all(n.op_type != "LayerNormalization" or "Cast" not in n.input[0] for n in graph.node)
        assert f16.verification["passed"] and f16.verification["relative_error"] <= 1e-2
        # the fp16 error is visibly larger than fp32: the option did something
        assert f16.verification["relative_error"] > 10 * b32.files["onnx"].verification["relative_error"]
        assert f16.bytes < b32.files["onnx"].bytes  # half-size weights (adaLN weights stay fp32)
    from lego_export.runtime.cli import main as lego_run

    ran = CliRunner().invoke(lego_run, ["--engines", str(tmp_path / "e16"), "--steps", "1", "--num", "1",
                                        "--backend", "onnxruntime", "--out", str(tmp_path / "g.png")])  # fmt: skip
    assert ran.exit_code == 0 and "brick files fp16, runtime precision fp32" in ran.output, ran.output


def test_tampered_engine_is_detected(built, tmp_path):
    import shutil

    ckpt, engines = built["pg-tiny"]
    copy = tmp_path / "copy"
    shutil.copytree(engines, copy)
    ok = CliRunner().invoke(export_main, ["verify", str(copy), "--ckpt", str(ckpt)])
    assert ok.exit_code == 0 and "FAIL" not in ok.output, ok.output
    data = bytearray((copy / "brick1.onnx").read_bytes())
    data[-100] ^= 0xFF
    (copy / "brick1.onnx").write_bytes(bytes(data))
    bad = CliRunner().invoke(export_main, ["verify", str(copy)])
    assert bad.exit_code != 0
    assert "brick1.onnx: sha256 differs" in bad.output and "Traceback" not in bad.output


def test_inspect_prints_a_table(built):
    _, engines = built["pr-tiny"]
    result = CliRunner().invoke(export_main, ["inspect", str(engines)])
    assert result.exit_code == 0
    for word in ("embedder", "brick0", "brick2", "onnx-ort", "tiles[Nx3x16x16]", "max error/peak"):
        assert word in result.output


def test_refusals_are_one_line(built, tmp_path):
    ckpt, engines = built["pg-tiny"]
    other, _ = built["pr-tiny"]
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    cases = [
        (["--ckpt", tmp_path / "missing.safetensors"], "checkpoint not found"),
        (["--ckpt", foreign], "not a LEGO checkpoint"),
        (["--ckpt", ckpt, "--target", "coreml"], "Invalid value for '--target'"),
        (["--ckpt", other, "--out", engines], "holds engines of another checkpoint"),
        (["--ckpt", ckpt, "--opset", "9"], "--opset 9 is not supported"),
        ([], "give --ckpt"),
    ]
    for args, message in cases:
        result = build(*args)
        assert result.exit_code != 0, args
        assert message in result.output and "Traceback" not in result.output, result.output
    assert Manifest.read(engines).source["checkpoint"] == "pg-tiny.safetensors"  # untouched


def test_failed_verification_leaves_nothing(built, tmp_path, monkeypatch):
    from lego_export.export import verify

    ckpt, _ = built["pg-tiny"]
    monkeypatch.setitem(verify.TOLERANCE, "fp32", 1e-12)
    out = tmp_path / "never"
    result = build("--ckpt", ckpt, "--out", out, "--max-batch", 2)
    assert result.exit_code != 0 and "exceeds the fp32 tolerance" in result.output
    assert not out.exists() or not any(out.iterdir())
    assert not list(tmp_path.glob(".never*"))


def test_tensorrt_target_without_tensorrt_keeps_onnx(built, tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed: this test covers machines without it")
    except ImportError:
        pass
    ckpt, _ = built["dit-tiny"]
    out = tmp_path / "trt"
    result = build("--ckpt", ckpt, "--out", out, "--target", "tensorrt", "--max-batch", 2)
    assert result.exit_code != 0 and "TensorRT is not installed" in result.output
    assert len(result.output.strip().splitlines()) == 1
    manifest = Manifest.read(out)
    assert all("tensorrt" not in e.files for e in manifest.engines) and manifest.check_files(out) == []


def test_manifest_is_plain_json(built):
    _, engines = built["dit-tiny"]
    data = json.loads((engines / "manifest.json").read_text())
    assert {"schema_version", "model", "source", "toolchain", "engines", "latent", "recommended", "class_names"} == set(
        data
    )
    assert data["latent"] is None
    assert data["model"]["edm"]["sigma_max"] == 80.0
    (engines / "manifest.json").write_text("{broken")
    with pytest.raises(Exception, match="not valid JSON"):
        Manifest.read(engines)
    (engines / "manifest.json").write_text(json.dumps(data))


def test_verification_feeds_what_the_runtime_sees(built):
    """Brick k > 0 is verified on tiles that hold brick k-1's real output, with the embedder's real
    conditioning, at noise levels along the sampling schedule."""
    ckpt, _ = built["pg-tiny"]
    model = load_model(ckpt)
    cfg = model.cfg
    recorded = record_engine_inputs(model, images=3)
    c_noise = recorded["embedder"]["c_noise"]
    assert c_noise.shape == (3,) and np.all(
        (np.log(0.002) / 4 - 1e-6 <= c_noise) & (c_noise <= np.log(80.0) / 4 + 1e-6)
    )
    res = cfg.img_resolution
    with torch.no_grad():
        cond = model.embedder(torch.from_numpy(c_noise), torch.from_numpy(recorded["embedder"]["class_onehot"]))
        for k in range(1, len(cfg.bricks)):
            prev, now = recorded[f"brick{k - 1}"], recorded[f"brick{k}"]
            np.testing.assert_allclose(now["cond"][:: (res // cfg.bricks[k].size) ** 2], cond.numpy(), atol=1e-6)
            out = model.bricks[k - 1](torch.from_numpy(prev["tiles"]), torch.from_numpy(prev["cond"]))
            expected = tile(untile(out, 3, res, res), cfg.bricks[k].size).numpy()
            np.testing.assert_allclose(now["tiles"][:, : cfg.img_channels], expected, atol=1e-6)


def test_an_engine_returning_nan_fails_verification(built):
    ckpt, engines = built["pg-tiny"]
    model = load_model(ckpt)
    spec = Manifest.read(engines).bricks[0]
    recorded = record_engine_inputs(model, images=4)

    class NaNRunner:
        def infer(self, feeds):
            out = model.bricks[0](*(torch.from_numpy(feeds[t.name]) for t in spec.inputs)).detach().numpy()
            out[0, 0, 0, 0] = np.nan
            return {"out": out}

    result = measure_error(model.bricks[0], NaNRunner(), spec, "fp32", recorded)
    assert not result["passed"] and result["relative_error"] == float("inf")


def test_plans_from_onnx_are_published_with_the_folder_in_one_move(built, tmp_path, monkeypatch):
    """lego-export build --from-onnx publishes like a build: the new folder (ONNX files carried over,
    plans added, the manifest listing them) replaces the old one in one rename. TensorRT's builder
    cannot run here: a stand-in writes each plan as the bytes it was given to build from."""
    import shutil

    from lego_export.export import tensorrt
    from lego_export.export.build import add_tensorrt_plans
    from lego_export.manifest import EngineFile, sha256_file

    def stand_in(manifest, onnx_folder, plan_folder, progress, *flags):
        for spec in manifest.engines:
            plan = plan_folder / f"{spec.name}.plan"
            plan.write_bytes(manifest.read_engine_file(onnx_folder, spec.files["onnx"]))
            spec.files["tensorrt"] = EngineFile(plan.name, sha256_file(plan), plan.stat().st_size, "fp32")

    monkeypatch.setattr(tensorrt, "add_plans", stand_in)
    folder = tmp_path / "engines"
    shutil.copytree(built["pg-tiny"][1], folder)
    (folder / "NOTES.md").write_text("kept")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "manifest.json"}
    inode = folder.stat().st_ino
    add_tensorrt_plans(folder)
    manifest = Manifest.read(folder)
    assert manifest.check_files(folder) == [] and all("tensorrt" in e.files for e in manifest.engines)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in before} == before
    plans = sorted(p.name for p in folder.iterdir() if p.suffix == ".plan")
    assert plans == sorted(f"{e.name}.plan" for e in manifest.engines)
    assert folder.stat().st_ino != inode and not list(tmp_path.glob(".engines.*"))


def test_plans_need_the_portable_onnx_files(built, tmp_path, monkeypatch):
    from lego_export.errors import LegoError
    from lego_export.export import tensorrt

    monkeypatch.setattr(tensorrt, "tensorrt_environment", lambda: (type("trt", (), {"__version__": "10"}), "9.0"))
    manifest = Manifest.read(built["pg-tiny"][1])
    embedder = manifest.engines[0]
    embedder.files = {"tensorrt": embedder.files["onnx"]}  # a folder of plans alone
    with pytest.raises(LegoError, match=r"^engines\[0\]\.files\.onnx: missing \(embedder lists tensorrt\)"):
        tensorrt.add_plans(manifest, built["pg-tiny"][1], tmp_path)
