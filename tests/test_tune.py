"""lego-export tune: the frontier search, its validation, the named points, and every surface selecting them."""

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
from lego_export.errors import LegoError
from lego_export.fid import FeatureStats, fid, frechet_distance
from lego_export.flops import model_brick_flops
from lego_export.manifest import Manifest
from lego_export.options import OptionError, SamplingOptions
from lego_export.runtime.cli import main as lego_run
from lego_export.tune import (
    Frontier,
    Point,
    Rules,
    Setting,
    Space,
    Trial,
    Tuner,
    ValidationFailed,
    ladder_points,
    name_points,
    pareto,
)

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
        "--quick", "--batch", "24", "--reference-setting", "heun:4", *extra,
    ]  # fmt: skip


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    a = FeatureStats(np.zeros(3), np.diag([1.0, 4.0, 9.0]))
    b = FeatureStats(np.ones(3), np.diag([4.0, 4.0, 1.0]))
    # |mu|^2 + sum (sqrt(s_a) - sqrt(s_b))^2 for diagonal covariances
    assert frechet_distance(a, b) == pytest.approx(3 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2)
    x = np.random.default_rng(0).standard_normal((500, 4))
    assert fid(x, x) == pytest.approx(0, abs=1e-8)


class ScriptedTuner(Tuner):
    """The search without sampling: FID and class accuracy are fixed functions of (setting, seed)."""

    def __init__(self, manifest, fid_of, accuracy_of=None):
        self.model, self.flops = manifest.model, model_brick_flops(manifest.model)
        self.fid_of, self.accuracy_of, self.seen, self.sizes = fid_of, accuracy_of, [], []
        self.classify = accuracy_of is not None
        self.log = lambda _m: None
        self.num, self.seed = 100, 0

    def trial(self, setting, seed=None, num=None):
        seed = self.seed if seed is None else seed
        self.seen.append((setting, seed))
        self.sizes.append(num or self.num)
        accuracy = self.accuracy_of(setting, seed) if self.accuracy_of else None
        flops = self.planned_flops(setting)
        return Trial(setting, self.fid_of(setting, seed), flops, 1.0, accuracy, seed, num or self.num)


def scripted_fid(s: Setting, seed: int = 0) -> float:
    """More steps, a lower FID; Heun worse than DPM-Solver++; each tenth of the trajectory without
    brick 1 (which takes brick 2 with it) costs 0.5, without brick 2 0.2."""
    skipped = s.skipped or (0.0, 0.0)
    return {"dpm2m": 1.0, "heun": 3.0}[s.base.sampler] + 24 / s.base.steps + 5 * skipped[0] + 2 * max(skipped)


def test_the_pareto_set_keeps_exactly_the_points_no_other_beats():
    def t(flops, fid, accuracy=None):
        return Trial(Setting(SamplingOptions("dpm2m", 8)), fid, flops, 1.0, accuracy)

    rows = [t(4, 10, 0.8), t(6, 8, 0.8), t(6, 9, 0.8), t(8, 8, 0.9), t(8, 8, 0.8), t(3, 12, 0.7)]
    # (6, 9) loses to (6, 8) on FID; (8, 8, 0.8) to (6, 8, 0.8) on FLOPs; (8, 8, 0.9) stays for its accuracy
    assert pareto(rows) == [rows[5], rows[0], rows[1], rows[3]]
    plain = [dataclasses.replace(r, class_accuracy=None) for r in rows]
    assert pareto(plain) == [plain[5], plain[0], plain[1]]  # without accuracy: FLOPs and FID alone


def test_the_search_samples_a_coarse_grid_then_skips_the_pareto_chains_then_refines():
    manifest = Manifest.read(TINY)
    space = Space(("dpm2m", "heun"), (4, 8), (0.5,), ({"reuse_residual": True},), refine_rounds=0, max_trials=200,
                  screen=1)  # fmt: skip
    coarse = ScriptedTuner(manifest, scripted_fid)
    coarse.search(space, Rules())
    sampled = [(s.base.sampler, s.base.steps, s.skipped) for s, _ in coarse.seen]
    chains = [(sampler, steps, (0.0, 0.0)) for sampler in ("dpm2m", "heun") for steps in (4, 8)]
    assert sorted(sampled[:4]) == sorted(chains)  # every sampler x step count, full chain, first
    # Heun is beaten by DPM-Solver++ 4 (fewer FLOPs, a lower FID): only the DPM-Solver++ chains get
    # skip windows, and (0.5, 0.5) runs the plan of (0.5, 0): sampled once.
    assert sorted(sampled[4:]) == sorted(("dpm2m", steps, f) for steps in (4, 8) for f in [(0.0, 0.5), (0.5, 0.0)])
    assert all(s.base.reuse_residual for s, _ in coarse.seen if any(s.skipped))

    tuner = ScriptedTuner(manifest, scripted_fid)
    frontier = tuner.search(dataclasses.replace(space, refine_rounds=2), Rules())
    visited = {(s.base.sampler, s.base.steps) for s, _ in tuner.seen}
    assert {("dpm2m", n) for n in (5, 6, 7)} & visited  # refinement visits the counts between the grid's
    plans = [tuner.key(s) for s, _ in tuner.seen]
    assert len(plans) == len(set(plans))  # no plan is ever sampled twice
    assert frontier.pareto == pareto(frontier.searched)
    assert all(seed == 0 for _, seed in tuner.seen)  # the search sees only its own seeds
    # FLOPs come from the plan: brick 2 off for the last half of 4 steps (2 steps) saves its share twice
    half = next(t for t in frontier.searched if t.setting.skipped == (0.0, 0.5) and t.setting.base.steps == 4)
    share = model_brick_flops(manifest.model)[2] / sum(model_brick_flops(manifest.model))
    assert half.flops == pytest.approx(4 - 2 * share)

    capped = ScriptedTuner(manifest, scripted_fid)
    capped.search(dataclasses.replace(space, refine_rounds=2, max_trials=7), Rules())
    assert len(capped.seen) == 7


def test_screening_drops_settings_clearly_beaten_on_a_share_of_the_images_before_their_full_trial():
    manifest = Manifest.read(TINY)
    space = Space(("dpm2m", "heun"), (4, 8), (0.5,), ({"reuse_residual": True},), refine_rounds=0, screen=4)
    tuner = ScriptedTuner(manifest, scripted_fid)
    frontier = tuner.search(space, Rules())
    screened = [(s.base.sampler, s.base.steps) for (s, _), n in zip(tuner.seen, tuner.sizes, strict=True) if n == 25]
    full = [t.setting for t in frontier.searched]
    assert all(t.images == 100 for t in frontier.searched)  # what is kept is measured on every image
    # Heun 4 (7 evaluations, FID 9) and Heun 8 (15, FID 6) lose to DPM-Solver++ 4 (4, FID 7) and 8
    # (8, FID 4) by more than a fifth: screened on 25 images, never sampled in full.
    assert ("heun", 4) in screened and ("heun", 8) in screened
    assert not any(s.base.sampler == "heun" for s in full)
    assert {(s.base.sampler, s.base.steps) for s in full if not any(s.skipped)} == {("dpm2m", 4), ("dpm2m", 8)}
    # a margin nothing clears drops nothing
    keep_all = ScriptedTuner(manifest, scripted_fid)
    keep_all.search(dataclasses.replace(space, screen_margin=10.0), Rules())
    assert {s.base.sampler for (s, _), n in zip(keep_all.seen, keep_all.sizes, strict=True) if n == 100} == {
        "dpm2m",
        "heun",
    }


def point(flops, search, validation, steps=8):
    setting = Setting(SamplingOptions("dpm2m", steps))
    return Point(Trial(setting, search[0], flops, 1.0, search[1], 0, 100), Trial(setting, *validation[:1], flops,
                 1.0, validation[1], 1, 200))  # fmt: skip


def frontier_points():
    return {
        "A": point(12, (10.0, 0.85), (10.0, 0.85), 12),  # the lowest FID
        "B": point(8, (10.4, 0.85), (10.3, 0.845), 8),  # within 5% and 0.01 of A on both seed sets
        "C": point(6, (10.45, 0.85), (10.8, 0.85), 6),  # within on the search seeds only (8% on validation)
        "D": point(5, (11.0, 0.84), (11.2, 0.84), 5),  # within 1.15x and 0.01 of B on both
        "E": point(3, (12.5, 0.85), (13.0, 0.85), 3),  # 1.26x B's FID
        "F": point(4, (11.5, 0.80), (11.4, 0.80), 4),  # 0.045 below B's accuracy
    }


def test_named_points_meet_their_rules_on_the_search_and_the_validation_seeds():
    p = frontier_points()
    notes = []
    rules = Rules(rung_fid_ratio=1.15, rung_accuracy_drop=0.01)
    named = name_points(list(p.values()), rules, classify=True, notes=notes)
    assert (named["best"], named["balanced"], named["fast"]) == (p["A"], p["B"], p["D"])
    assert any("not balanced" in n and "FID 10.800 on the validation seeds, 8.0% above 10.000" in n for n in notes)
    # the ladder below balanced: C and D (E over the FID ratio, F under the accuracy); its cheap end is fast
    frontier = Frontier(points=list(p.values()), named=named)
    assert ladder_points(frontier, p["B"], rules) == [p["C"], p["D"]]
    one = dataclasses.replace(rules, rungs=1)
    assert ladder_points(frontier, p["B"], one) == [p["D"]]  # the rung that sheds the most work
    wider = dataclasses.replace(rules, rung_fid_ratio=1.3)
    assert ladder_points(frontier, p["B"], wider) == [p["C"], p["D"], p["E"]]  # E joins
    # a rung trades quality: F (0.045 below B) joins at a drop of 0.05, and is cheaper than D
    looser = dataclasses.replace(rules, rung_accuracy_drop=0.05)
    assert ladder_points(frontier, p["B"], looser) == [p["C"], p["D"], p["F"]]
    assert name_points(list(p.values()), looser, classify=True)["fast"] is p["F"]
    # an accuracy floor: D (0.84) may no longer be named; C, cheaper than B, within 1.15x of it, is fast
    floored = name_points(list(p.values()), dataclasses.replace(rules, min_accuracy=0.845), classify=True)
    assert (floored["best"], floored["balanced"], floored["fast"]) == (p["A"], p["B"], p["C"])
    assert (
        name_points(list(p.values()), dataclasses.replace(rules, max_fid_increase=0.1), classify=True)["balanced"]
        is p["C"]
    )  # 8% is within 10%


def test_a_floor_no_point_meets_on_the_validation_seeds_fails_naming_the_check_and_the_amount():
    points = [point(8, (10.0, 0.90), (10.2, 0.80)), point(4, (11.0, 0.88), (11.1, 0.79), 4)]
    with pytest.raises(ValidationFailed) as e:
        name_points(points, Rules(min_accuracy=0.82), classify=True)
    assert "class accuracy 0.800 on the validation seeds, 0.020 below the budget 0.820 (--min-accuracy)" in str(e.value)
    assert name_points(points, Rules(min_accuracy=0.79), classify=True)["best"] is points[0]
    # without class accuracy the floor checks nothing
    assert name_points(points, Rules(min_accuracy=0.82), classify=False)["best"] is points[0]


def test_guidance_and_other_option_variants_are_searched_as_more_settings():
    manifest = Manifest.read(TINY)

    def accuracy_of(s, seed):
        return 0.9 if s.base.guidance != 1.0 else 0.8

    tuner = ScriptedTuner(manifest, scripted_fid, accuracy_of)
    guided = {"guidance": 1.5, "guidance_interval": "0.3:3"}
    space = Space(("dpm2m",), (4,), (0.5,), ({}, guided, {"tile_shift": True}), refine_rounds=1)
    frontier = tuner.search(space, Rules())
    seen = [s.base for s, _ in tuner.seen]
    assert any(b.guidance == 1.5 and b.guidance_interval == "0.3:3" for b in seen)
    assert any(b.tile_shift for b in seen)
    # a guided step costs twice: the guided chain is dearer, and on the Pareto set for its accuracy
    chain = [t for t in frontier.searched if not any(t.setting.skipped)]
    plain, dear = sorted((t for t in chain if t.setting.base.tile_shift is None), key=lambda t: t.flops)
    assert dear.setting.base.guidance == 1.5 and dear.flops > plain.flops and dear in frontier.pareto


def test_a_named_point_in_budget_is_written_and_every_surface_selects_it(tuned_folder, tmp_path):
    from lego_export.runtime.pipeline import LegoPipeline
    from lego_export.serve.validation import Limits, RequestError, parse_image_request

    engines, features, reference = tuned_folder
    classifier = write_features(tmp_path / "classifier.onnx", classes=10)
    saved = tmp_path / "recommended.json"
    runner = CliRunner()
    out = runner.invoke(export_main, tune_args(engines, classifier, reference, "--save", str(saved)))
    assert out.exit_code == 0, out.output
    tuned = Manifest.read(engines).recommended
    assert set(tuned.points) == {"best", "balanced", "fast"}
    assert tuned.options == tuned.points["balanced"].options and tuned.measured["name"] == "balanced"
    assert json.loads(saved.read_text()) == json.loads(json.dumps(tuned.to_dict()))  # the same named points
    rows = {tuple(r["names"]): r for r in tuned.measured["frontier"] if r["names"]}
    assert any("best" in names for names in rows) and tuned.measured["validation"]["in_budget"]
    best = tuned.points["best"].measured
    assert best["fid"] == min(r["fid"] for r in tuned.measured["frontier"])  # best: the lowest validated FID
    assert best["seed"] == 1 and best["search"]["seed"] == 0  # validated on seeds the search never saw
    # lego-serve's ladder (the recommended setting, then its rungs) starts at balanced and ends at fast
    assert tuned.rungs[0] == tuned.points["balanced"].options
    assert tuned.rungs[-1] == tuned.points["fast"].options

    pipe = LegoPipeline.from_engines(engines, "onnxruntime")
    fast = pipe(quality="fast", num=2)
    np.testing.assert_array_equal(fast.images, pipe(tuned.points["fast"].options, num=2).images)
    assert pipe.options(quality="best") == tuned.points["best"].options
    assert pipe.options(quality="fast", guidance=2.0).guidance == 2.0  # guidance combines with a point
    with pytest.raises(OptionError) as e:
        pipe(quality="turbo", num=1)
    assert e.value.field == "quality" and "this model has best, balanced, fast" in str(e.value)
    with pytest.raises(OptionError, match="give it or steps, not both"):
        pipe.options(quality="fast", steps=3)

    npz = tmp_path / "x.npz"
    ran = runner.invoke(lego_run, ["--engines", str(engines), "--quality", "fast", "--num", "2", "--columns", "2",
                                   "--out", str(tmp_path / "g.png"), "--save-npz", str(npz)])  # fmt: skip
    assert ran.exit_code == 0 and "named point 'fast'" in ran.output, ran.output
    np.testing.assert_allclose(np.load(npz)["images"], fast.images, atol=1e-5)  # lego-run's own backend and threads
    for args, message in (
        (["--quality", "turbo"], "--quality 'turbo' is not a named point: this model has best, balanced, fast"),
        (["--quality", "fast", "--steps", "3"], "--quality names a whole sampling setting"),
    ):
        bad = runner.invoke(
            lego_run, ["--engines", str(engines), "--num", "1", "--out", str(tmp_path / "b.png"), *args]
        )
        assert bad.exit_code == 1 and message in bad.output and "Traceback" not in bad.output, bad.output

    manifest = Manifest.read(engines)
    request = parse_image_request({"quality": "balanced"}, manifest, Limits())
    assert request.options == tuned.points["balanced"].options and request.quality == "exact"
    assert request.point == "balanced" and request.describe()["point"] == "balanced"
    for body, message in (
        ({"quality": "turbo"}, "named point (this model's named points: best, balanced, fast), got 'turbo'"),
        ({"quality": "fast", "steps": 3}, "quality names a whole sampling setting"),
    ):
        with pytest.raises(RequestError) as e:
            parse_image_request(body, manifest, Limits())
        assert e.value.status == 400 and message in e.value.message

    out = runner.invoke(export_main, tune_args(engines, classifier, reference, "--recommend", "best"))
    assert out.exit_code == 0, out.output
    tuned = Manifest.read(engines).recommended
    assert tuned.options == tuned.points["best"].options and tuned.measured["name"] == "best"


def test_a_manifest_without_named_points_still_loads_and_says_it_has_none(tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(TINY, engines)
    data = json.loads((engines / "manifest.json").read_text())
    data["recommended"] = {"sampler": "euler", "steps": 4, "skip_policy": "", "reuse_residual": False,
                           "checkpoint_sha256": "a" * 64, "measured": {}}  # fmt: skip
    (engines / "manifest.json").write_text(json.dumps(data))
    manifest = Manifest.read(engines)
    assert manifest.recommended.points == {} and "points" not in manifest.recommended.to_dict()
    out = CliRunner().invoke(lego_run, ["--engines", str(engines), "--quality", "fast", "--num", "1",
                                        "--out", str(tmp_path / "g.png")])  # fmt: skip
    assert out.exit_code == 1 and "this model has no named points (lego-export tune writes them)" in out.output


@pytest.mark.parametrize(
    "points, message",
    [
        ({"Fast!": None}, "'Fast!' is not a point name"),
        ({"exact": None}, "'exact' is not a point name"),  # lego-serve's own quality word
        ({"fast": {"steps": 0}}, "recommended.points.fast.steps: expected an integer from 1"),
        ({"fast": {"skip_policy": "5@1:"}}, "recommended.points.fast: skip"),
        ("fast", "recommended.points: expected an object"),
    ],
)
def test_bad_named_points_in_a_manifest_are_refused_naming_the_point(tmp_path, points, message):
    engines = tmp_path / "engines"
    shutil.copytree(TINY, engines)
    data = json.loads((engines / "manifest.json").read_text())
    setting = {"sampler": "euler", "steps": 4, "skip_policy": "", "reuse_residual": False, "measured": {}}
    if isinstance(points, dict):
        points = {name: {**setting, **(change or {})} for name, change in points.items()}
    data["recommended"] = {**setting, "checkpoint_sha256": "a" * 64, "points": points}
    (engines / "manifest.json").write_text(json.dumps(data))
    out = CliRunner().invoke(lego_run, ["--engines", str(engines), "--num", "1", "--out", str(tmp_path / "g.png")])
    assert out.exit_code == 1 and message in out.output and "Traceback" not in out.output, out.output


def scripted_accuracy(monkeypatch, search: float, validation: float) -> None:
    """Real trials, with class accuracy set by seed: the search's (0) and the validation's (1)."""
    real = Tuner.trial

    def trial(self, setting, seed=None, num=None):
        t = real(self, setting, seed, num)
        t.class_accuracy = search if t.seed == 0 else validation
        return t

    monkeypatch.setattr(Tuner, "trial", trial)


def test_a_choice_that_fails_validation_is_not_written_and_says_which_check_by_how_much(
    tuned_folder, tmp_path, monkeypatch
):
    engines, _, reference = tuned_folder
    classifier = write_features(tmp_path / "classifier.onnx", classes=10)
    saved = tmp_path / "recommended.json"
    before = (engines / "manifest.json").read_bytes()
    scripted_accuracy(monkeypatch, search=0.90, validation=0.80)
    out = CliRunner().invoke(export_main, tune_args(engines, classifier, reference, "--min-accuracy", "0.82",
                                                    "--save", str(saved)))  # fmt: skip
    assert out.exit_code == 1, out.output
    assert "class accuracy 0.800 on the validation seeds, 0.020 below the budget 0.820 (--min-accuracy)" in out.output
    assert "recommended" not in out.output.replace("--recommended", "") and "Traceback" not in out.output
    assert not saved.exists() and (engines / "manifest.json").read_bytes() == before

    out = CliRunner().invoke(export_main, tune_args(engines, classifier, reference, "--min-accuracy", "0.95",
                                                    "--save", str(saved)))  # fmt: skip
    assert out.exit_code == 1 and "no setting searched reaches the class accuracy budget 0.950" in out.output
    assert "0.050 below it" in out.output and not saved.exists()
    assert (engines / "manifest.json").read_bytes() == before

    passing = CliRunner().invoke(export_main, tune_args(engines, classifier, reference, "--min-accuracy", "0.78"))
    assert passing.exit_code == 0 and (engines / "manifest.json").read_bytes() != before, passing.output


def test_the_tuner_without_logits_names_points_by_fid_alone(tuned_folder):
    engines, features, reference = tuned_folder
    out = CliRunner().invoke(export_main, tune_args(engines, features, reference))
    assert out.exit_code == 0 and "class accuracy not checked" in out.output, out.output
    tuned = Manifest.read(engines).recommended
    assert "class_accuracy" in tuned.measured and tuned.measured["class_accuracy"] is None
    assert set(tuned.points) == {"best", "balanced", "fast"}


def test_the_ladder_benchmark_has_help_and_a_quick_mode_that_writes_only_where_told(tuned_folder, tmp_path):
    import subprocess
    import sys

    from lego_export.ladder import serving_ladder

    engines, _, reference = tuned_folder
    classifier = write_features(tmp_path / "classifier.onnx", classes=10)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ladder.py"
    helped = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--quick" in helped.stdout and "--setting" in helped.stdout

    def run(out: Path, *settings: str) -> dict:
        args = [sys.executable, str(script), "--quick", "--engines", str(engines), "--features", str(classifier),
                "--reference", str(reference), "--out", str(out)]  # fmt: skip
        for setting in settings:
            args += ["--setting", setting]
        ran = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr
        return json.loads(out.with_suffix(".json").read_text())

    # Untuned: the default ladder derived from the model, and the settings asked for besides
    written = run(tmp_path / "plain", '{"steps": 3}', '{"steps": 50}')  # Heun 50: rung 0 already, one row
    ladder = serving_ladder(Manifest.read(engines))
    assert not ladder.tuned and written["tuned"] is False
    rows = written["rows"]
    assert [r["setting"] for r in rows] == [o.describe() for o in ladder.rungs] + ["heun, 3 steps, full chain"]
    assert [r["rung"] for r in rows] == [*range(len(ladder.rungs)), None]
    assert [r["tuned"] for r in rows] == [False] * len(ladder.rungs) + [None]
    assert np.load(tmp_path / "plain.features.npz")["features"].shape[:2] == (len(rows), 24)

    # Tuned: the tuner's rungs (rung 0: the recommended setting), the named points that are no rung
    from lego_export.manifest import Recommended, Rung

    top, cheaper = SamplingOptions(sampler="dpm2m", steps=4), SamplingOptions(sampler="dpm2m", steps=3)
    other = SamplingOptions(sampler="euler", steps=5)
    manifest = Manifest.read(engines)
    manifest.recommended = Recommended(
        top, manifest.source["sha256"], {"fid": 1.0}, [Rung(cheaper, {"fid": 2.0})],
        {"best": Rung(top), "balanced": Rung(top), "fast": Rung(cheaper), "other": Rung(other)},
    )  # fmt: skip
    manifest.write(engines)
    written = run(tmp_path / "ladder", '{"sampler": "dpm2m", "steps": 3}', '{"steps": 3}')  # a rung; a new one
    rows = written["rows"]
    assert [(r["setting"], r["rung"], r["tuned"], r["points"]) for r in rows] == [
        (top.describe(), 0, True, ["best", "balanced"]),
        (cheaper.describe(), 1, True, ["fast"]),
        (other.describe(), None, None, ["other"]),
        ("heun, 3 steps, full chain", None, None, []),
    ]
    assert written["tuned"] is True and [r["tuner"] for r in rows] == [{"fid": 1.0}, {"fid": 2.0}, {}, {}]
    assert all(0 <= r["class_accuracy"] <= 1 and r["fid"] >= 0 for r in rows)
    assert np.load(tmp_path / "ladder.features.npz")["features"].shape[:2] == (len(rows), 24)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ladder")) == [
        "ladder.features.npz", "ladder.json", "ladder.md"
    ]  # fmt: skip


def test_bad_recommended_points_do_not_load_through_build(tmp_path):
    """build --recommended FILE reads the named points with the same checks."""
    from lego_export.export.build import read_recommended

    rec = tmp_path / "rec.json"
    setting = {"sampler": "euler", "steps": 4, "skip_policy": "", "reuse_residual": False, "measured": {}}
    rec.write_text(json.dumps({**setting, "checkpoint_sha256": "a" * 64, "points": {"fast": {**setting, "steps": -1}}}))
    with pytest.raises(LegoError, match="points.fast.steps"):
        read_recommended(str(rec), "a" * 64)
    rec.write_text(json.dumps({**setting, "checkpoint_sha256": "a" * 64, "points": {"fast": setting}}))
    assert read_recommended(str(rec), "a" * 64).points["fast"].options == SamplingOptions("euler", 4)


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
        ("cache", 3, "cache: expected a string"),
        ("cache", "9@1:", "cache"),
        ("forecast", 1.5, "forecast: expected an integer"),
        ("gate", "often", "gate: expected a number"),
        ("gate", -1, "gate must be"),
        ("guidance_cache", "0:1", "guidance_cache applies only with guidance"),
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
        (["--rung-accuracy-drop", "-0.1"], "--rung-accuracy-drop must be from 0 to 1"),
        (["--min-accuracy", "nan"], "--min-accuracy must be from 0 to 1"),
        (["--min-accuracy", "1.5"], "--min-accuracy must be from 0 to 1"),
        (["--min-accuracy", "0.5"], "--min-accuracy needs class accuracy"),  # these features have no logits
        (["--guidance", "0.5"], "--guidance must be from 1 to 100"),
        (["--guidance", "inf"], "--guidance must be from 1 to 100"),
        (["--num", "1"], "--num must be at least 2"),
        (["--validation-num", "1"], "--validation-num must be at least 2"),
        (["--num", str(10**7)], "--num must be an integer from 1"),
        (["--validation-num", str(10**7)], "--validation-num must be an integer from 1"),
        (["--samplers", "ddim"], "--samplers: 'ddim' is not a sampler"),
        (["--candidates", "dpm2m:0"], "cannot read 'dpm2m:0'"),
        (["--steps", "0"], "--steps: cannot read '0'"),
        (["--steps", "four"], "--steps: cannot read 'four'"),
        (["--skip-fractions", "1.5"], "--skip-fractions: cannot read '1.5'"),
        (["--reference-setting", "heun:0"], "cannot read 'heun:0'"),
        (["--variant", "gate=0.1"], "--variant 'gate=0.1': expected a JSON object"),
        (["--variant", '{"speed": 2}'], "--variant: 'speed' is not a sampling option"),
        (["--variant", '{"steps": -3}'], "steps must be an integer from 1"),
        (["--guidance", "1.5", "--guidance-interval", "3:1"], "--guidance-interval: guidance_interval"),
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


def test_brick_cache_settings_are_searched_as_variants_and_never_written_without_their_fields(tuned_folder, tmp_path):
    """--variant adds any SamplingOptions fields (brick caching, forecasting, the per-image gate) to the
    search. A named point the manifest's format cannot hold in full is refused, not written without them."""
    from lego_export.manifest import parse_recommended

    engines, _, reference = tuned_folder
    classifier = write_features(tmp_path / "classifier.onnx", classes=10)
    before = (engines / "manifest.json").read_bytes()
    cached = '{"cache": "2@0.5:", "forecast": 1}'
    out = CliRunner().invoke(export_main, tune_args(engines, classifier, reference, "--variant", cached,
                                                    "--variant", '{"gate": 0.05}', "--recommend", "best"))  # fmt: skip
    assert "cache 2@0.5:, forecast 1" in out.output and "gate 0.05" in out.output, out.output  # both were sampled
    if out.exit_code == 0:  # every point reads back whole
        tuned = Manifest.read(engines).recommended
        assert parse_recommended(json.loads(json.dumps(tuned.to_dict())), "x").points == tuned.points
    else:
        assert "the manifest cannot yet store" in out.output and "nothing written" in out.output, out.output
        assert (engines / "manifest.json").read_bytes() == before

    from lego_export.cli import _check_storable
    from lego_export.manifest import Recommended, Rung

    gated = SamplingOptions(sampler="dpm2m", steps=4, gate=0.05, gate_signal="input", forecast=1)
    cached = SamplingOptions(sampler="dpm2m", steps=8, guidance=1.5, cache="0@0.05:10,1@0.3:", guidance_cache="0:1")
    chosen = Recommended(cached, "a" * 64, {}, points={"fast": Rung(gated, {})})
    back = parse_recommended(json.loads(json.dumps(chosen.to_dict())), "x")
    assert back.options == cached and back.points["fast"].options == gated  # every cache field reads back
    assert "cache" not in Recommended(SamplingOptions(), "a" * 64).to_dict()  # absent when off: older readers
    _check_storable(chosen)
