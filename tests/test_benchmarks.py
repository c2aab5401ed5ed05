"""The measuring sticks of benchmarks/: they must tell apart what differs and agree on what does not;
and every script answers --help, runs end to end in a small mode on tiny engines, writes files only
where --out says, and fails in one line with a non-zero exit."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
FIXTURES = ROOT / "tests" / "fixtures"
TINY_ENGINES, TINY_CKPT = FIXTURES / "tiny-engines", FIXTURES / "tiny-pg.safetensors"
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import markdown_table, save_figure, time_calls  # noqa: E402
from quality import fid, kid  # noqa: E402

from lego_export.config import BrickConfig  # noqa: E402
from lego_export.flops import brick_flops_per_tile  # noqa: E402


def test_fid_and_kid_separate_distributions():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3000, 16)), rng.standard_normal((3000, 16))
    shifted = b + 0.5
    assert fid(a, b) < 0.05 and fid(a, shifted) > 16 * 0.25 * 0.9
    assert abs(kid(a, b, subsets=10, size=500)) < 0.01 < kid(a, shifted, subsets=10, size=500)
    # FID of a Gaussian with scaled covariance: d * (s - 1)^2 for s = sqrt(variance ratio)
    assert abs(fid(a, 2 * b) - 16 * (2 - 1) ** 2) < 1.0


def test_flops_match_a_hand_count():
    brick = BrickConfig(size=4, patch=2, depth=1, width=8, heads=2, mlp_ratio=4.0)
    tokens, w, d = 4, 8, 8
    expected = 2 * (
        tokens * 3 * 4 * w  # patch embedding: 3 channels x 2 x 2 pixels -> w
        + tokens * 4 * w * w
        + 2 * tokens * tokens * w
        + tokens * 2 * w * 4 * w
        + d * 6 * w
        + tokens * w * 4 * 1
        + d * 2 * w
    )
    assert brick_flops_per_tile(brick, 3, 1, d) == expected


def test_a_plot_is_written_whole_or_not_at_all(tmp_path):
    class Figure:  # matplotlib's savefig, as save_figure calls it, failing midway when asked to
        def __init__(self, fails: bool):
            self.fails = fails

        def savefig(self, f, format: str, dpi: int) -> None:
            f.write(b"\x89PNG half")
            if self.fails:
                raise RuntimeError("disk full")
            f.write(b" and the rest")

    path = tmp_path / "plot.png"
    path.write_bytes(b"the last run's plot")
    with pytest.raises(RuntimeError):
        save_figure(Figure(fails=True), path)
    assert path.read_bytes() == b"the last run's plot" and list(tmp_path.iterdir()) == [path]
    save_figure(Figure(fails=False), path)
    assert path.read_bytes() == b"\x89PNG half and the rest" and list(tmp_path.iterdir()) == [path]


def test_timing_statistics_and_table():
    stats = time_calls(lambda: sum(range(1000)), reps=20)
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    table = markdown_table([{"a": 1.234, "b": None}], [("a", "A", ".1f"), ("b", "B", "d")])
    assert table.splitlines()[2] == "| 1.2 | - |"


def test_gpu_check_exits_cleanly_without_a_gpu():
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout


def test_wide_canvas_cells_and_seam_ratio():
    from wide import seam_ratio, tile

    rng = np.random.default_rng(0)
    canvas = rng.standard_normal((2, 1, 8, 24)).astype(np.float32)
    parts = tile(canvas, 8)  # the cells wide.py scores
    assert parts.shape == (6, 1, 8, 8)
    np.testing.assert_array_equal(parts[4], canvas[1, :, :, 8:16])
    # smooth ramps everywhere: borders look like everything else
    ramp = np.broadcast_to(np.arange(24, dtype=np.float32), (1, 1, 8, 24))
    assert abs(seam_ratio(ramp, 8) - 1) < 1e-6
    # a step at every cell border stands out
    steps = ramp + 10 * (np.arange(24) // 8)
    assert seam_ratio(steps, 8) > 5


def test_serve_load_targets_follow_the_rows():
    """Each target line says met or not met from the measured rows, naming the worst cell."""
    from serve_load import targets, variant_lines

    def row(server, quality, load, p99, within=1.0, refused=0.0, expired=0.0, degraded=0, fid=9.0, over=2.0):
        return {
            "server": server, "quality": quality, "load": load, "within_deadline": within, "refused": refused,
            "expired": expired, "p99_a": p99, "p99_b": p99, "p99_all": p99, "degraded": degraded,
            "fid_served": fid, "fid_as_asked": 8.0, "p99_over_alone_b": over,
            "served_at": {"tuned": 0.5, "untuned": 0.0, "own": 0.5},
        }  # fmt: skip

    rows = [
        row("baseline", "-", 1.0, 0.20),
        row("lego-serve", "exact", 1.0, 0.204),  # 1.02x: within 5%
        row("lego-serve", "elastic", 1.0, 0.22),  # 1.10x: not
        row("lego-serve", "elastic", 2.0, 0.3, within=0.99, expired=0.01, degraded=2, fid=9.9, over=5.5),
        row("lego-serve", "elastic", 3.0, 0.4, within=0.95, refused=0.05),
    ]
    variant = {**row("lego-serve", "elastic", 2.0, 0.6, within=0.5, fid=12.0), "variant": "v", "variant_options": "-x"}
    lines = targets([*rows, variant], ("a", "b"), 0.02, paced=0.12)  # a variant's rows are no server's
    assert lines[0].endswith(": met") and "1.02x" in lines[0]
    assert lines[1].endswith("**not met**") and "1.10x" in lines[1]
    # No request degraded at <= 1x: exact and elastic are two runs of the same work, how far apart they land.
    assert "elastic / exact 1.08x (a at 1x)" in lines[2] and "exact / elastic 0.93x" in lines[2]
    assert "99.0% (>= 99%)" in lines[3] and "expired 1.0% (<= 1%)" in lines[3] and lines[3].endswith(": met")
    assert "FID served 9.90 (as asked 8.00)" in lines[3] and "tuned rung 50%" in lines[3]
    assert "95.0% (>= 95%)" in lines[4] and lines[4].endswith(": met")  # at 3x losses are stated, not bounded
    assert "5.5x" in lines[5] and lines[5].endswith("**not met**")
    assert lines[-2] == "- cost model median error 2.0% (<= 10%): met"
    assert lines[-1].endswith("12.0% (<= 10%): **not met**")
    rows[3]["expired"] = 0.02
    assert targets(rows, ("a", "b"), 0.02)[3].endswith("**not met**")
    rows[4]["within_deadline"] = 0.94
    assert targets(rows, ("a", "b"), 0.02)[4].endswith("**not met**")
    # One degraded request at <= 1x: the two ran different work, and the resolution line is left out.
    rows[2]["degraded"] = 1
    lines = targets(rows, ("a", "b"), 0.02)
    assert "1 requests degraded" in lines[1] and not any("resolution" in line for line in lines)
    # A variant against the elastic server at the same load.
    assert variant_lines([*rows, variant]) == [
        "- v (`-x`) against elastic: at 2x within deadline -49.0 pt, refused + expired -2.0 pt, p99 2.00x, "
        "FID served +2.10"
    ]


def test_served_fid_scores_the_mix_of_rungs_as_one_set(tmp_path):
    """Each rung contributes a block of its images in proportion to the requests it served, the
    blocks fill the set exactly, and a worse rung served more raises the FID."""
    from serve_load import LadderImages

    from lego_export.fid import FeatureStats, frechet_distance

    rng = np.random.default_rng(0)
    good = rng.normal(size=(10, 4))
    features = np.stack([good, good + 3.0])  # rung 1: the same noise, shifted features
    np.savez(tmp_path / "f.npz", features=features, test_mu=np.zeros(4), test_sigma=np.eye(4))
    images = LadderImages(tmp_path / "f.npz", ["0", "1"])  # the rows' settings
    test = FeatureStats(np.zeros(4), np.eye(4))

    def fid(rows):
        return frechet_distance(FeatureStats.of(rows), test)

    assert images.fid({"0": 5}) == pytest.approx(fid(good))
    # 1 of 3 requests at rung 1: 3.33 of 10 images -> 3 (0's 6.67 -> 7, the larger remainder)
    assert images.fid({"0": 2, "1": 1}) == pytest.approx(fid(np.concatenate([good[:7], good[7:] + 3.0])))
    assert images.fid({"1": 1}) == pytest.approx(fid(good + 3.0))
    assert images.fid({"0": 9, "1": 1}) < images.fid({"0": 1, "1": 1}) < images.fid({"1": 1})


def test_p99_ratio_interval_brackets_equal_and_slower_servers():
    """Equal servers' interval holds 1; a server slower on every request by 20% lies near 1.2x."""
    from serve_load import p99_ratio_intervals

    rng = np.random.default_rng(1)
    bodies = [{"resolution": "a" if i % 2 else "b"} for i in range(200)]
    base = [{"status": 200, "latency_s": float(t)} for t in rng.lognormal(-3, 0.3, 200)]
    noisy = [{"status": 200, "latency_s": a["latency_s"] * float(rng.uniform(0.9, 1.1))} for a in base]
    slower = [{"status": 200, "latency_s": a["latency_s"] * 1.2} for a in base]
    lo, hi = p99_ratio_intervals(noisy, base, bodies, ("a", "b"))["all"]
    assert lo < 1.0 < hi
    lo, hi = p99_ratio_intervals(slower, base, bodies, ("a", "b"))["a"]
    assert abs(lo - 1.2) < 1e-9 and abs(hi - 1.2) < 1e-9
    refused = [{"status": 429, "latency_s": 0.0}] * 200  # nothing served: no interval
    assert p99_ratio_intervals(refused, base, bodies, ("a", "b")) == {}


@pytest.mark.parametrize(
    "args",
    [["--c-fifo", "0"], ["--c-fifo", "-1"], ["--c-fifo", "nan"], ["--c-fifo", "inf"], ["--probes", "0"],
     ["--loads", "0"], ["--loads=-1,2"], ["--loads", "nan"], ["--loads", "1,abc"], ["--loads", ","]],
)  # fmt: skip
def test_serve_load_refuses_rates_it_cannot_offer_in_one_line(args):
    """0 would read as "not given", a negative or NaN rate fails minutes in, 0 probes measures nothing."""
    from click.testing import CliRunner
    from serve_load import main

    result = CliRunner().invoke(main, ["--engines", "/nonexistent", *args])
    assert result.exit_code == 2 and f"Invalid value for '{args[0].split('=')[0]}'" in result.output, result.output


@pytest.mark.parametrize(
    "setting, named",
    [('{"t_break": NaN}', "NaN"), ('{"steps": Infinity}', "Infinity"), ("[1]", "not a JSON object"),
     ('{"cfg": 2}', "cfg is not a sampling option"), ("{", "JSONDecodeError")],
)  # fmt: skip
def test_ladder_benchmark_refuses_a_bad_setting_in_one_line_before_loading_anything(setting, named):
    from click.testing import CliRunner
    from ladder import main

    result = CliRunner().invoke(main, ["--engines", "/nonexistent", "--setting", setting])
    assert result.exit_code == 2 and "--setting" in result.output and named in result.output, result.output
    assert "Traceback" not in result.output


def test_serve_benchmark_refuses_lego_serve_options_lego_serve_would_refuse():
    """Checked by lego-serve's own make_config before any server starts, not as a server that
    does not come up."""
    from click.testing import CliRunner
    from serve import main

    result = CliRunner().invoke(main, ["--engines", "/nonexistent", "--max-active", "0"])
    assert result.exit_code == 2 and "--max-active must be an integer from 1 to 4096" in result.output, result.output


# -- every script: --help, a smoke run on tiny engines, files only where --out says, one-line failures --

SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")  # common.py: helpers, no script
COMMITTED = (BENCH / "results", BENCH / "classifier")
# The names the scripts tested here used to write under benchmarks/results/ by default. Other files
# there (frontier.py's, ladder.py's) may be rewritten meanwhile by runs outside this test.
OWN_RESULTS = ("latency", "quality", "wide", "peers", "streams", "fusions", "op_profile", "scale", "serve", "gpu")


def committed_files() -> dict[str, tuple[int, int]]:
    return {
        str(f.relative_to(ROOT)): (f.stat().st_mtime_ns, f.stat().st_size)
        for folder in COMMITTED
        for f in folder.rglob("*")
        if f.is_file() and (folder.name == "classifier" or f.name.startswith(OWN_RESULTS))
    }


@pytest.fixture
def committed_untouched():
    """Nothing under benchmarks/classifier/, nor any of these scripts' results under
    benchmarks/results/, is written or added (files removed meanwhile are not the benchmark's doing)."""
    before = committed_files()
    yield
    after = committed_files()
    changed = sorted(k for k in after if after[k] != before.get(k))
    assert not changed, f"a benchmark wrote {changed}"


def bench(script: str, *args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """python benchmarks/SCRIPT ARGS from cwd (a relative default path would land there, not in the repo)."""
    cmd = [sys.executable, str(BENCH / script), *(str(a) for a in args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def results(prefix: Path) -> dict:
    """PREFIX.json, after checking that PREFIX.md was written beside it."""
    assert Path(f"{prefix}.md").is_file()
    return json.loads(Path(f"{prefix}.json").read_text())


def test_the_scripts_are_all_found():
    assert {"latency.py", "scale.py", "serve.py", "frontier.py", "ladder.py", "gpu_check.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_answers_help_and_writes_nothing(script, tmp_path, committed_untouched):
    proc = ok(bench(script, "--help", cwd=tmp_path, timeout=120))
    assert proc.stdout.startswith("Usage:") and "--help" in proc.stdout, proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_gpu_check_sh_answers_help(tmp_path):
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "gpu_check.sh [CHECKPOINT] [JSON_OUT]" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_latency_quick_on_the_tiny_engines(tmp_path, committed_untouched):
    out = tmp_path / "latency"
    args = ["--quick", "--engines", TINY_ENGINES, "--ckpt", TINY_CKPT, "--out", out]
    proc = ok(bench("latency.py", *args, cwd=tmp_path))
    data = results(out)
    assert [r["brick"] for r in data["bricks"]] == ["brick0", "brick1", "brick2"]
    assert all(r["ort_ms"] > 0 and r["torch_ms"] > 0 and r["gflop_per_call"] > 0 for r in data["bricks"])
    steps = data["steps"]
    assert sorted(r["bricks"] for r in steps) == [1, 2, 3]
    assert all(r["ort_ms"] > 0 and 0 < r["overhead_fraction"] < 1 for r in steps)  # from the calls' Timing
    full, late = data["samples"]
    assert full["flops_saved"] == 0 < late["flops_saved"] and late["ort_s_per_image"] > 0
    assert len(data["targets"]) == 4
    assert f"| 32x32 | 16 | 3 | {next(r for r in steps if r['bricks'] == 3)['ort_ms']:.1f} |" in proc.stdout
    assert {p.name for p in tmp_path.iterdir()} <= {"latency.json", "latency.md", "latency.png"}


def test_one_evaluation_is_one_denoiser_call_on_the_asked_prefix():
    """The helper latency.py and scale.py time engine calls with: exactly D(x; sigma_max) from the
    first k bricks, each engine called once, recorded in the call's Timing."""
    from common import one_evaluation

    from lego_export.edm import initial_noise
    from lego_export.plan import StepPlan
    from lego_export.runtime.pipeline import LegoPipeline

    pipe = LegoPipeline.from_engines(TINY_ENGINES, "onnxruntime", threads=1)
    sigma = pipe.edm.sigma_max
    x = initial_noise(0, [0, 1], (pipe.channels, pipe.resolution, pipe.resolution)) * sigma
    for k in (3, 2, 1):
        result = one_evaluation(pipe, k, 2)
        assert result.timing.engine_calls == {"embedder": 1, **{f"brick{i}": 1 for i in range(k)}}
        onehot = np.eye(pipe.num_classes, dtype=np.float32)[result.labels]
        expected = np.clip(pipe.denoise(x, sigma, StepPlan(0, sigma, k, (0, 0)), onehot), -1, 1)
        np.testing.assert_allclose(result.images, expected, atol=1e-4)


def test_scale_on_the_tiny_preset(tmp_path, committed_untouched):
    out = tmp_path / "scale"
    proc = ok(bench("scale.py", "--preset", "pg-tiny", "--reps", 1, "--batches", 1, "--out", out, cwd=tmp_path))
    (preset,) = results(out)["presets"]
    assert preset["preset"] == "pg-tiny" and "status" not in preset
    steps = preset["run"]["steps"]
    assert [(s["batch"], s["bricks"]) for s in steps] == [(1, 3), (1, 2)]
    for s in steps:
        assert s["median_s"] > 0 and s["output_finite"]
        assert set(s["engine_ms_per_call"]) == {"embedder", *(f"brick{i}" for i in range(s["bricks"]))}
        assert all(ms > 0 for ms in s["engine_ms_per_call"].values())
    assert steps[1]["difference_to_full_chain_std"] > 0  # the skipped brick changed the estimate
    assert "| pg-tiny | 4x16x16 |" in proc.stdout and "| ok |" in proc.stdout


def test_scale_exits_non_zero_when_a_preset_fails_but_not_for_the_expected_probe():
    from scale import failures

    presets = [
        {"preset": "pg-tiny", "status": "run failed (exit 1)", "run": None},
        {"preset": "dit-paper-xl", "status": "export failed (exit 0)", "export": {"error": "ValueError: 2 GiB"}},
        {"preset": "pg-s"},
    ]
    assert failures(presets, {"dit-paper-xl"}) == ["pg-tiny: run failed (exit 1)"]
    assert failures(presets, set()) == [
        "pg-tiny: run failed (exit 1)",
        "dit-paper-xl: export failed (exit 0): ValueError: 2 GiB",
    ]
    presets[1]["status"] = "run failed (exit 1)"  # over the limit, yet exported: its run failing is a failure
    assert len(failures(presets, {"dit-paper-xl"})) == 2


def test_scale_run_in_which_a_phase_fails_reports_and_exits_non_zero(tmp_path, monkeypatch, committed_untouched):
    """A preset's phase process that fails (here: every one) is in the report, and the run exits 1 in one line."""
    import scale
    from click.testing import CliRunner

    monkeypatch.setattr(scale, "child", lambda phase, *args: (None, 0.1, 1))  # the phase's process exited 1
    out = tmp_path / "scale"
    result = CliRunner().invoke(scale.main, ["--preset", "pg-tiny", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == "Error: 1 preset(s) failed: pg-tiny: checkpoint failed (exit 1)"
    assert results(out)["presets"][0]["status"] == "checkpoint failed (exit 1)"


def test_peers_on_the_tiny_engines(tmp_path, committed_untouched):
    out = tmp_path / "peers"
    args = ["--engines", TINY_ENGINES, "--ckpt", TINY_CKPT, "--peers", "eager,ort-portable", "--rounds", 1]
    proc = ok(bench("peers.py", *args, "--reps", 2, "--batch", 2, "--threads", 1, "--out", out, cwd=tmp_path))
    data = results(out)
    rows = {r["peer"]: r for r in data["rows"]}
    assert set(rows) == {"eager", "ort-portable"} and data["gflop_per_step"] > 0
    assert all(r["median_ms"] > 0 and r["gflops"] > 0 for r in rows.values())
    assert min(r["vs_fastest"] for r in rows.values()) == 1.0
    assert f"| ort-portable | {rows['ort-portable']['median_ms']:.1f} |" in proc.stdout


def test_streams_on_the_tiny_engines(tmp_path, committed_untouched):
    import os

    out = tmp_path / "streams"
    args = ["--engines", TINY_ENGINES, "--small", "--requests", 3, "--rounds", 1, "--out", out]
    ok(bench("streams.py", *args, cwd=tmp_path))
    configs = results(out)["configs"]
    cores = os.cpu_count() or 2
    assert [c["setup"] for c in configs] == [f"1 x {cores}", "1 x 1", f"{cores} x 1"]
    assert configs[0]["vs_one"] == 1.0 and all(c["requests_per_s"] > 0 and c["median_request_s"] > 0 for c in configs)


def test_fusions_prints_its_table_and_writes_nothing_by_default(tmp_path, committed_untouched):
    args = ["--engines", TINY_ENGINES, "--ckpt", TINY_CKPT, "--images", 2, "--rounds", 2, "--threads", 1]
    proc = ok(bench("fusions.py", *args, cwd=tmp_path))
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("brick")][1:]
    assert [r[0] for r in rows] == ["brick0", "brick1", "brick2"]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)  # torch and portable ONNX milliseconds
    assert "results not written" in proc.stderr and list(tmp_path.iterdir()) == []


def test_op_profile_shares_add_up(tmp_path, committed_untouched):
    out = tmp_path / "ops"
    proc = ok(bench("op_profile.py", "--engines", TINY_ENGINES, "--batch", 2, "--calls", 2, "--out", out, cwd=tmp_path))
    rows = results(out)["rows"]
    assert [r["brick"] for r in rows] == ["brick0", "brick1", "brick2", "all bricks"]
    assert sum(r["share_of_step"] for r in rows[:3]) == pytest.approx(1.0)
    for r in rows:
        kinds = [v for k, v in r.items() if k not in ("brick", "share_of_step")]
        assert sum(kinds) == pytest.approx(1.0) and r["attention"] > 0
    assert "| all bricks | 100% |" in proc.stdout


def test_gpu_check_on_the_cpu(tmp_path, committed_untouched):
    out = tmp_path / "gpu.json"
    proc = ok(bench("gpu_check.py", "--device", "cpu", "--quick", TINY_CKPT, out, cwd=tmp_path))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["chain"]) for r in rows] == [
        ("torch fp32", "full"),
        ("torch fp32", "skip last"),
        ("onnxruntime fp32", "full"),
        ("onnxruntime fp32", "skip last"),
    ]
    assert all(r["ms_per_step"] > 0 and r["canvas"] == "16x16" and r["batch"] == 1 for r in rows)
    assert f"{rows[2]['ms_per_step']:>9.3f}" in proc.stdout


def test_serve_on_the_tiny_engines(tmp_path, committed_untouched):
    """Both servers, all at once and at a Poisson rate: every request answered, the same images as offline."""
    out = tmp_path / "serve"
    args = ["--engines", TINY_ENGINES, "--small", "--requests", 4, "--rates", "0.5", "--check", 2]
    proc = ok(bench("serve.py", *args, "--out", out, cwd=tmp_path))
    data = results(out)
    rows = data["rows"]
    assert [(r["server"], r["arrivals"]) for r in rows] == [
        ("baseline", "all at once"),
        ("baseline", "Poisson 50%"),
        ("lego-serve", "all at once"),
        ("lego-serve", "Poisson 50%"),
    ]
    for r in rows:
        assert r["requests"] == 4 and r["errors"] == [] and r["images_per_s"] > 0
        assert 0 < r["p50_s"] <= r["p99_s"] and r["images_checked"] == 2 and r["max_abs_diff_vs_offline"] < 1e-5
    for r in rows[2:]:
        assert r["engines"]["brick0"]["calls"] > 0 and 0 < r["engines"]["brick0"]["fill"] <= 1
    assert data["summary"]["saturation_throughput_ratio"] > 0 and data["summary"]["notes"] == []
    assert f"| lego-serve | Poisson 50% | {rows[3]['offered_images_per_s']:.2f} |" in proc.stdout


class SlowServer:
    """A server stand-in whose every answer takes `seconds`, honouring httpx's timeout as httpx does."""

    def __init__(self, seconds: float):
        import io
        import types

        buffer = io.BytesIO()
        np.savez(buffer, images=np.zeros((1, 1, 2, 2), np.float32))
        self.answer = types.SimpleNamespace(status_code=200, content=buffer.getvalue(), text="")
        self.seconds, self.http = seconds, self

    def post(self, url: str, json: dict, timeout: float):
        import time

        import httpx

        time.sleep(min(self.seconds, timeout))
        if timeout < self.seconds:
            raise httpx.ReadTimeout("timed out")
        return self.answer


def test_serve_requests_wait_for_their_answer_whatever_the_time_limit():
    """A request queued behind the others (here: 0.6 s) gets its answer: the client's timeout is the
    request's own, not what is left of the run (lego-serve's Poisson row was lost to a ReadTimeout
    that way); one that gets no answer within it is an error of the row."""
    from serve import send_all

    latencies, images, _, errors = send_all(SlowServer(0.6), [{}, {}], [0.0, 0.1], timeout=5.0)
    assert errors == [] and all(t >= 0.6 for t in latencies) and all(x.shape == (1, 1, 2, 2) for x in images)
    latencies, _, _, errors = send_all(SlowServer(0.6), [{}, {}], [0.0, 0.1], timeout=0.2)
    assert latencies == [None, None] and errors == ["request 0: ReadTimeout", "request 1: ReadTimeout"]


def test_serve_starts_a_load_pattern_only_if_it_can_end_in_time():
    """Its last arrival plus the time the server took for the whole workload at once must fit."""
    from serve import pattern_fits

    arrivals = [0.0, 5.0, 10.0]
    assert pattern_fits(arrivals, 30.0, 40.0) and not pattern_fits(arrivals, 30.0, 35.0)
    assert pattern_fits([0.0] * 3, 0.0, 1.0)  # the first saturation run: nothing known yet, run it


def write_ladder(prefix: Path, engines: Path, settings: list[str], images: int = 40) -> None:
    """A ladder.py result for these settings: random features, each setting's shifted by its row number."""
    from lego_export.manifest import Manifest

    rng = np.random.default_rng(0)
    features = np.stack([rng.normal(size=(images, 4)) + 0.3 * i for i in range(len(settings))])
    np.savez(f"{prefix}.features.npz", features=features, test_mu=np.zeros(4), test_sigma=np.eye(4))
    rows = [{"setting": s, "rung": None, "fid": 1.0, "class_accuracy": 0.5, "brick_flops_vs_reference": 1.0}
            for s in settings]  # fmt: skip
    sha = Manifest.read(engines).source["sha256"]
    Path(f"{prefix}.json").write_text(json.dumps({"rows": rows, "checkpoint_sha256": sha}))


def tiny_settings() -> list[str]:
    """What the tiny engines may serve the workload of --mix both: their serving ladder, Heun 12 and 18."""
    from lego_export.ladder import serving_ladder
    from lego_export.manifest import Manifest

    rungs = serving_ladder(Manifest.read(TINY_ENGINES)).rungs
    return [o.describe() for o in rungs] + ["heun, 12 steps, full chain", "heun, 18 steps, full chain"]


def test_serve_load_on_the_tiny_engines(tmp_path, committed_untouched):
    """Both kinds of request, the baseline, the elastic server and a variant of it, the FID served
    and as asked from the settings each answered; --rescore scores the run again with another ladder."""
    out, ladder = tmp_path / "serve-load", tmp_path / "ladder"
    write_ladder(ladder, TINY_ENGINES, tiny_settings())
    args = ["--engines", TINY_ENGINES, "--small", "--requests", 4, "--rounds", 1, "--c-fifo", 1, "--loads", 1]
    args += ["--mix", "both", "--servers", "baseline,elastic", "--variant", "s2=--streams 2"]
    proc = ok(bench("serve_load.py", *args, "--ladder", f"{ladder}.json", "--out", out, cwd=tmp_path))
    data = results(out)
    assert data["c_fifo_requests_per_s"] == 1.0 and data["cost_model_error"]["requests"] == 4
    assert sum("steps" in b for b in data["workload"]) == 2 and data["ladder_tuned"] is False
    assert {b.get("steps") for b in data["workload"]} <= {None, 12, 18}
    rows = data["rows"]
    assert [(r["server"], r["quality"], r["load"], r.get("variant")) for r in rows] == [
        ("baseline", "-", 1.0, None),
        ("lego-serve", "elastic", 1.0, None),
        ("lego-serve", "elastic", 1.0, "s2"),
    ]
    for r in rows:
        assert r["other_errors"] == 0 and r["within_deadline"] + r["refused"] + r["expired"] <= 1.0 + 1e-9
        assert len(r["requests"]["status"]) == 4 and r["unscored"] == []
        answered = sum(r["rungs"].values())
        assert sum(r["settings"].values()) == sum(r["settings_as_asked"].values()) == answered
        assert abs(sum(r["served_at"].values()) - 1) < 1e-9 and r["fid_served"] > 0 and r["fid_as_asked"] > 0
    base = rows[0]
    assert sum(base["rungs"].values()) == 4  # the baseline answers every request, late or not
    assert base["settings"] == base["settings_as_asked"] and base["fid_served"] == base["fid_as_asked"]
    assert base["served_at"] == {"tuned": 0.0, "untuned": 0.5, "own": 0.5}  # rung 0 of an untuned ladder
    assert "C_FIFO = **1.000 requests/s**" in proc.stdout
    assert "- s2 (`--streams 2`) against elastic: at 1x" in proc.stdout

    # Another ladder file (every setting's images moved): the same run scores anew, nothing else changes.
    write_ladder(ladder, TINY_ENGINES, tiny_settings()[::-1])
    ok(bench("serve_load.py", "--rescore", "--ladder", f"{ladder}.json", "--out", out, cwd=tmp_path))
    again = results(out)
    assert [r["requests"] for r in again["rows"]] == [r["requests"] for r in rows]
    assert again["rows"][0]["fid_served"] != base["fid_served"]


def test_serve_load_names_the_ladder_rows_it_lacks_before_it_starts(tmp_path):
    """A setting the workload asks for that ladder.py did not measure: one line naming it and the
    ladder.py --setting that adds it, before any server starts."""
    from click.testing import CliRunner
    from serve_load import main

    ladder = tmp_path / "ladder"
    write_ladder(ladder, TINY_ENGINES, [s for s in tiny_settings() if "18 steps" not in s])
    args = ["--engines", str(TINY_ENGINES), "--small", "--requests", "8", "--ladder", f"{ladder}.json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "no row for 'heun, 18 steps, full chain'" in result.output
    assert """--setting '{"steps": 18}'""" in result.output
    for variant, named in (("x=--no-such-option", "no-such-option"), ("x=--streams 65", "streams")):
        result = CliRunner().invoke(main, [*args[:-2], "--mix", "recommended", "--ladder", f"{ladder}.json",
                                           "--variant", variant])  # fmt: skip
        assert result.exit_code == 2 and "--variant" in result.output and named in result.output, result.output


def test_serve_load_names_a_served_setting_the_ladder_lacks_and_how_to_score_it(tmp_path):
    """A setting served that ladder.py did not measure (a degraded request's own guidance kept, say):
    the run is kept, its rows unscored, and the failure names the setting, the --setting that
    measures it and the --rescore that scores the run after."""
    import click
    from serve_load import LadderResults, check_scored, score

    from lego_export.options import SamplingOptions

    write_ladder(tmp_path / "ladder", TINY_ENGINES, ["heun, 12 steps, full chain"])
    ladder = LadderResults(tmp_path / "ladder.json")
    odd = SamplingOptions(sampler="dpm2m", steps=5)
    row = {"requests": {"setting": ["heun, 12 steps, full chain", odd.describe(), None]},
           "served_options": {odd.describe(): odd.to_dict()}}  # fmt: skip
    score(row, ["heun, 12 steps, full chain"] * 3, ladder)
    assert row["unscored"] == [odd.describe()] and row["fid_served"] is None and row["fid_as_asked"] > 0
    with pytest.raises(click.ClickException) as e:
        check_scored({"rows": [row], "out": "runs/x"}, ladder)
    message = e.value.message
    assert "no row for 'dpm2m, 5 steps, full chain' (served)" in message and "--rescore --out runs/x" in message
    assert """--setting '{"sampler": "dpm2m", "steps": 5}'""" in message and "\n" not in message


@pytest.mark.parametrize("variant", ["no-equals", "=--streams 2", "baseline=--streams 2", "a=", "a b=--streams 2"])
def test_serve_load_refuses_a_variant_it_cannot_name(variant):
    from click.testing import CliRunner
    from serve_load import main

    result = CliRunner().invoke(main, ["--engines", "/nonexistent", "--variant", variant])
    assert result.exit_code == 2 and "Invalid value for '--variant'" in result.output, result.output


def test_gpu_check_on_a_gpu(tmp_path, committed_untouched):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the CPU mode is tested above)")
    proc = ok(bench("gpu_check.py", "--quick", TINY_CKPT, tmp_path / "gpu.json", cwd=tmp_path))
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    modes = {r["mode"] for r in rows if r["device"] == "cuda"}
    assert modes == {"fp32", "fp16", "bf16", "fp16+graph"} and all(r["ms_per_step"] > 0 for r in rows)
    assert "onnxruntime fp32" in proc.stdout


# Scripts that score images in the quality classifier's feature space: a Fashion-MNIST-shaped data
# set of a few hundred images, and 32 x 32 engines of a small random model with ten classes.


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fmnist_like(tmp_path_factory) -> Path:
    """IDX files as Fashion-MNIST's: 28 x 28 images, ten classes, a train and a t10k split."""
    folder = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 100)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, k in enumerate(labels):  # a bright bar whose place depends on the class
            images[i, 2 + 2 * k : 5 + 2 * k, 4:24] = 220
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


@pytest.fixture(scope="module")
def engines32(tmp_path_factory) -> Path:
    import torch

    from lego_export.checkpoint import save_checkpoint
    from lego_export.config import get_preset
    from lego_export.export.build import BuildOptions, build
    from lego_export.model import LegoModel

    root = tmp_path_factory.mktemp("engines32")
    torch.manual_seed(0)
    model = LegoModel(get_preset("pg-tiny", img_resolution=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    save_checkpoint(root / "model.safetensors", model)
    options = BuildOptions(ckpt=str(root / "model.safetensors"), out=str(root / "engines"), max_batch=8, opt_batch=4)
    build(BuildOptions(**{**options.__dict__, "fuse": False}))
    return root / "engines"


def test_quality_sweep_on_small_engines(tmp_path, fmnist_like, engines32, committed_untouched):
    out = tmp_path / "quality"
    args = ["--engines", engines32, "--data", fmnist_like, "--num", 20, "--steps", 2, "--t-breaks", "0,1"]
    proc = ok(bench("quality.py", *args, "--batch", 20, "--out", out, cwd=tmp_path))
    data = results(out)
    assert data["real_vs_real"]["num"] == 200 and data["real_vs_real"]["fid"] > 0
    full, late = data["sweep"]
    assert (full["t_break"], late["t_break"]) == (0.0, 1.0)
    assert full["flops_saved"] == 0 < late["flops_saved"]
    for r in (full, late):
        assert r["fid"] > 0 and 0 <= r["class_accuracy"] <= 1 and len(r["per_class_accuracy"]) == 10
    assert f"{late['fid']:.3f}" in proc.stdout


def test_wide_on_small_engines(tmp_path, fmnist_like, engines32, committed_untouched):
    out = tmp_path / "wide"
    args = ["--engines", engines32, "--data", fmnist_like, "--num", 4, "--steps", 2, "--canvases", "32x64"]
    ok(bench("wide.py", *args, "--batch", 4, "--out", out, cwd=tmp_path))
    rows = results(out)["rows"]
    assert [(r["canvas"], r["tile_shift"], r["cells"]) for r in rows] == [
        ("32x32", "off", 4),
        ("32x64", "on", 8),
        ("32x64", "off", 8),
    ]
    assert rows[0]["seam_ratio"] is None and all(r["seam_ratio"] > 0 and r["cell_fid"] > 0 for r in rows[1:])


def test_feature_files_into_a_folder_and_by_default_into_a_temporary_one(tmp_path, fmnist_like, committed_untouched):
    import onnxruntime as ort

    out = tmp_path / "files"
    ok(bench("feature_files.py", "--data", fmnist_like, "--num", 50, "--out", out, cwd=tmp_path))
    reference = np.load(out / "fmnist-test.ref.npz")
    assert reference["mu"].shape == (128,) and reference["sigma"].shape == (128, 128)
    # The two files agree: the ONNX classifier's features of those 50 test images have that mean.
    from lego_train.data import load_idx_dir

    images = load_idx_dir(fmnist_like, split="test").images[:50].astype(np.float32) / 127.5 - 1
    session = ort.InferenceSession(str(out / "fmnist-features.onnx"))
    features, logits = session.run(None, {"images": images})
    np.testing.assert_allclose(features.mean(0), reference["mu"], rtol=1e-4, atol=1e-4)
    assert logits.shape == (50, 10)

    from click.testing import CliRunner
    from feature_files import main

    result = CliRunner().invoke(main, ["--data", str(fmnist_like), "--num", "10"])  # no --out
    assert result.exit_code == 0, result.output
    written = Path(result.output.split()[1])  # "wrote FOLDER/fmnist-features.onnx and ..."
    try:
        assert written.name == "fmnist-features.onnx" and written.parent != BENCH / "classifier"
        assert (written.parent / "fmnist-test.ref.npz").is_file()
    finally:
        for f in written.parent.iterdir():
            f.unlink()
        written.parent.rmdir()
    assert list(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("latency", ["--engines", "/nonexistent"]),
        ("peers", ["--engines", "/nonexistent"]),
        ("streams", ["--engines", "/nonexistent"]),
        ("fusions", ["--engines", "/nonexistent"]),
        ("op_profile", ["--engines", "/nonexistent"]),
        ("quality", ["--data", "/nonexistent"]),
        ("wide", ["--data", "/nonexistent"]),
        ("feature_files", ["--data", "/nonexistent"]),
        ("serve", ["--engines", "/nonexistent"]),
        ("serve_load", ["--engines", "/nonexistent"]),
        ("gpu_check", ["--device", "cpu", "/nonexistent.safetensors"]),
        ("scale", ["--preset", "no-such-preset"]),
    ],
)
def test_a_failing_benchmark_says_why_in_one_line_and_exits_non_zero(script, args, tmp_path, monkeypatch):
    import importlib

    from click.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(importlib.import_module(script).main, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and "Traceback" not in result.output, result.output
    assert "/nonexistent" in lines[-1] or "no-such-preset" in lines[-1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("script", "args", "needs"),
    [("scale", ["--merge"], "--merge replaces presets in OUT.json"), ("serve_load", ["--replot"], "--replot redraws")],
)
def test_options_that_read_earlier_results_need_out(script, args, needs, tmp_path, monkeypatch):
    """Nothing is read from (or merged into) benchmarks/results/ unless --out names it."""
    import importlib

    from click.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(importlib.import_module(script).main, args)
    assert result.exit_code == 2 and needs in result.output and "--out PREFIX" in result.output, result.output


def test_peers_refuses_an_unknown_peer():
    from click.testing import CliRunner
    from peers import main

    result = CliRunner().invoke(main, ["--peers", "eager,tensorrt"])
    assert result.exit_code == 2 and "Invalid value for '--peers'" in result.output, result.output
