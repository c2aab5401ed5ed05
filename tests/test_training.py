import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lego_export.checkpoint import load_model
from lego_export.config import get_preset
from lego_export.model import LegoModel
from lego_train.cli import main as lego_train
from lego_train.data import load_dataset, to_model_range
from lego_train.loss import edm_loss
from tests.conftest import run_torchrun


def fixed_loss(model, x, onehot):
    torch.manual_seed(123)  # same sigmas and noise at every evaluation
    with torch.no_grad():
        return edm_loss(model, x, onehot)[0].item()


def test_loss_falls_within_a_few_dozen_steps(tiny_npz):
    data = load_dataset(str(tiny_npz))
    torch.manual_seed(0)
    model = LegoModel(get_preset("pg-tiny", num_classes=data.num_classes))
    x = to_model_range(torch.from_numpy(data.images[:64]).float())
    onehot = torch.nn.functional.one_hot(torch.from_numpy(data.labels[:64]), data.num_classes).float()
    before = fixed_loss(model, x, onehot)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(40):
        loss, per_brick = edm_loss(model, x, onehot)
        assert per_brick.shape == (3,)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss(model, x, onehot)
    assert after < 0.7 * before, (before, after)


def run_cli(args):
    return CliRunner().invoke(lego_train, args, catch_exceptions=False)


def test_lego_train_writes_a_loadable_checkpoint_and_resumes(tiny_npz, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        [
            "--data",
            str(tiny_npz),
            "--preset",
            "tiny",
            "--kimg",
            "0.2",
            "--batch",
            "32",
            "--out",
            str(out),
            "--snapshot-kimg",
            "0.1",
        ]
    )
    assert result.exit_code == 0, result.output
    model = load_model(out / "model.safetensors")
    assert model.cfg.num_classes == 4 and model.cfg.img_resolution == 16
    assert (out / "samples.png").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["kimg"] >= 0.2 and len(log[-1]["brick_losses"]) == 3
    state = torch.load(out / "train-state.pt", weights_only=True)
    assert state["nimg"] == 224  # 7 batches of 32

    # a second run into the same folder must be asked to resume
    refused = run_cli(["--data", str(tiny_npz), "--preset", "tiny", "--kimg", "0.3", "--out", str(out)])
    assert refused.exit_code != 0 and "--resume" in refused.output
    # as if the first run had logged up to 0.4 kimg, past its last snapshot (0.224), before it was stopped
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({**log[-1], "kimg": 0.4}) + "\n")
    resumed = run_cli(
        ["--data", str(tiny_npz), "--kimg", "0.3", "--batch", "32", "--out", str(out), "--resume", str(out)]
    )
    assert resumed.exit_code == 0, resumed.output
    assert torch.load(out / "train-state.pt", weights_only=True)["nimg"] == 320
    kimgs = [json.loads(line)["kimg"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert kimgs == sorted(set(kimgs)) and kimgs[-1] >= 0.3  # the lines past the snapshot were dropped
    other = run_cli(
        ["--data", str(tiny_npz), "--preset", "pr-tiny", "--kimg", "0.4", "--out", str(out), "--resume", str(out)]
    )
    assert other.exit_code != 0 and "the run being resumed is a pg-tiny model" in other.output
    mismatch = run_cli(["--data", str(tiny_npz), "--no-cond", "--kimg", "0.4", "--out", str(out), "--resume", str(out)])
    assert mismatch.exit_code != 0 and "the run being resumed was trained on" in mismatch.output
    assert not torch.equal(
        load_model(out / "model.safetensors").bricks[0].final.linear.weight, model.bricks[0].final.linear.weight
    )


def test_user_errors_are_one_line(tmp_path, tiny_npz):
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((2, 16, 16), np.uint8))
    cases = [
        (["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "data not found"),
        (["--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o")], "no 'images' array"),
        (["--data", str(tiny_npz), "--preset", "nope", "--out", str(tmp_path / "o")], "unknown preset 'nope'"),
        (["--data", str(tiny_npz), "--preset", "pg-s", "--out", str(tmp_path / "o")], "not a multiple"),
        (["--data", str(tiny_npz), "--canvas-windows", "2", "--out", str(tmp_path / "o")], "must be in [0, 1]"),
    ]
    for args, message in cases:
        result = run_cli(args)
        assert result.exit_code != 0
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_torchrun_two_processes(tiny_npz, tmp_path):
    out = tmp_path / "ddp"
    proc = run_torchrun(
        "lego_train.cli",
        [
            "--data",
            str(tiny_npz),
            "--preset",
            "tiny",
            "--kimg",
            "0.128",
            "--batch",
            "32",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--snapshot-kimg",
            "1",
        ],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 process(es)" in proc.stderr + proc.stdout
    load_model(out / "model.safetensors")
    assert torch.load(out / "train-state.pt", weights_only=True)["nimg"] == 128


def test_lr_decay_follows_its_schedule_across_a_resume(tiny_npz, tmp_path, monkeypatch):
    import lego_train.loop as loop

    out = tmp_path / "run"
    base = dict(data=str(tiny_npz), out=str(out), preset="tiny", batch=32, warmup_kimg=0.064)
    base.update(snapshot_kimg=0.064, tick_kimg=0.032)
    loop.train(loop.TrainConfig(**base, kimg=0.128))  # warm-up, then the constant rate

    real_snapshot = loop.snapshot

    def stop_at_320(out, model, ema, optimizer, nimg, *args):
        real_snapshot(out, model, ema, optimizer, nimg, *args)
        if nimg == 320:
            raise KeyboardInterrupt  # as if stopped in the middle of the decay

    monkeypatch.setattr(loop, "snapshot", stop_at_320)
    cooldown = loop.TrainConfig(**base, kimg=0.512, resume=str(out), lr_decay="linear", lr_final=0.1)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cooldown)
    monkeypatch.setattr(loop, "snapshot", real_snapshot)
    assert torch.load(out / "train-state.pt", weights_only=True)["lr_schedule"]["decay_end"] == 512
    loop.train(loop.TrainConfig(**base, kimg=0.512, resume=str(out)))  # no decay options: the stored decay
    loop.train(loop.TrainConfig(**base, kimg=0.640, resume=str(out)))  # past its end: the final rate

    expected = loop.LRSchedule(5e-4, 64, "linear", 128, 512, 0.1)
    rates = {round(r["kimg"] * 1000): r["lr"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}
    assert sorted(rates) == list(range(32, 641, 32))
    for nimg, lr in rates.items():  # a tick logs the rate of its last batch
        assert lr == pytest.approx(expected(nimg), rel=1e-9), (nimg, lr)
    assert rates[128] == pytest.approx(5e-4) and rates[320] == pytest.approx(5e-4 * (0.1 + 0.9 * 0.5))
    assert rates[512] == rates[640] == pytest.approx(5e-5)
    assert loop.LRSchedule(1.0, 0, "cosine", 0, 100, 0.0)(50) == pytest.approx(0.5)


def test_lr_decay_options_are_checked(tiny_npz, tmp_path):
    base = ["--data", str(tiny_npz), "--out", str(tmp_path / "o")]
    for args, message in (
        (["--decay-kimg", "5"], "--decay-kimg needs --lr-decay"),
        (["--lr-final", "0.1"], "--lr-final needs --lr-decay"),
        (["--lr-decay", "linear", "--lr-final", "2"], "--lr-final must be in [0, 1]"),
        (["--lr-decay", "cosine", "--decay-kimg", "nan"], "--decay-kimg must be a positive number"),
    ):
        result = run_cli(base + args)
        assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def _pngs(folder, n: int, size=(16, 16), mode="L", classes=None, prefix=""):
    from PIL import Image

    for i in range(n):
        sub = folder / (f"c{i % classes}" if classes else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, 128).save(sub / f"{prefix}{i:03d}.png")


def test_training_data_that_cannot_train_is_refused_in_one_line(tmp_path):
    cases = []
    _pngs(tmp_path / "few", 63)
    cases.append((["--data", str(tmp_path / "few"), "--no-cond"], "--batch 64 is more than the 63 images"))
    np.savez(tmp_path / "float.npz", images=np.zeros((70, 16, 16), np.uint8), labels=np.full(70, 1.5))
    cases.append((["--data", str(tmp_path / "float.npz")], "'labels' must be integers, got float64"))
    np.savez(tmp_path / "five.npz", images=np.zeros((70, 16, 16, 5), np.uint8))
    cases.append((["--data", str(tmp_path / "five.npz"), "--no-cond"], "grey (1 channel) or colour (3 channels)"))
    np.savez(tmp_path / "empty.npz", images=np.zeros((70, 0, 0), np.uint8))
    cases.append((["--data", str(tmp_path / "empty.npz"), "--no-cond"], "no images of a usable size"))
    (tmp_path / "file").write_text("x")
    cases.append((["--data", str(tmp_path / "five.npz"), "--out", str(tmp_path / "file")], "is a file"))
    for args, message in cases:
        out = args[args.index("--out") + 1] if "--out" in args else str(tmp_path / "run")
        result = run_cli([*[a for a in args if a != out and a != "--out"], "--out", out, "--kimg", "0.1"])
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_folder_of_grey_and_colour_pictures_trains_in_colour(tmp_path):
    from lego_train.data import load_dataset

    _pngs(tmp_path / "mixed", 4, classes=2)
    _pngs(tmp_path / "mixed" / "c0", 2, mode="RGB", prefix="rgb")
    data = load_dataset(str(tmp_path / "mixed"))
    assert data.images.shape == (6, 3, 16, 16) and data.num_classes == 2
