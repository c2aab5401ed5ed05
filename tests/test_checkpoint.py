import pytest
import torch
from safetensors.torch import save_file

from lego_export.checkpoint import load_model, read_checkpoint, save_checkpoint
from lego_export.config import get_preset
from lego_export.errors import LegoError
from lego_export.model import LegoModel


def test_save_load_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = LegoModel(get_preset("u-tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, extra={"kimg": 1.5})
    loaded = load_model(path)
    assert loaded.cfg == model.cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert read_checkpoint(path)[2] == {"kimg": 1.5}
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(LegoError, match="checkpoint not found"):
        load_model(tmp_path / "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(LegoError, match="not a readable .safetensors file"):
        load_model(corrupt)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(LegoError, match="not a LEGO checkpoint"):
        load_model(foreign)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, LegoModel(get_preset("pg-tiny")))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LegoError, match="not a readable"):
        load_model(path)
