"""Latent models: a decoder engine exported from a diffusers AutoencoderKL turns sampled latents into
images. No weights can be downloaded here: a small randomly initialised VAE stands in for the SD VAE."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lego_export.checkpoint import save_checkpoint
from lego_export.cli import export_main
from lego_export.config import get_preset
from lego_export.manifest import Manifest
from lego_export.model import LegoModel
from lego_export.runtime import LegoPipeline
from lego_export.runtime.cli import main as lego_run

diffusers = pytest.importorskip("diffusers", reason="the latent tests need diffusers (pip install '.[latent]')")


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    ).eval()
    vae.save_pretrained(root / "vae")
    model = LegoModel(get_preset("pg-tiny", img_channels=4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    save_checkpoint(root / "latent.safetensors", model)
    engines = root / "engines"
    args = ["build", "--ckpt", root / "latent.safetensors", "--out", engines, "--vae", root / "vae", "--max-batch", 4]
    result = CliRunner().invoke(export_main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return root, vae, engines


def test_build_writes_a_verified_decoder_and_the_latent_space(latent_model):
    _, vae, engines = latent_model
    manifest = Manifest.read(engines)
    assert manifest.latent.scale == pytest.approx(vae.config.scaling_factor) and manifest.latent.factor == 2
    decoder = manifest.decoder
    assert decoder.inputs[0].shape == ["N", 4, "H", "W"] and decoder.outputs[0].shape == ["N", 3, "2H", "2W"]
    v = decoder.files["onnx"].verification
    assert v["passed"] and v["relative_error"] <= 1e-4
    assert "latent model" in CliRunner().invoke(export_main, ["inspect", str(engines)]).output
    root = engines.parent
    checked = CliRunner().invoke(export_main, ["verify", str(engines), "--ckpt", str(root / "latent.safetensors")])
    assert checked.exit_code == 0 and "skip decoder: checked against its VAE" in checked.output, checked.output


def test_lego_run_decodes_latents_to_rgb_images(latent_model, tmp_path):
    _, vae, engines = latent_model
    args = ["--engines", engines, "--steps", 3, "--num", 2, "--resolution", "16x32", "--out", tmp_path / "g.png"]
    args += ["--save-npz", tmp_path / "i.npz", "--save-latents", tmp_path / "z.npz"]
    result = CliRunner().invoke(lego_run, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    images, latents = np.load(tmp_path / "i.npz")["images"], np.load(tmp_path / "z.npz")["latents"]
    assert latents.shape == (2, 4, 16, 32) and images.shape == (2, 3, 32, 64)
    with torch.no_grad():  # the images are diffusers' decoding of the sampled latents
        reference = vae.decode(torch.from_numpy(latents) / vae.config.scaling_factor).sample.clamp(-1, 1).numpy()
    np.testing.assert_allclose(images, reference, atol=1e-4 * np.abs(reference).max())
    assert np.abs(images).max() > 0.05


def test_the_decoder_runs_without_torch_in_the_runtime(latent_model):
    _, _, engines = latent_model
    result = LegoPipeline.from_engines(engines)(num=1, steps=2)
    assert result.images.shape == (1, 3, 32, 32) and result.latents.shape == (1, 4, 16, 16)
    assert "decoder" in result.timing.engine_calls


def test_latent_build_refusals_are_one_line(latent_model, tmp_path):
    root, _, _ = latent_model
    pixel = LegoModel(get_preset("pg-tiny"))
    save_checkpoint(tmp_path / "pixel.safetensors", pixel)
    cases = [
        (
            ["--ckpt", tmp_path / "pixel.safetensors", "--vae", root / "vae"],
            "has 4 latent channels; the model samples 1",
        ),
        (["--ckpt", root / "latent.safetensors", "--vae", tmp_path], "not a diffusers model folder"),
        (["--ckpt", root / "latent.safetensors", "--latent-scale", "0.2"], "--latent-scale goes with --vae"),
        (["--ckpt", root / "latent.safetensors", "--vae", root / "vae", "--latent-scale", "inf"], "finite positive"),
        (["--ckpt", root / "latent.safetensors", "--vae", root / "vae", "--latent-scale", "-1"], "finite positive"),
        (["--ckpt", root / "latent.safetensors", "--vae", root / "vae", "--latent-scale", "nan"], "finite positive"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(export_main, ["build", *map(str, args), "--out", str(tmp_path / "e")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_a_manifest_declaring_a_latent_space_needs_its_decoder(latent_model, tmp_path):
    import shutil

    _, _, engines = latent_model
    copy = tmp_path / "e"
    shutil.copytree(engines, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["engines"] = [e for e in data["engines"] if e["role"] != "decoder"]
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="expected embedder, brick0, brick1, brick2, decoder"):
        Manifest.read(copy)
