"""lego-export tune: the search, the manifest's recommended setting, and lego-run using it."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from lego_export.cli import export_main
from lego_export.edm import evaluations
from lego_export.fid import FeatureStats, fid, frechet_distance
from lego_export.flops import model_brick_flops
from lego_export.manifest import Manifest
from lego_export.options import SamplingOptions
from lego_export.plan import flop_fraction_saved, plan
from lego_export.runtime.cli import main as lego_run
from lego_export.tune import Setting, Trial, Tuner

TINY = Path(__file__).parent / "fixtures" / "tiny-engines"


def write_features(path: Path, side: int = 16, dim: int = 6, classes: int = 0) -> Path:
    """A fixed random projection of the flattened image through tanh: N x 1 x side x side -> N x dim;
    with classes, also logits N x classes, a random projection of those features."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((side * side, dim)).astype(np.float32) / side
    to_logits = rng.standard_normal((dim, max(classes, 1))).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["proj"]),
        helper.make_node("Tanh", ["proj"], ["features"]),
        helper.make_node("MatMul", ["features", "v"], ["logits"]),
    ]
    outputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", dim])]
    outputs += [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])] if classes else []
    graph = helper.make_graph(
        nodes if classes else nodes[:3],
        "features",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 1, side, side])],
        outputs,
        [
            helper.make_tensor("w", TensorProto.FLOAT, weights.shape, weights.ravel()),
            *([helper.make_tensor("v", TensorProto.FLOAT, to_logits.shape, to_logits.ravel())] if classes else []),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def tuned_folder(tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(TINY, engines)
    features = write_features(tmp_path / "features.onnx")
    real = (np.random.default_rng(1).random((200, 16, 16)) * 255).astype(np.uint8)
    np.savez(tmp_path / "real.npz", images=real)
    return engines, features, tmp_path / "real.npz"


def tune_args(engines, features, reference, *extra):
    return [
        "tune", "--engines", str(engines), "--features", str(features), "--reference", str(reference),
        "--num", "24", "--batch", "24", "--reference-setting", "heun:4", "--candidates", "euler:3,dpm2m:3", *extra,
    ]  # fmt: skip


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    a = FeatureStats(np.zeros(3), np.diag([1.0, 4.0, 9.0]))
    b = FeatureStats(np.ones(3), np.diag([4.0, 4.0, 1.0]))
    # |mu|^2 + sum (sqrt(s_a) - sqrt(s_b))^2 for diagonal covariances
    assert frechet_distance(a, b) == pytest.approx(3 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2)
    x = np.random.default_rng(0).standard_normal((500, 4))
    assert fid(x, x) == pytest.approx(0, abs=1e-8)


REFERENCE = Setting(SamplingOptions("heun", 20))


class ScriptedTuner(Tuner):
    """The search without sampling: FID (and class accuracy) is a fixed function of the setting."""

    def __init__(self, manifest, fid_of, accuracy_of=None):
        self.model, self.fid_of, self.accuracy_of, self.seen = manifest.model, fid_of, accuracy_of, []
        self.flops = model_brick_flops(manifest.model)
        self.log = lambda _m: None
        self.num = 100

    def trial(self, setting, seed=None):
        self.seen.append(setting)
        saved = flop_fraction_saved(plan(setting.options(self.model), self.model, (16, 16)), self.flops)
        flops = evaluations(setting.base.sampler, setting.base.steps) * (1 - saved)
        accuracy = self.accuracy_of(setting) if self.accuracy_of else None
        return Trial(setting, self.fid_of(setting), flops, 1.0, class_accuracy=accuracy)


def test_the_search_keeps_the_cheapest_setting_in_budget_and_never_repeats_a_plan():
    manifest = Manifest.read(TINY)
    # Reference FID 10, budget 11. Each tenth of the trajectory without brick 1 (which takes brick 2
    # with it) costs 0.5 FID, without brick 2 0.2; 16 steps start 1 FID lower than 8.
    base = {("heun", 20): 10.0, ("dpm2m", 16): 9.0, ("dpm2m", 8): 10.0, ("euler", 40): 8.0}

    def fid_of(s: Setting) -> float:
        skipped = s.skipped or (0.0, 0.0)
        return base[(s.base.sampler, s.base.steps)] + 5 * skipped[0] + 2 * max(skipped)

    tuner = ScriptedTuner(manifest, fid_of)
    result = tuner.run(REFERENCE, [("dpm2m", 16), ("dpm2m", 8), ("euler", 40)], 0.1, reuse=True)
    # 40 steps of brick 0 alone cost more than the best 8-step setting: never sampled
    assert not any(s.base.steps == 40 for s in tuner.seen)
    assert result.budget == pytest.approx(11.0)
    in_budget = [t for t in [result.reference, *result.trials] if t.in_budget]
    assert all(t.fid <= result.budget for t in in_budget)
    assert result.winner.flops == min(t.flops for t in in_budget)
    # Greedy from 8 steps: brick 1 for the last tenth (10.7), then brick 2 widened past the stretch
    # brick 1 already covers, to two tenths (10.9); every further move is over budget.
    assert (result.winner.setting.base.sampler, result.winner.setting.base.steps) == ("dpm2m", 8)
    assert result.winner.setting.skipped == (0.1, 0.2)
    assert result.winner.setting.base.reuse_residual
    plans = [(s.base.sampler, s.base.steps, tuner._plan(s)) for s in tuner.seen]
    assert len(plans) == len(set(plans))  # no plan is ever sampled twice


def test_the_accuracy_floor_turns_down_a_setting_that_keeps_fid_and_loses_classes():
    """The same FIDs as above; skipping brick 1 now also costs class accuracy (a point per tenth)."""
    manifest = Manifest.read(TINY)

    def fid_of(s: Setting) -> float:
        return {("heun", 20): 10.0, ("dpm2m", 8): 10.0}[(s.base.sampler, s.base.steps)] + 2 * max(s.skipped or (0.0,))

    def accuracy_of(s: Setting) -> float:
        return 0.80 - 0.1 * (s.skipped or (0.0,))[0]

    def winner(drop: float) -> Setting:
        tuner = ScriptedTuner(manifest, fid_of, accuracy_of)
        result = tuner.run(REFERENCE, [("dpm2m", 8)], 0.1, reuse=True, max_accuracy_drop=drop)
        assert result.min_accuracy == pytest.approx(0.80 - drop)
        assert all(t.class_accuracy >= 0.80 - drop for t in result.trials if t.in_budget)
        return result.winner.setting

    # FID alone allows half the trajectory without brick 1 or brick 2 (10 + 2 x 0.5 = 11)
    assert winner(1.0).skipped[0] == pytest.approx(0.5)
    assert winner(0.0).skipped[0] == 0.0  # any skip of brick 1 loses accuracy: only brick 2 skipped
    assert winner(0.0).skipped[1] == pytest.approx(0.5)
    assert winner(0.025).skipped[0] == pytest.approx(0.2)  # two tenths lose 0.02, three 0.03


def test_guiding_one_step_brings_a_setting_within_an_accuracy_floor():
    """A floor no unguided setting meets: the search guides one step at a time and keeps the step
    that lifts accuracy over it, then widens the skip windows of that guided setting."""
    from lego_export.tune import one_step_interval

    manifest = Manifest.read(TINY)
    sigmas = manifest.model.edm.sigmas(8)
    lifting = one_step_interval(sigmas, 5)  # only guidance at step 5 (of 0-7) helps in this script

    def fid_of(s: Setting) -> float:  # fewer steps than 8: far over budget
        fid = {("heun", 20): 10.0, ("dpm2m", 8): 10.0}.get((s.base.sampler, s.base.steps), 30.0)
        return fid + 2 * max(s.skipped or (0.0,))

    def accuracy_of(s: Setting) -> float:
        return 0.85 if s.base.guidance_interval == lifting else 0.78

    def search(guidance: float):
        tuner = ScriptedTuner(manifest, fid_of, accuracy_of)
        result = tuner.run(
            REFERENCE, [("dpm2m", 8)], 0.1, True, max_accuracy_drop=0.1, min_accuracy=0.8, guidance=guidance
        )
        return tuner, result

    tuner, result = search(1.0)
    assert result.winner is result.reference and not any(s.base.guidance != 1.0 for s in tuner.seen)
    tuner, result = search(1.5)
    win = result.winner.setting
    assert (win.base.steps, win.base.guidance, win.base.guidance_interval) == (8, 1.5, lifting)
    assert any(win.skipped) and result.winner.flops < result.reference.flops
    guided = [s for s in tuner.seen if s.base.guidance != 1.0 and not any(s.skipped)]
    assert len({s.base.guidance_interval for s in guided}) == 8  # each step tried once
    steps = [p for p in plan(win.options(manifest.model), manifest.model, (16, 16)) if p.guided]
    assert [p.step for p in steps] == [5]  # the interval holds exactly that step
    assert all(t.class_accuracy >= 0.8 for t in result.trials if t.in_budget)
    # The ladder tries the winner without guidance: cheaper, the same FID here, 0.07 less accurate.
    (rung,) = tuner.ladder(result, seed=2, most=3, max_fid_ratio=1.15)
    assert rung.options == win.but(guidance=1.0, guidance_interval=None).options(manifest.model)
    assert rung.measured["class_accuracy"] == pytest.approx(0.78)
    # A candidate rung whose interval holds no step of its schedule (the winner with fewer steps,
    # say) guides nothing, and is measured and written without guidance.
    idle = win.but(guidance_interval=f"{sigmas[6] * 1.01:g}:{sigmas[5] * 0.99:g}")  # between two steps
    assert tuner._unguided_if_idle(idle) == idle.but(guidance=1.0, guidance_interval=None)
    assert tuner._unguided_if_idle(win) == win


def test_rungs_are_cheaper_within_the_rule_and_none_is_beaten_on_fid_by_a_cheaper_one():
    from lego_export.tune import select_rungs

    def trial(flops, fid, accuracy):
        return Trial(Setting(SamplingOptions("dpm2m", 8)), fid, flops, 1.0, class_accuracy=accuracy)

    top = trial(8.0, 10.0, 0.80)
    rows = [
        trial(7.0, 10.5, 0.80),  # a rung
        trial(6.5, 10.8, 0.79),  # beaten by the next: cheaper, a lower FID
        trial(6.0, 10.6, 0.795),  # a rung
        trial(5.0, 11.6, 0.80),  # FID over 1.15x
        trial(4.0, 11.0, 0.78),  # accuracy more than 0.01 below the top's
        trial(9.0, 9.0, 0.85),  # dearer than the top
    ]
    assert select_rungs(top, rows, 1.15, 0.01) == [rows[0], rows[2]]
    assert select_rungs(top, rows, 1.2, 0.01) == [rows[0], rows[2], rows[3]]  # the ratio lets one more in
    assert select_rungs(top, rows, 1.15, 0.05) == [rows[0], rows[2], rows[4]]  # the drop lets one more in
    without_accuracy = [dataclasses.replace(r, class_accuracy=None) for r in rows]
    got = select_rungs(dataclasses.replace(top, class_accuracy=None), without_accuracy, 1.15, 0.01)
    assert got == [without_accuracy[i] for i in (0, 2, 4)]  # FID and FLOPs alone decide
    # Accuracy is a floor, not a rank: more accurate, dearer and a higher FID is no rung (its FID
    # would rise above the cheaper rung's below it).
    accurate = [trial(7.0, 11.2, 0.84), trial(6.0, 10.6, 0.80)]
    assert select_rungs(top, accurate, 1.15, 0.01) == [accurate[1]]


def test_a_ladder_of_fewer_rungs_than_qualify_keeps_the_cheapest_and_spreads_the_rest():
    from lego_export.tune import spread

    rungs = list("abcdefg")  # most expensive first
    assert spread(rungs, 8) == rungs and spread(rungs, 7) == rungs
    assert spread(rungs, 4) == ["a", "c", "e", "g"]
    assert spread(rungs, 3) == ["a", "d", "g"]
    assert spread(rungs, 2) == ["a", "g"]
    assert spread(rungs, 1) == ["g"]  # the one that sheds the most work
    assert spread(rungs, 0) == []


def test_tune_writes_a_setting_that_lego_run_uses_unless_told_otherwise(tuned_folder, tmp_path):
    engines, features, reference = tuned_folder
    saved = tmp_path / "recommended.json"
    runner = CliRunner()
    out = runner.invoke(export_main, tune_args(engines, features, reference, "--max-fid-increase", "10",
                                               "--save", str(saved)))  # fmt: skip
    assert out.exit_code == 0, out.output
    tuned = Manifest.read(engines).recommended
    rec = tuned.options
    assert rec is not None and rec.sampler in ("euler", "dpm2m") and rec.steps == 3
    assert rec.skip != "none"  # a budget this loose lets it skip
    assert tuned.measured["fid"] <= tuned.measured["budget"]
    assert tuned.measured["brick_flops_vs_reference"] < 3 / 7
    assert json.loads(saved.read_text())["skip_policy"] == rec.skip
    assert "recommended sampling setting" in runner.invoke(export_main, ["inspect", str(engines)]).output

    def images(*args):
        npz = tmp_path / "x.npz"
        result = runner.invoke(lego_run, ["--engines", str(engines), "--num", "4", "--out", str(tmp_path / "g.png"),
                                          "--save-npz", str(npz), *args])  # fmt: skip
        assert result.exit_code == 0, result.output
        return np.load(npz)["images"], result.output

    default, said = images()
    assert "the model's recommended" in said
    reuse = ["--reuse-residual"] if rec.reuse_residual else []
    explicit, said = images("--sampler", rec.sampler, "--steps", "3", "--skip-policy", rec.skip, *reuse)
    assert "recommended" not in said
    np.testing.assert_array_equal(default, explicit)
    _, said = images("--churn", "5")  # churn is a sampling option too (and dpm2m would refuse it)
    assert "recommended" not in said
    plain, _ = images("--no-recommended")
    plain_explicit, _ = images("--steps", "50")
    np.testing.assert_array_equal(plain, plain_explicit)
    assert np.abs(plain - default).max() > 1e-2


def test_with_a_classifier_tune_checks_class_accuracy_and_writes_a_measured_ladder(tuned_folder, tmp_path):
    engines, _, reference = tuned_folder
    classifier = write_features(tmp_path / "classifier.onnx", classes=10)
    loose = ["--max-fid-increase", "10", "--max-accuracy-drop", "1", "--rung-fid-ratio", "10"]
    out = CliRunner().invoke(export_main, tune_args(engines, classifier, reference, *loose))
    assert out.exit_code == 0, out.output
    tuned = Manifest.read(engines).recommended
    assert 0 <= tuned.measured["class_accuracy"] <= 1 and "class_accuracy" in tuned.measured["validation"]
    assert 1 <= len(tuned.ladder) <= 3 and f"{len(tuned.ladder)} rungs below it" in out.output
    costs = [r.measured["brick_flops_vs_reference"] for r in [tuned, *tuned.ladder]]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)  # each rung cheaper
    for rung in tuned.ladder:
        assert rung.measured["seed"] == 2 and 0 <= rung.measured["class_accuracy"] <= 1
        assert rung.measured["fid"] <= 10 * rung.measured["top_fid"]

    out = CliRunner().invoke(export_main, tune_args(engines, classifier, reference, *loose, "--rungs", "0"))
    assert out.exit_code == 0 and Manifest.read(engines).recommended.ladder == [], out.output
    guided = CliRunner().invoke(export_main, tune_args(engines, classifier, reference, *loose, "--guidance", "2",
                                                       "--min-accuracy", "0", "--dry-run"))  # fmt: skip
    assert guided.exit_code == 0 and "cfg 2 at sigma" in guided.output, guided.output  # guided trials ran
    plain = CliRunner().invoke(export_main, tune_args(engines, tuned_folder[1], reference, *loose))  # no logits
    assert plain.exit_code == 0 and "class accuracy not checked" in plain.output, plain.output
    assert "class_accuracy" not in Manifest.read(engines).recommended.measured


def test_a_classifier_of_another_class_count_is_refused(tuned_folder, tmp_path):
    engines, _, reference = tuned_folder
    classifier = write_features(tmp_path / "seven.onnx", classes=7)
    out = CliRunner().invoke(export_main, tune_args(engines, classifier, reference))
    assert out.exit_code == 1 and "scores 7 classes; the model has 10" in out.output, out.output


def test_a_feature_model_with_outputs_other_than_features_and_logits_is_refused(tuned_folder, tmp_path):
    engines, _, reference = tuned_folder
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], [name], axis=1) for name in ("a", "b", "c")],
        "three",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 256]) for name in ("a", "b", "c")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "three.onnx")
    out = CliRunner().invoke(export_main, tune_args(engines, tmp_path / "three.onnx", reference))
    assert out.exit_code == 1 and "expected the outputs features and (optionally) logits" in out.output, out.output


def test_a_rebuild_keeps_the_setting_and_other_weights_refuse_it(tmp_path):
    from lego_export.checkpoint import save_checkpoint
    from lego_export.config import get_preset
    from lego_export.export.build import BuildOptions, build
    from lego_export.manifest import Recommended
    from lego_export.model import LegoModel

    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, LegoModel(get_preset("pg-tiny")))
    options = BuildOptions(ckpt=str(ckpt), out=str(tmp_path / "e"), max_batch=4, opt_batch=2, fuse=False)
    manifest = build(options)
    tuned = SamplingOptions("euler", 7, "2@1:", guidance=1.5, guidance_interval="0.5:3")
    manifest.recommended = Recommended(tuned, manifest.source["sha256"], {"fid": 1.0})
    manifest.write(tmp_path / "e")
    assert build(options).recommended == manifest.recommended  # guidance and its interval kept
    (tmp_path / "rec.json").write_text(json.dumps({**manifest.recommended.to_dict(), "checkpoint_sha256": "0" * 64}))
    out = CliRunner().invoke(export_main, ["build", "--ckpt", str(ckpt), "--out", str(tmp_path / "e"),
                                           "--recommended", str(tmp_path / "rec.json")])  # fmt: skip
    assert out.exit_code == 1 and "tuned on other weights" in out.output


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sampler", "ddim", "expected one of heun, euler, dpm2m"),
        ("steps", 0, "expected an integer from 1"),
        ("skip_policy", "2@0.5:; rm -rf /", "expected rules like"),
        ("reuse_residual", "yes", "expected true or false"),
        ("measured", {"fid": float("nan")}, "not a number JSON allows"),
        ("checkpoint_sha256", "abc", "sha256"),
        ("guidance", "lots", "guidance: expected a number"),
        ("guidance", 1e9, "guidance must be"),
        ("guidance_interval", "3:1", "given without guidance"),
    ],
)
def test_a_bad_recommended_setting_in_a_manifest_is_refused(tmp_path, field, value, message):
    engines = tmp_path / "engines"
    shutil.copytree(TINY, engines)
    data = json.loads((engines / "manifest.json").read_text())
    data["recommended"] = {"sampler": "euler", "steps": 4, "skip_policy": "", "reuse_residual": False,
                           "checkpoint_sha256": "a" * 64, "measured": {}, field: value}  # fmt: skip
    text = json.dumps(data, allow_nan=True)
    (engines / "manifest.json").write_text(text)
    out = CliRunner().invoke(lego_run, ["--engines", str(engines), "--num", "1", "--out", str(tmp_path / "g.png")])
    assert out.exit_code == 1, out.output
    assert message in out.output and "Traceback" not in out.output


@pytest.mark.parametrize(
    "reference, message",
    [
        (lambda p: np.savez(p, mu=np.zeros(3), sigma=np.eye(3)), "different feature sizes"),
        (lambda p: np.savez(p, mu=np.zeros(6), sigma=np.eye(5)), "mu must be D and sigma D x D"),
        (lambda p: np.savez(p, images=np.zeros((4, 16, 16), np.float32)), "images must be uint8"),
        (lambda p: np.savez(p, images=np.array([{"x": 1}], dtype=object)), "not a readable .npz"),
        (lambda p: p.write_bytes(b"not an npz"), "not a readable .npz"),
    ],
)
def test_bad_reference_files_are_refused_in_one_line(tuned_folder, tmp_path, reference, message):
    engines, features, _ = tuned_folder
    path = tmp_path / "bad.npz"
    reference(path)
    out = CliRunner().invoke(export_main, tune_args(engines, features, path))
    assert out.exit_code == 1 and message in out.output and "Traceback" not in out.output, out.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", "-1"], "--seed must be an integer from 0"),
        (["--seed", str(2**63 - 1)], "--seed must be an integer from 0"),  # seed + 1 validates
        (["--threads", "-1"], "--threads must be from 0"),
        (["--threads", str(10**6)], "--threads must be from 0"),
        (["--max-fid-increase", "nan"], "--max-fid-increase must be from 0 to 10"),
        (["--max-fid-increase", "-1"], "--max-fid-increase must be from 0 to 10"),
        (["--max-accuracy-drop", "nan"], "--max-accuracy-drop must be from 0 to 1"),
        (["--max-accuracy-drop", "2"], "--max-accuracy-drop must be from 0 to 1"),
        (["--rung-fid-ratio", "0.5"], "--rung-fid-ratio must be from 1 to 10"),
        (["--rung-fid-ratio", "inf"], "--rung-fid-ratio must be from 1 to 10"),
        (["--min-accuracy", "nan"], "--min-accuracy must be from 0 to 1"),
        (["--min-accuracy", "1.5"], "--min-accuracy must be from 0 to 1"),
        (["--min-accuracy", "0.5"], "--min-accuracy needs class accuracy"),  # these features have no logits
        (["--guidance", "0.5"], "--guidance must be from 1 to 100"),
        (["--guidance", "inf"], "--guidance must be from 1 to 100"),
        (["--num", "1"], "--num must be at least 2"),
        (["--num", str(10**7)], "--num must be an integer from 1"),
        (["--candidates", "dpm2m:0"], "cannot read 'dpm2m:0'"),
    ],
)
def test_bad_tune_options_are_refused_in_one_line(tuned_folder, extra, message):
    engines, features, reference = tuned_folder
    out = CliRunner().invoke(export_main, tune_args(engines, features, reference, *extra))
    assert out.exit_code == 1 and message in out.output and "Traceback" not in out.output, out.output


def test_a_features_model_of_another_image_size_is_refused(tuned_folder, tmp_path):
    engines, _, reference = tuned_folder
    features = write_features(tmp_path / "f8.onnx", side=8)  # the engines make 16 x 16 images
    out = CliRunner().invoke(export_main, tune_args(engines, features, reference))
    assert out.exit_code == 1 and "takes images of 1 x 8 x 8; the model makes 1 x 16 x 16" in out.output, out.output


def test_reference_images_the_extractor_cannot_take_are_refused(tuned_folder, tmp_path):
    """A feature model with a free image size runs on the samples, then fails on reference images of
    another shape: one line, not ONNX Runtime's traceback."""
    engines, features, _ = tuned_folder
    np.savez(tmp_path / "r.npz", images=np.zeros((4, 28, 28), np.uint8))
    out = CliRunner().invoke(export_main, tune_args(engines, features, tmp_path / "r.npz"))
    assert out.exit_code == 1 and "the feature extractor cannot take images of" in out.output, out.output


def test_a_features_file_that_is_not_onnx_is_refused(tuned_folder, tmp_path):
    engines, _, reference = tuned_folder
    (tmp_path / "f.onnx").write_bytes(b"\x00" * 64)
    out = CliRunner().invoke(export_main, tune_args(engines, tmp_path / "f.onnx", reference))
    assert out.exit_code == 1 and "not an ONNX model" in out.output, out.output


def test_a_small_npz_holding_a_huge_array_is_refused_before_it_is_read(tuned_folder, tmp_path, monkeypatch):
    from lego_export import tune

    engines, features, _ = tuned_folder
    np.savez_compressed(tmp_path / "r.npz", images=np.zeros((200, 16, 16), np.uint8))  # ~50 KB inside
    assert (tmp_path / "r.npz").stat().st_size < 1000
    monkeypatch.setattr(tune, "MAX_REFERENCE_FILE", 1000)
    out = CliRunner().invoke(export_main, tune_args(engines, features, tmp_path / "r.npz"))
    assert out.exit_code == 1 and "an array larger than" in out.output, out.output
