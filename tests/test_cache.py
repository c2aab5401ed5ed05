"""Brick caching: reuse, forecast, the per-image gate, front-brick caching and the guidance cache."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lego_export.arrays import NumpyArrays
from lego_export.denoiser import BrickCache, BrickHistory, denoise, lagrange_weights
from lego_export.edm import EDMConfig
from lego_export.options import OptionError, SamplingOptions
from lego_export.plan import engine_work, plan
from lego_export.runtime.cli import main as lego_run
from lego_export.runtime.pipeline import LegoPipeline
from lego_export.serve.validation import OPTION_NAMES, Limits, RequestError, parse_image_request

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-engines"  # pg-tiny: bricks of 4, 8 and 16 pixels, 16 x 16, 10 classes
BASE = dict(num=5, seed=3, batch=5, recommended=False, sampler="dpm2m", steps=8)


@pytest.fixture(scope="module")
def pipe():
    p = LegoPipeline.from_engines(TINY, "onnxruntime")
    yield p
    p.close()


@pytest.fixture(scope="module")
def full(pipe):
    return pipe(**BASE)


def runs(result) -> list[list[int]]:
    """Rows each brick ran, per step."""
    return [s["run"] for s in result.timing.bricks_per_step]


def test_settings_that_cache_nothing_give_exactly_the_images_without_caching(pipe, full):
    """The inert values of every field take the caching code path and change no bit."""
    for inert in (dict(gate=0.0), dict(cache="0@0:,1@0:,2@0:"), dict(gate=0.0, forecast=2)):
        np.testing.assert_array_equal(pipe(**BASE, **inert).images, full.images)
    guided = pipe(**BASE, guidance=1.5)
    np.testing.assert_array_equal(pipe(**BASE, guidance=1.5, guidance_cache="100:200").images, guided.images)
    np.testing.assert_array_equal(pipe(**BASE, guidance=1.5, gate=0.0).images, guided.images)


def test_a_gate_of_zero_runs_every_brick_and_a_huge_one_only_brick_0_after_warm_up(pipe, full):
    zero = pipe(**BASE, gate=0.0)
    assert runs(zero) == [[5, 5, 5]] * 8 and zero.timing.full_chain_evaluations == pytest.approx(8.0)
    huge = pipe(**BASE, gate=1e6)
    assert runs(huge) == [[5, 5, 5]] + [[5, 0, 0]] * 7
    assert [s["reused"] for s in huge.timing.bricks_per_step[1:]] == [[0, 5, 5]] * 7
    shares = np.array(pipe.brick_flops) / sum(pipe.brick_flops)
    assert huge.timing.full_chain_evaluations == pytest.approx(1 + 7 * shares[0])
    difference = np.abs(huge.images - full.images).max()
    assert 1e-3 < difference < 0.5  # the later bricks' corrections are not nothing, and their reuse is close


def test_a_middle_gate_runs_the_later_bricks_for_some_images_in_smaller_calls(pipe, full):
    result = pipe(**BASE, gate=0.1)
    later = [r[1] for r in runs(result)]
    assert later[0] == 5 and min(later) < 5 and 0 < sum(later) < 40  # per image, not all or nothing
    assert runs(result) == [[5, r, r] for r in later]  # bricks 1 and 2 go together after the gate


def test_a_gate_on_the_input_gates_every_brick(pipe, full):
    """gate_signal "input": the change of c_in x decides for the whole chain, brick 0 included."""
    np.testing.assert_array_equal(pipe(**BASE, gate=0.0, gate_signal="input").images, full.images)
    huge = pipe(**BASE, gate=1e6, gate_signal="input")
    assert runs(huge) == [[5, 5, 5]] + [[0, 0, 0]] * 7 and huge.timing.full_chain_evaluations == pytest.approx(1.0)
    middle = pipe(**BASE, gate=0.05, gate_signal="input", forecast=1)
    assert all(r[0] == r[1] == r[2] for r in runs(middle)) and 1 < middle.timing.full_chain_evaluations < 8


def test_reuse_and_forecast_change_the_images_but_stay_close(pipe, full):
    """Cached bricks 1 and 2 below sigma 1: reuse (order 0) is the per-brick form of skip + residual
    reuse; forecasts extrapolate in log sigma. All stay within a small distance of the full chain."""
    rules = "1@1:,2@1:"
    reused = pipe(**BASE, cache=rules)
    skipped = pipe(**BASE, skip="1@1:", reuse_residual=True)
    np.testing.assert_allclose(reused.images, skipped.images, atol=1e-5)  # the same corrections, per brick
    distances = {}
    for order in (0, 1, 2):
        result = pipe(**BASE, cache=rules, forecast=order)
        distances[order] = np.abs(result.images - full.images).mean()
        assert 1e-5 < distances[order] < 0.05
        cached_steps = [s for s in result.timing.bricks_per_step if s["sigma"] < 1]
        kind = "reused" if order == 0 else "forecast"
        assert cached_steps and all(s[kind][1:] == [5, 5] and s["run"] == [5, 0, 0] for s in cached_steps)
    assert distances[1] != distances[0] and distances[2] != distances[1]


def test_brick_0_may_be_cached_and_hands_its_output_to_the_bricks_after_it(pipe, full):
    result = pipe(**BASE, cache="0@1:")
    low = [s for s in result.timing.bricks_per_step if s["sigma"] < 1]
    assert low and all(s["run"] == [0, 5, 5] and s["reused"] == [5, 0, 0] for s in low)
    assert 0 < np.abs(result.images - full.images).max() < 0.1


def test_the_guidance_cache_runs_the_conditional_half_only(pipe):
    guided = pipe(**BASE, guidance=1.5)
    cached = pipe(**BASE, guidance=1.5, guidance_cache="0:2")
    rows = [s["rows"] for s in cached.timing.bricks_per_step]
    assert rows == [10 if s["sigma"] > 2 else 5 for s in cached.timing.bricks_per_step] and 5 in rows
    assert cached.timing.full_chain_evaluations < guided.timing.full_chain_evaluations
    assert 0 < np.abs(cached.images - guided.images).max() < 0.1


def test_the_plan_knows_the_cached_bricks_and_prices_the_gate_by_its_upper_bound(pipe):
    model = pipe.cfg
    options = SamplingOptions(sampler="dpm2m", steps=8, cache="2@1:,0@0.05:", guidance=1.5, guidance_cache="0:2")
    steps = plan(options, model, (16, 16))
    assert [p.cached for p in steps] == [(0, 2) if p.sigma < 0.05 else (2,) if p.sigma < 1 else () for p in steps]
    assert [p.guidance_cached for p in steps] == [p.sigma <= 2 for p in steps]
    work = engine_work(options, model, (16, 16), num=3)
    halves = [1 if p.guidance_cached else 2 for p in steps]
    assert [w.get("brick2", 0) for w in work] == [
        3 * h if p.sigma >= 1 else 0 for p, h in zip(steps, halves, strict=True)
    ]
    assert [w["embedder"] for w in work] == [3 if p.guidance_cached else 6 for p in steps]
    gated = SamplingOptions(sampler="dpm2m", steps=8, gate=0.5)
    assert engine_work(gated, model, (16, 16), 3) == engine_work(SamplingOptions(sampler="dpm2m", steps=8), model,
                                                                 (16, 16), 3)  # fmt: skip


def test_a_cache_rule_waits_for_the_bricks_first_run():
    """Nothing is cached before a brick has run once: a rule that starts off runs it at the first step."""
    from lego_export.manifest import Manifest

    model = Manifest.read(TINY).model
    steps = plan(SamplingOptions(sampler="dpm2m", steps=4, cache="1@:10"), model, (16, 16))
    assert steps[0].sigma > 10 and steps[0].cached == () and all(p.cached == (1,) for p in steps[1:] if p.sigma > 10)


def fake_bricks(counts: list[int], channels: int = 1):
    """Bricks that count the tiles they are called with and return a function of their input."""

    def brick(k):
        def call(tiles, cond):
            counts[k] += tiles.shape[0]
            return np.tanh(tiles[:, :channels] * (k + 1) + cond[:, :1, None, None]).astype(np.float32)

        return call

    return [brick(k) for k in range(3)]


def test_the_record_counts_the_rows_each_brick_was_called_with():
    edm, sizes = EDMConfig(), [4, 8, 16]
    counts = [0, 0, 0]

    def embed(c_noise, onehot):
        return np.repeat(np.asarray(c_noise, np.float32)[:, None], 4, 1)

    kwargs = dict(embed=embed, bricks=fake_bricks(counts), brick_sizes=sizes, edm=edm, arrays=NumpyArrays())
    cache = BrickCache(order=1, gate=0.05, track=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 16, 16)).astype(np.float32)
    for step, sigma in enumerate([10.0, 5.0, 2.0, 1.0, 0.5]):
        before = list(counts)
        denoise(x * sigma, sigma, cache=cache, cached=(2,) if step >= 3 else (), **kwargs)
        record = cache.record[-1]
        tiles_per_image = [(16 // s) ** 2 for s in sizes]
        assert [(c - b) // t for c, b, t in zip(counts, before, tiles_per_image, strict=True)] == record["run"]
        kinds = zip(record["run"], record["reused"], record["forecast"], strict=True)
        assert [r + u + f for r, u, f in kinds] == [6] * 3
    assert cache.record[-1]["run"][2] == 0 and cache.record[-1]["forecast"][2] == 6


def test_the_timing_counts_brick_flops_of_the_tiles_the_engines_ran(pipe):
    calls = {k: 0 for k in range(3)}
    originals = [b.infer for b in pipe.bricks]

    def counting(k):
        def infer(feeds, timing=None):
            calls[k] += feeds["tiles"].shape[0]
            return originals[k](feeds, timing)

        return infer

    try:
        for k, b in enumerate(pipe.bricks):
            b.infer = counting(k)
        result = pipe(**BASE, gate=0.1, cache="0@0.1:", forecast=1)
    finally:
        for b, original in zip(pipe.bricks, originals, strict=True):
            b.infer = original
    per_image = [(16 // b.size) ** 2 for b in pipe.cfg.bricks]
    expected = sum(calls[k] / per_image[k] * pipe.brick_flops[k] for k in range(3))
    assert result.timing.brick_flops == pytest.approx(expected)
    assert 0 < expected < 8 * 5 * sum(pipe.brick_flops)


def test_forecasts_are_exact_on_polynomials_of_their_order():
    a = NumpyArrays()
    history = BrickHistory.empty(np.zeros((1, 1, 2, 2), np.float32), 2, 3, a)
    nodes = np.log([8.0, 4.0, 2.0])
    for t in nodes:
        value = np.full((2, 1, 2, 2), 1 + 2 * t + 0.5 * t * t, np.float32)
        history.push(np.arange(2), value, float(t), a)
    target = float(np.log(1.0))
    quad, used = history.forecast(np.arange(2), target, 2, 1, a)
    assert (used == 3).all() and np.allclose(quad, 1 + 2 * target + 0.5 * target**2, atol=1e-4)
    last, used = history.forecast(np.arange(2), target, 0, 1, a)
    assert (used == 1).all() and np.allclose(last, 1 + 2 * nodes[-1] + 0.5 * nodes[-1] ** 2)
    assert lagrange_weights(np.array([0.0, 1.0]), 2.0) == pytest.approx([-1.0, 2.0])  # linear extrapolation


def test_the_same_sigma_replaces_a_stored_correction():
    """Heun's second evaluation and the next step's first share a sigma: nodes stay distinct."""
    a = NumpyArrays()
    history = BrickHistory.empty(np.zeros((1, 1, 2, 2), np.float32), 1, 3, a)
    for value in (1.0, 2.0):
        history.push(np.arange(1), np.full((1, 1, 2, 2), value, np.float32), 0.5, a)
    assert history.count[0] == 1 and history.values[0][0, 0, 0, 0] == 2.0


def test_cli_flags_plan_and_errors(tmp_path):
    base = ["--engines", str(TINY), "--sampler", "dpm2m", "--steps", "6"]
    out = CliRunner().invoke(lego_run, [*base, "--cache", "2@1:", "--gate", "0.1", "--cfg", "1.5", "--cfg-cache",
                                        "0:2", "--plan"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "brick2(16) cached" in out.output and "decided at run time" in out.output
    assert "conditional half" in out.output
    bad = CliRunner().invoke(lego_run, [*base, "--gate", "-1", "--plan"])
    assert bad.exit_code != 0 and "--gate must be" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(lego_run, [*base, "--forecast", "1", "--plan"])
    assert bad.exit_code != 0 and "--forecast applies only" in bad.output
    timing = tmp_path / "t.json"
    ran = CliRunner().invoke(lego_run, [*base, "--num", "2", "--gate", "1e6", "--timing-json", str(timing), "--out",
                                        str(tmp_path / "g.png")])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    data = json.loads(timing.read_text())
    assert data["bricks_per_step"][1]["run"] == [2, 0, 0] and data["full_chain_evaluations"] < 6
    assert data["options"]["gate"] == 1e6 and data["full_chain_evaluations"] == pytest.approx(
        data["full_chain_evaluations"]
    )


def test_server_fields_map_to_options_and_errors_name_them():
    from lego_export.manifest import Manifest

    manifest = Manifest.read(TINY)
    req = parse_image_request({"cache": "2@1:", "forecast": 1, "gate": 0.1, "cfg": 1.5, "cfg_cache": "0:2"},
                              manifest, Limits())  # fmt: skip
    assert req.options.cache == "2@1:" and req.options.gate == 0.1 and req.options.guidance_cache == "0:2"
    for body, name in (({"cfg_cache": "0:2"}, "cfg_cache"), ({"gate": -1}, "gate"), ({"cache": "9@1:"}, "cache")):
        with pytest.raises(RequestError) as caught:
            parse_image_request(body, manifest, Limits())
        assert caught.value.status == 400 and caught.value.message.startswith(name)


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"cache": ""}, "cache", "needs a rule like"),
        ({"cache": " , "}, "cache", "needs a rule like"),
        ({"cache": "1@-1:"}, "cache", "0 or more"),
        ({"skip": "1@-0.5:2"}, "skip", "0 or more"),
        ({"cache": "1@nan:"}, "cache", "bounds must be numbers"),
        ({"gate": float("nan")}, "gate", "finite number"),
        ({"gate": 1e300}, "gate", "finite number"),
        ({"forecast": -1, "cache": "1@1:"}, "forecast", "integer from 0 to 2"),
    ],
)
def test_hostile_cache_values_are_refused_naming_the_field(fields, field, message):
    with pytest.raises(OptionError) as caught:
        SamplingOptions(sampler="dpm2m", steps=4, **fields).validate(LegoPipeline.from_engines(TINY, "onnxruntime").cfg)
    assert caught.value.field == field and message in str(caught.value), caught.value


def test_options_errors_name_fields_not_flags():
    with pytest.raises(OptionError) as caught:
        SamplingOptions(gate=-1.0).validate(LegoPipeline.from_engines(TINY, "onnxruntime").cfg)
    assert caught.value.field == "gate" and "--" not in str(caught.value)


def test_frontier_quick_runs_on_the_tiny_engines_and_writes_only_where_asked(tmp_path):
    from tests.test_tune import write_features

    features = write_features(tmp_path / "features.onnx", classes=10)
    real = (np.random.default_rng(1).random((200, 16, 16)) * 255).astype(np.uint8)
    np.savez(tmp_path / "real.npz", images=real)
    script = ROOT / "benchmarks" / "frontier.py"
    assert "--quick" in subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True).stdout
    out = tmp_path / "frontier"
    done = subprocess.run(
        [sys.executable, script, "--quick", "--engines", str(TINY), "--features", str(features), "--reference",
         str(tmp_path / "real.npz"), "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    families = {r["family"] for r in data["rows"]}
    assert families == {"full chain", "skip", "cache"} and all(np.isfinite(r["fid"]) for r in data["rows"])
    cached = [r for r in data["rows"] if r["family"] == "cache"]
    guided_full = next(r for r in data["rows"] if r["name"] == "dpm2m 4, guided")["full_chain_evaluations"]
    assert guided_full == pytest.approx(8.0)  # 4 steps, every one guided: both halves
    assert cached[0]["full_chain_evaluations"] < 4 and cached[1]["full_chain_evaluations"] < guided_full
    plotted = importlib.util.find_spec("matplotlib") is not None  # the bench extra draws the plot
    written = ["frontier.json", "frontier.md"] + (["frontier.png"] if plotted else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["features.onnx", "real.npz", *written])


def test_the_server_runs_every_mechanism_and_gives_the_offline_images(pipe):
    """The server's batcher takes the gate's smaller calls: each request's images equal the pipeline's
    for the same options (the whole request is one batch), and its run record says what ran."""
    from tests.test_serve import make_service, npz_images, running

    service, _ = make_service()
    base = {"num": 3, "steps": 6, "sampler": "dpm2m", "seed": 4, "class": 2, "format": "npz"}
    variants = {
        "gate": {"gate": 0.05},
        "input gate": {"gate": 0.05, "gate_signal": "input", "forecast": 1},
        "cache": {"cache": "0@0.1:,2@1:", "forecast": 2},
        "cfg cache": {"cfg": 1.5, "cfg_cache": "0:3"},
    }
    with running(service) as http:
        answers = {k: http.post("/v1/images", json={**base, **v}) for k, v in variants.items()}
    for name, extra in variants.items():
        fields = {OPTION_NAMES.get(k, k): v for k, v in extra.items()}
        want = pipe(num=3, batch=3, sampler="dpm2m", steps=6, seed=4, classes=[2], recommended=False, **fields)
        np.testing.assert_allclose(npz_images(answers[name]), want.images, atol=1e-5, rtol=0, err_msg=name)
        run = json.loads(answers[name].headers["X-Lego-Run"])
        if want.options.caches:  # a gate decides at run time: the record says what ran
            assert run["full_chain_evaluations"] == pytest.approx(want.timing.full_chain_evaluations, abs=1e-3)


def test_frontier_speed_only_times_the_rows_side_by_side(tmp_path):
    script = ROOT / "benchmarks" / "frontier.py"
    done = subprocess.run(
        [sys.executable, script, "--quick", "--engines", str(TINY), "--speed-only", "--only",
         "dpm2m 4;cache: dpm2m 4, gate", "--out", str(tmp_path / "speed")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["dpm2m 4", "cache: dpm2m 4, gate 0.05, cfg cache"]  # the exact name alone
    assert all(r["images_per_s"] > 0 and len(r["round_images_per_s"]) == 1 for r in rows)
    assert rows[0]["full_chain_evaluations"] == pytest.approx(4.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed.json", "speed.md"]
