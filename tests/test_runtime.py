import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lego_export.checkpoint import save_checkpoint
from lego_export.config import get_preset
from lego_export.export.build import BuildOptions, build
from lego_export.model import LegoModel
from lego_export.options import SamplingOptions
from lego_export.runtime.cli import main as lego_run
from lego_export.runtime.pipeline import LegoPipeline
from tests.conftest import run_torchrun

ROOT = Path(__file__).resolve().parents[1]


def export(root: Path, preset: str, **overrides) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = LegoModel(get_preset(preset, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    name = preset + ("-uncond" if overrides.get("num_classes") == 0 else "")
    ckpt = root / f"{name}.safetensors"
    save_checkpoint(ckpt, model)
    engines = root / f"engines-{name}"
    build(BuildOptions(ckpt=str(ckpt), out=str(engines), max_batch=8, opt_batch=4))
    return ckpt, engines


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    return {
        "pg": export(root, "pg-tiny"),
        "pr": export(root, "pr-tiny"),
        "uncond": export(root, "pg-tiny", num_classes=0),
    }


class CallCounter:
    """Wraps a runner and counts calls (one per chunk of tiles)."""

    def __init__(self, runner):
        self.runner, self.calls, self.rows = runner, 0, 0

    def infer(self, feeds):
        self.calls += 1
        self.rows += len(next(iter(feeds.values())))
        return self.runner.infer(feeds)


def count_calls(pipe):
    counters = [CallCounter(b.runner) for b in pipe.bricks]
    for b, c in zip(pipe.bricks, counters, strict=True):
        b.runner = c
    return counters


@pytest.mark.parametrize("stack", ["pg", "pr"])
@pytest.mark.parametrize("resolution", [(16, 16), (16, 48)])
def test_onnxruntime_matches_pytorch(models, stack, resolution):
    ckpt, engines = models[stack]
    ort = LegoPipeline.from_engines(engines, "onnxruntime")
    ref = LegoPipeline.from_engines(engines, "torch", ckpt=str(ckpt))
    kwargs = dict(num=3, steps=4, batch=2, resolution=resolution, skip="late", guidance=1.5, seed=3)
    a, b = ort(**kwargs).images, ref(**kwargs).images
    assert a.shape == (3, 1, *resolution)
    assert np.abs(a).max() > 0.1
    assert np.abs(a - b).max() < 1e-4


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
@pytest.mark.parametrize(
    "bricks,shift,guidance", [(3, (0, 0), 1.0), (2, (5, 9), 1.0), (3, (7, 2), 2.5), (1, (0, 3), 1.5)]
)
def test_pipeline_denoiser_matches_the_model(models, backend, bricks, shift, guidance):
    """The pipeline's evaluation, on any backend, is LegoModel.forward on the same inputs."""
    from lego_export.checkpoint import load_model
    from lego_export.plan import StepPlan

    if backend == "openvino":
        pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino (pip install '.[openvino]')")
    ckpt, engines = models["pg"]
    pipe = LegoPipeline.from_engines(engines, backend, ckpt=str(ckpt))
    model = load_model(ckpt)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, 1, 16, 32)) * 2).astype(np.float32)
    onehot = np.eye(10, dtype=np.float32)[[0, 3, 9]]
    a = pipe.arrays
    got = a.to_numpy(
        pipe.denoise(a.from_numpy(x), 0.7, StepPlan(0, 0.7, bricks, shift), a.from_numpy(onehot), guidance)
    )
    with torch.no_grad():
        ref = model(
            torch.from_numpy(x), 0.7, torch.from_numpy(onehot), num_bricks=bricks, shift=shift, guidance=guidance
        )
    assert np.abs(ref.numpy()).max() > 0.1
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-6 if backend == "torch" else 1e-4)


def test_preview_sampler_matches_the_pipeline(models):
    """The PyTorch preview (training's sample grids) and lego-run start from the same noise and agree."""
    from lego_export.checkpoint import load_model
    from lego_export.preview import sample_images

    ckpt, engines = models["pg"]
    labels = [2, 2, 5, 5]
    preview = sample_images(load_model(ckpt), labels, num=4, steps=5, seed=7, guidance=1.5)
    pipe = LegoPipeline.from_engines(engines)
    images = pipe(num=4, steps=5, seed=7, classes=labels, guidance=1.5, batch=3).images
    assert np.abs(images).max() > 0.1
    np.testing.assert_allclose(images, preview, atol=1e-4)


def test_io_binding_on_torch_tensors_matches_numpy_feeds(models):
    # The GPU path keeps the canvas in torch tensors and binds them to ONNX Runtime in place; run the
    # same code on the CPU provider and check it against the NumPy path.
    from lego_export.arrays import TorchArrays
    from lego_export.manifest import Manifest
    from lego_export.runtime.backends import OnnxRuntimeBackend

    _, engines = models["pg"]
    backend = OnnxRuntimeBackend(engines, Manifest.read(engines))
    backend.arrays = TorchArrays("cpu")
    bound = LegoPipeline(Manifest.read(engines), backend)
    seen = []
    for b in bound.bricks:
        runner = b.runner.infer
        b.runner.infer = lambda feeds, run=runner: seen.append(type(feeds["tiles"])) or run(feeds)
    kwargs = dict(num=3, steps=3, batch=2, resolution=(16, 32), skip="late", guidance=2.0, seed=1)
    a, b = bound(**kwargs).images, LegoPipeline.from_engines(engines, "onnxruntime")(**kwargs).images
    assert seen and set(seen) == {torch.Tensor}
    assert np.abs(a - b).max() < 1e-5


def test_engine_times_only_when_they_cost_no_device_wait(models):
    """On an asynchronous device the pipeline counts engine calls without timing each one (a wait per
    call), unless asked to profile; the images do not change."""
    from lego_export.manifest import Manifest
    from lego_export.runtime.backends import OnnxRuntimeBackend

    _, engines = models["pg"]
    manifest = Manifest.read(engines)
    pipe = LegoPipeline(manifest, OnnxRuntimeBackend(engines, manifest))
    waits = []
    pipe.arrays.synchronize = lambda: waits.append(1)
    timed = pipe(num=2, steps=3, batch=2)
    assert waits and set(timed.timing.engine_ms) == {"embedder", "brick0", "brick1", "brick2"}
    for runner in [pipe.embedder, *pipe.bricks]:
        runner.timed = False  # what a CUDA backend gets without profile=True
    pipe.per_engine_timing = False
    waits.clear()
    untimed = pipe(num=2, steps=3, batch=2)
    assert not waits and untimed.timing.engine_ms == {} and untimed.timing.overhead_fraction is None
    assert untimed.timing.engine_calls == timed.timing.engine_calls
    assert "not measured" in untimed.timing.table()
    np.testing.assert_array_equal(untimed.images, timed.images)


def test_plan_runs_exactly_the_bricks_it_lists(models):
    _, engines = models["pg"]
    pipe = LegoPipeline.from_engines(engines)
    counters = count_calls(pipe)
    steps = 10
    result = pipe(num=2, steps=steps, batch=2, skip="2@0.5:,1@:20", sampler="heun")
    evaluations = [2] * (steps - 1) + [1]  # Heun: no correction on the last step
    for k, counter in enumerate(counters):
        expected = sum(e for p, e in zip(result.plan, evaluations, strict=True) if p.bricks > k)
        assert counter.calls == expected, (k, counter.calls, expected)
    assert counters[0].calls == sum(evaluations)  # the first brick always runs
    assert 0 < counters[2].calls < counters[0].calls and 0 < counters[1].calls < counters[0].calls
    assert result.timing.bricks_skipped == sum(
        (3 - p.bricks) * e for p, e in zip(result.plan, evaluations, strict=True)
    )


def test_skipping_changes_the_images_and_holds_under_guidance(models):
    _, engines = models["pg"]
    pipe = LegoPipeline.from_engines(engines)
    base = dict(num=2, steps=8, batch=2, seed=1)
    full = pipe(**base).images
    assert np.array_equal(full, pipe(**base, skip="late", t_break=0.0).images)  # t-break 0 = full chain
    skipped = pipe(**base, skip="late", t_break=0.5).images
    assert np.abs(full - skipped).max() > 1e-3

    counters = count_calls(pipe)
    guided = pipe(**base, skip="late", t_break=0.5, guidance=3.0)
    plain_calls = [c.calls for c in counters]
    assert plain_calls[2] < plain_calls[0]  # the top brick was skipped with guidance on
    assert guided.timing.bricks_skipped > 0
    assert np.abs(guided.images - skipped).max() > 1e-3  # and guidance itself changed the images


def test_a_guidance_interval_guides_exactly_the_steps_within_it(models):
    """Guidance over an interval holding every step is guidance at every step; over one holding
    none it is no guidance; in between it differs from both, and costs the guided steps twice."""
    _, engines = models["pg"]
    pipe = LegoPipeline.from_engines(engines)
    base = dict(num=2, steps=6, batch=2, seed=2, sampler="dpm2m")
    sigmas = pipe.edm.sigmas(6)
    everywhere, nowhere = pipe(**base, guidance=2.0), pipe(**base)
    np.testing.assert_array_equal(pipe(**base, guidance=2.0, guidance_interval="0:").images, everywhere.images)
    np.testing.assert_array_equal(pipe(**base, guidance=2.0, guidance_interval="1000:").images, nowhere.images)
    middle = f"{sigmas[3] * 0.99}:{sigmas[2] * 1.01}"  # steps 2 and 3 of 6
    counters = count_calls(pipe)
    pipe(**base)
    unguided = [c.rows for c in counters]
    partial = pipe(**base, guidance=2.0, guidance_interval=middle)
    assert [c.rows - u for c, u in zip(counters, unguided, strict=True)] == [u * 8 // 6 for u in unguided]
    # (the test model's guidance is weak: differences of 1e-4, far above float rounding's 1e-7)
    assert np.abs(partial.images - everywhere.images).max() > 1e-5
    assert np.abs(partial.images - nowhere.images).max() > 1e-5
    assert everywhere.timing.flops_saved == pytest.approx(-1.0) and nowhere.timing.flops_saved == 0.0
    assert partial.timing.flops_saved == pytest.approx(-2 / 6)
    assert "at sigma" in partial.options.describe()
    # Guided up to the last full-chain step, then skipping with residual reuse (once a crash: the
    # stored corrections had the guided batch's twice as many rows).
    edge = dict(skip=f"1@{sigmas[3] * 0.99}:", reuse_residual=True, guidance=2.0)
    reused = pipe(**base, **edge, guidance_interval=f"{sigmas[3] * 0.99}:{sigmas[3] * 1.01}")
    assert np.isfinite(reused.images).all() and reused.timing.bricks_skipped > 0
    assert np.abs(reused.images - pipe(**base, **edge, guidance_interval="1000:").images).max() > 1e-5


def test_non_square_canvases_and_tile_shift(models):
    _, engines = models["pg"]
    pipe = LegoPipeline.from_engines(engines)
    for hw in [(16, 48), (48, 16), (32, 32)]:
        assert pipe(num=1, steps=2, resolution=hw).images.shape == (1, 1, *hw)
    plan_default = pipe.plan(SamplingOptions(steps=4), (16, 48))
    assert any(p.shift != (0, 0) for p in plan_default)  # on by default above the training size
    assert all(p.shift == (0, 0) for p in pipe.plan(SamplingOptions(steps=4), (16, 16)))
    shifted = pipe(num=1, steps=4, resolution=(16, 48), tile_shift=True).images
    unshifted = pipe(num=1, steps=4, resolution=(16, 48), tile_shift=False).images
    assert np.abs(shifted - unshifted).max() > 1e-3


def test_images_depend_only_on_seed_and_index(models):
    _, engines = models["pg"]
    pipe = LegoPipeline.from_engines(engines)
    whole = pipe(num=4, steps=3, batch=4).images
    split = pipe(num=4, steps=3, batch=1, indices=[2, 3]).images
    np.testing.assert_allclose(whole[2:], split, atol=1e-5)


def run_cli(args):
    return CliRunner().invoke(lego_run, [str(a) for a in args], catch_exceptions=False)


def test_cli_writes_grid_npz_and_timing(models, tmp_path):
    _, engines = models["pg"]
    result = run_cli(
        [
            "--engines",
            engines,
            "--steps",
            3,
            "--num",
            5,
            "--batch",
            2,
            "--class",
            1,
            "--class",
            3,
            "--skip-late-bricks",
            "--out",
            tmp_path / "g.png",
            "--save-npz",
            tmp_path / "s.npz",
            "--out-dir",
            tmp_path / "each",
            "--timing-json",
            tmp_path / "t.json",
        ]
    )
    assert result.exit_code == 0, result.output
    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (5, 1, 16, 16) and data["images"].dtype == np.float32
    assert data["images"].min() >= -1 and data["images"].max() <= 1
    assert list(data["labels"]) == [1, 3, 1, 3, 1]
    assert (tmp_path / "g.png").is_file() and len(list((tmp_path / "each").glob("*.png"))) == 5
    timing = json.loads((tmp_path / "t.json").read_text())
    assert (
        timing["images"] == 5
        and timing["bricks_skipped"] > 0
        and set(timing["engine_ms_per_step"]) == {"embedder", "brick0", "brick1", "brick2"}
    )
    assert "ms/step" in result.output and "images/s" in result.output


def test_cli_plan(models):
    _, engines = models["pr"]
    result = run_cli(["--engines", engines, "--steps", 10, "--skip-late-bricks", "--plan"])
    assert result.exit_code == 0
    assert "skip brick 2 (local) for sigma >" in result.output and "brick FLOPs saved" in result.output


def test_bad_input_is_one_line_and_writes_nothing(models, tmp_path):
    _, engines = models["pg"]
    _, uncond = models["uncond"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{oops")
    out = tmp_path / "never.png"
    cases = [
        (["--engines", tmp_path / "nothing"], "no engines found"),
        (["--engines", broken], "not valid JSON"),
        (["--engines", engines, "--resolution", "16x20"], "not a multiple of the largest brick size 16"),
        (["--engines", engines, "--resolution", "big"], "write HxW"),
        (["--engines", engines, "--class", 12], "class 12 is out of range"),
        (["--engines", uncond, "--cfg", 2], "needs a class-conditional model"),
        (["--engines", engines, "--cfg-interval", "4:14"], "--cfg-interval applies only with guidance"),
        (["--engines", engines, "--cfg", 2, "--cfg-interval", "x"], "--cfg-interval 'x' cannot be read"),
        (["--engines", engines, "--backend", "tensorrt"], "TensorRT is not installed"),
        (["--engines", engines, "--backend", "torch"], "--ckpt is needed by the torch backend"),
        (["--engines", engines, "--skip-policy", "9@1:"], "brick index must be 0 to 2"),
        (["--engines", engines, "--skip-late-bricks", "--skip-policy", "2@1:"], "not both"),
    ]
    for args, message in cases:
        result = run_cli([*args, "--steps", 2, "--num", 1, "--out", out])
        assert result.exit_code != 0, args
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


@pytest.mark.parametrize("backend, file", [("onnxruntime", "brick0.ort.onnx"), ("openvino", "brick0.onnx")])
def test_tampered_engine_is_refused(models, tmp_path, backend, file):
    import shutil

    if backend == "openvino":
        pytest.importorskip("openvino")
    _, engines = models["pg"]
    copy = tmp_path / "e"
    shutil.copytree(engines, copy)
    with open(copy / file, "ab") as f:
        f.write(b"\0")
    result = run_cli(["--engines", copy, "--steps", 2, "--num", 1, "--backend", backend, "--out", tmp_path / "x.png"])
    assert result.exit_code != 0 and f"{file}: sha256 differs" in result.output
    assert not (tmp_path / "x.png").exists()


def test_ctrl_c_leaves_no_output(models, tmp_path, monkeypatch):
    _, engines = models["pg"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LegoPipeline, "__call__", interrupted)
    result = run_cli(["--engines", engines, "--out", tmp_path / "g.png", "--save-npz", tmp_path / "s.npz"])
    assert result.exit_code != 0 and "interrupted" in result.output
    assert not list(tmp_path.iterdir())


def test_runtime_works_without_torch(models, tmp_path):
    """ONNX Runtime sampling and the CLI in a process where importing torch fails."""
    _, engines = models["pg"]
    code = f"""
import sys
sys.modules["torch"] = None  # any 'import torch' now raises ImportError
from lego_export.runtime import LegoPipeline
images = LegoPipeline.from_engines({str(engines)!r})(num=2, steps=2, skip="late").images
assert images.shape == (2, 1, 16, 16), images.shape
from lego_export.runtime.cli import main
main(["--engines", {str(engines)!r}, "--steps", "2", "--num", "2", "--out", {str(tmp_path / "g.png")!r}])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch" not in proc.stderr and (tmp_path / "g.png").is_file()


def test_torchrun_splits_seeds(models, tmp_path):
    _, engines = models["pg"]
    args = ["--engines", str(engines), "--steps", "3", "-n", "5", "--batch", "2"]
    single = tmp_path / "one.npz"
    assert run_cli([*args, "--out", tmp_path / "one.png", "--save-npz", single]).exit_code == 0
    two = [*args, "--threads", "1", "--out", str(tmp_path / "two.png"), "--save-npz", str(tmp_path / "two.npz")]
    proc = run_torchrun("lego_export.runtime.cli", [*two, "--timing-json", str(tmp_path / "t.json")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 process(es)" in proc.stdout
    np.testing.assert_allclose(np.load(tmp_path / "two.npz")["images"], np.load(single)["images"], atol=1e-5)
    timing = json.loads((tmp_path / "t.json").read_text())  # totals over both ranks: 3 + 2 images
    assert timing["images"] == 5 and timing["processes"] == 2 and "for 5 images" in proc.stdout
    assert timing["engine_calls"]["brick0"] == (2 + 1) * 5  # batches of 2: rank 0 two, rank 1 one; 5 Heun evaluations


def test_default_labels_give_one_grid_row_per_class(models):
    _, engines = models["pg"]
    pipe = LegoPipeline.from_engines(engines)
    labels = pipe.labels_for(80, None, range(80))
    assert labels.reshape(10, 8).tolist() == [[k] * 8 for k in range(10)]
    assert pipe.labels_for(4, [3, 5], range(4)).tolist() == [3, 5, 3, 5]


def test_churn_adds_fresh_noise_reproducibly(models):
    """EDM's stochastic sampler: off by default, changes the images when on, and stays a function of
    (seed, image index) like the rest of the runtime."""
    from lego_export.edm import Churn

    _, engines = models["pg"]
    pipe = LegoPipeline.from_engines(engines)
    base = dict(num=3, steps=6, seed=2)
    plain = pipe(**base).images
    churn = Churn(s_churn=10, s_min=0.05, s_max=10, s_noise=1.003)
    stochastic = pipe(**base, churn=churn).images
    assert np.abs(stochastic - plain).max() > 1e-2
    np.testing.assert_array_equal(pipe(**base, churn=Churn()).images, plain)  # S_churn 0: deterministic
    split = pipe(**base, churn=churn, batch=1, indices=[1, 2]).images
    np.testing.assert_allclose(split, stochastic[1:], atol=1e-5)
    outside = pipe(**base, churn=Churn(s_churn=10, s_min=100, s_max=200)).images  # no sigma in the window
    np.testing.assert_array_equal(outside, plain)


def test_churn_options_reach_the_sampler(models, tmp_path):
    _, engines = models["pg"]
    common = ["--engines", engines, "--steps", 4, "--num", 2]
    assert run_cli([*common, "--out", tmp_path / "a.png", "--save-npz", tmp_path / "a.npz"]).exit_code == 0
    args = [*common, "--churn", 10, "--s-min", 0.05, "--s-max", 50, "--s-noise", 1.003]
    assert run_cli([*args, "--out", tmp_path / "b.png", "--save-npz", tmp_path / "b.npz"]).exit_code == 0
    assert np.abs(np.load(tmp_path / "a.npz")["images"] - np.load(tmp_path / "b.npz")["images"]).max() > 1e-2
    bad = run_cli([*common, "--churn", "-1", "--out", tmp_path / "c.png"])
    assert bad.exit_code == 2 and "Invalid value for '--churn'" in bad.output
    alone = run_cli([*common, "--s-noise", "1.003", "--out", tmp_path / "c.png"])
    assert alone.exit_code == 1 and "--s-noise applies with --churn only" in alone.output
    assert not (tmp_path / "c.png").exists()


def test_dpm_solver_is_second_order_with_one_evaluation_per_step(models):
    """At equal evaluations, DPM-Solver++(2M) lands nearer a fine Heun solution than Euler, and it
    takes the same skip plans and guidance."""
    _, engines = models["pg"]
    pipe = LegoPipeline.from_engines(engines)
    base = dict(num=2, seed=4, guidance=1.5)
    reference = pipe(**base, steps=80, sampler="heun").images
    euler = pipe(**base, steps=12, sampler="euler").images
    counters = count_calls(pipe)
    dpm = pipe(**base, steps=12, sampler="dpm2m").images
    assert counters[0].calls == 12  # one evaluation per step
    assert np.abs(dpm - reference).mean() < 0.7 * np.abs(euler - reference).mean()
    skipped = pipe(**base, steps=12, sampler="dpm2m", skip="late", t_break=0.5)
    assert skipped.timing.bricks_skipped == 6 and np.abs(skipped.images - dpm).max() > 1e-3


def test_residual_reuse_costs_no_brick_calls_and_changes_skipped_steps_only(models):
    _, engines = models["pg"]
    pipe = LegoPipeline.from_engines(engines)
    base = dict(num=2, steps=10, seed=5)
    full = pipe(**base).images
    np.testing.assert_array_equal(pipe(**base, reuse_residual=True).images, full)  # nothing skipped: no effect
    counters = count_calls(pipe)
    plain = pipe(**base, skip="late", t_break=0.4).images
    plain_calls = [c.calls for c in counters]
    for c in counters:
        c.calls = 0
    reused = pipe(**base, skip="late", t_break=0.4, reuse_residual=True).images
    assert [c.calls for c in counters] == plain_calls  # same FLOPs as plain skipping
    assert np.abs(reused - plain).max() > 1e-3
    # on this model the reused correction brings the images ten times nearer the full chain
    assert np.abs(reused - full).mean() < 0.5 * np.abs(plain - full).mean()


def test_auto_picks_openvino_on_a_cpu_when_it_is_installed(monkeypatch):
    """Not measuring (LEGO_EXPORT_AUTO_MEASURE=0, as conftest sets), auto takes OpenVINO when installed,
    and ONNX Runtime without it (tests/test_autoselect.py tests the measured choice)."""
    import importlib.util

    from lego_export.manifest import Manifest
    from lego_export.runtime.backends import make_backend

    pytest.importorskip("openvino")
    tiny = ROOT / "tests" / "fixtures" / "tiny-engines"
    manifest = Manifest.read(tiny)
    assert make_backend("auto", tiny, manifest).name == "openvino"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else find_spec(name, *a)
    )
    assert make_backend("auto", tiny, manifest).name == "onnxruntime"
