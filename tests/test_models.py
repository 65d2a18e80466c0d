"""Resolving --model: small-unet, registry weights by their tensor shapes, run directories."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import itdiffusion as itd
from itdiffusion.resolve import (describe_small_unet, load_run, match_registry, resolve_model, small_unet_config,
                                state_fingerprint)
from itdiffusion.denoisers.nets import GaussianResidual
from itdiffusion.training.train import TrainConfig, train

FIXTURES = Path(__file__).parent / "fixtures"


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)

    def forward(self, z, logsnr):
        return self.conv(z)


def images(n=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.randn(n, 1, 8, 8, generator=g).cumsum(-1) / 4
    return itd.DiscreteGrid(-1, 1, 17).round(torch.tanh(smooth))


@pytest.mark.parametrize("shape, mult, base", [((1, 8, 8), [1, 2], 32), ((3, 32, 32), [1, 2, 2, 2], 64),
                                               ((1, 28, 28), [1, 2, 2], 32), ((3, 7, 7), [1], 32)])
def test_small_unet_is_sized_to_the_data(shape, mult, base):
    config = small_unet_config(shape)
    assert config["channel_mult"] == mult and config["base"] == base and config["channels"] == shape[0]


@pytest.mark.parametrize("diagonal", [False, True])
def test_fresh_small_unet_starts_as_the_gaussian_and_reloads_from_a_run(tmp_path, diagonal):
    x = images()
    spectrum = itd.GaussianSpectrum.from_data(x, diagonal=diagonal)
    loaded = resolve_model("small-unet", spectrum=spectrum, seed=3)
    assert isinstance(loaded.denoiser, GaussianResidual) and loaded.shape == (1, 8, 8)
    z, a = torch.randn(5, 1, 8, 8), torch.linspace(-5, 5, 5)
    assert torch.allclose(loaded.denoiser(z, a), spectrum.denoise(z, a))
    # a fresh model is a function of the seed only; the global RNG is untouched
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    again = resolve_model("small-unet", spectrum=spectrum, seed=3)
    assert torch.equal(torch.rand(1), before)
    assert state_fingerprint(again.denoiser) == state_fingerprint(loaded.denoiser)
    model = itd.ITDiffusion(loaded.denoiser, spectrum)
    train(model, x, TrainConfig(epochs=1, batch_size=40, lr=1e-2), out_dir=tmp_path, progress=False,
          meta=loaded.description)
    back = resolve_model(str(tmp_path))
    assert back.epoch == 1 and back.run == tmp_path and "epoch 1" in back.label
    assert state_fingerprint(back.denoiser) == state_fingerprint(model.denoiser)
    assert torch.equal(back.denoiser(z, a), model.denoiser(z, a))
    assert resolve_model(str(tmp_path / "checkpoint.safetensors")).epoch == 1


def test_registry_networks_are_recognised_by_their_tensors():
    shapes = json.loads((FIXTURES / "iddpm" / "cifar10_uncond_vlb_state_dict_shapes.json").read_text())
    assert match_registry(shapes["state_dict_shapes"]) == "iddpm-cifar10-vlb"
    assert match_registry({"weight": (3, 3)}) is None


def test_bad_model_arguments(tmp_path):
    with pytest.raises(ValueError, match="not a model name"):
        resolve_model("no-such-model")
    with pytest.raises(ValueError, match="--weights goes with a registry model"):
        resolve_model("small-unet", weights="w.pt")
    with pytest.raises(ValueError, match="sized to the data"):
        resolve_model("small-unet")
    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="match no registry model"):
        resolve_model(str(tmp_path / "other.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a run directory"):
        resolve_model(str(tmp_path / "empty"))
    # a checkpoint without a model description (e.g. from the Python API)
    x = images(40)
    spectrum = itd.GaussianSpectrum.from_data(x, diagonal=True)
    model = itd.ITDiffusion(GaussianResidual(Tiny(), spectrum), spectrum)
    train(model, x, TrainConfig(epochs=1, batch_size=40), out_dir=tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="no model description"):
        load_run(tmp_path / "run")


def test_description_round_trip_is_json():
    desc = describe_small_unet((3, 16, 16), itd.DiscreteGrid(-1, 1, 256))
    assert json.loads(json.dumps(desc)) == desc and desc["grid"]["levels"] == 256
