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


def test_the_shipped_tuned_setting_belongs_to_the_shipped_weights():
    """make demo attaches it with build --recommended, which refuses another checkpoint's setting:
    retraining the shipped model means running lego-export tune again (README, Performance)."""
    import json

    from lego_export.export.build import read_recommended
    from lego_export.manifest import sha256_file

    tuned = SHIPPED.with_name("fmnist-pg-s.recommended.json")
    recommended = read_recommended(str(tuned), sha256_file(SHIPPED))
    assert recommended.measured["fid"] <= recommended.measured["budget"]
    assert recommended.measured["validation"]["in_budget"]
    assert json.loads(tuned.read_text())["skip_policy"] == recommended.options.skip
