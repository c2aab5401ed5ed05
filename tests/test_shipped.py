from pathlib import Path

from lego_export.checkpoint import load_model

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "fmnist-pg-s.safetensors"


def test_shipped_checkpoint_loads_and_is_small():
    model = load_model(SHIPPED)
    assert model.cfg.name == "pg-s" and model.cfg.num_classes == 10 and model.cfg.img_resolution == 32
    assert [b.size for b in model.cfg.bricks] == [4, 16, 32]
    assert SHIPPED.stat().st_size <= 10 * 2**20
    # trained, not freshly initialised: the zero-initialised output layers have moved
    assert all(b.final.linear.weight.abs().max() > 0 for b in model.bricks)
