import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
# `--backend auto` takes OpenVINO when installed, else ONNX Runtime, without timing both first
# (autoselect.py): the same choice on every machine, and no measurement per test. Inherited by the
# commands the tests start; tests/test_autoselect.py turns the measurement back on where it tests it.
os.environ.setdefault("LEGO_EXPORT_AUTO_MEASURE", "0")


@pytest.fixture
def tiny_npz(tmp_path):
    """A labelled 16 x 16 data set: bright squares whose position depends on the class."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=256)
    images = np.zeros((256, 16, 16), dtype=np.uint8)
    for i, k in enumerate(labels):
        y, x = divmod(int(k), 2)
        images[i, 8 * y : 8 * y + 8, 8 * x : 8 * x + 8] = 255
    path = tmp_path / "squares.npz"
    np.savez(path, images=images, labels=labels)
    return path


def run_torchrun(module: str, args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """python -m torch.distributed.run --standalone ... -m module args, one thread per process."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        "-m",
        module,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=root)
