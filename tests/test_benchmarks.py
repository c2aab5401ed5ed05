"""The measuring sticks of benchmarks/: they must tell apart what differs and agree on what does not."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
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
    from serve_load import targets

    def row(server, quality, load, p99, within=1.0, refused=0.0, expired=0.0, rungs=None, fid=9.0, over=2.0):
        return {
            "server": server, "quality": quality, "load": load, "within_deadline": within, "refused": refused,
            "expired": expired, "p99_a": p99, "p99_b": p99, "p99_all": p99, "rungs": rungs or {"0": 10},
            "fid_served": fid, "p99_over_alone_b": over,
        }  # fmt: skip

    rows = [
        row("baseline", "-", 1.0, 0.20),
        row("lego-serve", "exact", 1.0, 0.204),  # 1.02x: within 5%
        row("lego-serve", "elastic", 1.0, 0.22),  # 1.10x: not
        row("lego-serve", "elastic", 2.0, 0.3, within=0.99, expired=0.01, rungs={"0": 8, "1": 2}, fid=9.9, over=5.5),
        row("lego-serve", "elastic", 3.0, 0.4, within=0.94),
    ]
    lines = targets(rows, ("a", "b"), 0.02, 9.0, paced=0.12)
    assert lines[0].endswith(": met") and "1.02x" in lines[0]
    assert lines[1].endswith("**not met**") and "1.10x" in lines[1]
    # No request degraded at <= 1x: exact and elastic are two runs of the same work, how far apart they land.
    assert "elastic / exact 1.08x (a at 1x)" in lines[2] and "exact / elastic 0.93x" in lines[2]
    assert "FID served 1.100x" in lines[3] and lines[3].endswith(": met")
    assert "94.0%" in lines[4] and lines[4].endswith("**not met**")
    assert "5.5x" in lines[5] and lines[5].endswith("**not met**")
    assert lines[-2] == "- cost model median error 2.0% (<= 10%): met"
    assert lines[-1].endswith("12.0% (<= 10%): **not met**")
    # One degraded request at <= 1x: the two ran different work, and the resolution line is left out.
    rows[2]["rungs"] = {"0": 9, "1": 1}
    lines = targets(rows, ("a", "b"), 0.02, 9.0)
    assert "1 requests degraded" in lines[1] and not any("resolution" in line for line in lines)
    # Rung None: a request's own options (not the recommended setting), never a degraded one.
    rows[2]["rungs"] = {"None": 10}
    lines = targets(rows, ("a", "b"), 0.02, 9.0)
    assert "0 requests degraded" in lines[1] and "resolution" in lines[2]


def test_served_fid_scores_the_mix_of_rungs_as_one_set(tmp_path):
    """Each rung contributes a block of its images in proportion to the requests it served, the
    blocks fill the set exactly, and a worse rung served more raises the FID."""
    from serve_load import LadderImages

    from lego_export.fid import FeatureStats, frechet_distance

    rng = np.random.default_rng(0)
    good = rng.normal(size=(10, 4))
    features = np.stack([good, good + 3.0])  # rung 1: the same noise, shifted features
    np.savez(tmp_path / "f.npz", features=features, test_mu=np.zeros(4), test_sigma=np.eye(4))
    images = LadderImages(tmp_path / "f.npz")
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


def test_serve_benchmark_refuses_lego_serve_options_lego_serve_would_refuse():
    """Checked by lego-serve's own make_config before any server starts, not as a server that
    does not come up."""
    from click.testing import CliRunner
    from serve import main

    result = CliRunner().invoke(main, ["--engines", "/nonexistent", "--no-align"])
    assert result.exit_code == 2 and "align applies to order merge only" in result.output, result.output
