"""The runtime installs without PyTorch: `pip install .` in a fresh venv samples from committed engines.

Also checks that those committed engines still match the exporter (rebuild them with
tests/fixtures/make_tiny_engines.py when the manifest schema or the engine contract changes).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from lego_export.cli import export_main
from lego_export.runtime import LegoPipeline

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
ENGINES = FIXTURES / "tiny-engines"


def test_committed_engines_verify_against_their_checkpoint():
    result = CliRunner().invoke(export_main, ["verify", str(ENGINES), "--ckpt", str(FIXTURES / "tiny-pg.safetensors")])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output


def test_runtime_only_install_samples_without_torch(tmp_path):
    # Install from a copy of the sources, so the build leaves nothing behind in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("lego_export", "training"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    npz = tmp_path / "s.npz"
    run = subprocess.run(
        [str(bin_dir / "lego-run"), "--engines", str(ENGINES), "--steps", "4", "--num", "3", "--skip-late-bricks"]
        + ["--cfg", "1.5", "--out", str(tmp_path / "g.png"), "--save-npz", str(npz)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the checkout: only the installed package can be imported
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "g.png").is_file()
    images = np.load(npz)["images"]
    expected = LegoPipeline.from_engines(ENGINES, "onnxruntime")(num=3, steps=4, skip="late", guidance=1.5).images
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(images, expected, atol=1e-6)
