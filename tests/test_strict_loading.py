"""Strict loading of diffusers folders: a damaged folder is refused before anything is computed.

diffusers' ``from_pretrained`` would fill a weight missing from the file with uninitialised
memory and allocate whatever a config asks for; these cases must be one-line refusals.
"""

import json
import shutil

import pytest
import torch

from itdiffusion.cli import main
from itdiffusion.denoisers import DiffusersDenoiser
from itdiffusion.denoisers import unet_files

diffusers = pytest.importorskip("diffusers")
from safetensors.torch import load_file, save_file  # noqa: E402

TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=8)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("strict") / "good"
    torch.manual_seed(0)
    diffusers.UNet2DModel(**TINY).save_pretrained(path)
    diffusers.DDPMScheduler().save_pretrained(path)
    return path


def _copy(good, tmp_path, name="bad"):
    path = tmp_path / name
    shutil.copytree(good, path)
    return path


def _edit_weights(path, edit):
    state = load_file(str(path / WEIGHTS))
    edit(state)
    save_file(state, str(path / WEIGHTS))


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _refused(path, match):
    with pytest.raises(ValueError, match=match):
        DiffusersDenoiser.from_pretrained(path)


def test_good_folder_loads_the_saved_weights_exactly(good):
    unet = unet_files.load_unet_folder(good)
    state = load_file(str(good / WEIGHTS))
    assert set(unet.state_dict()) == set(state)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())


def test_missing_weight_refused(good, tmp_path):
    path = _copy(good, tmp_path)
    _edit_weights(path, lambda s: s.pop("conv_norm_out.weight"))
    _refused(path, r"1 missing: conv_norm_out.weight")


def test_unexpected_weight_refused(good, tmp_path):
    path = _copy(good, tmp_path)
    _edit_weights(path, lambda s: s.__setitem__("extra.weight", torch.zeros(3)))
    _refused(path, r"1 unexpected: extra.weight")


def test_shape_mismatch_refused(good, tmp_path):
    path = _copy(good, tmp_path)
    _edit_weights(path, lambda s: s.__setitem__("conv_in.bias", torch.zeros(5)))
    _refused(path, r"shape mismatches: conv_in.bias")


def test_non_finite_weight_refused(good, tmp_path):
    path = _copy(good, tmp_path)
    _edit_weights(path, lambda s: s["conv_in.bias"].__setitem__(0, float("nan")))
    _refused(path, r"inf or NaN")


@pytest.mark.parametrize("changes", [dict(layers_per_block="two"), dict(block_out_channels="wide"),
                                     dict(norm_num_groups=0), dict(down_block_types=["NoSuchBlock2D"] * 2)])
def test_config_of_wrong_type_refused(good, tmp_path, changes):
    path = _copy(good, tmp_path)
    _edit_config(path, **changes)
    _refused(path, r"config.json: not a valid UNet2DModel configuration")


def test_huge_config_refused_before_allocation(good, tmp_path):
    path = _copy(good, tmp_path)
    _edit_config(path, block_out_channels=[8192, 16384])  # ~10^10 parameters: ~80 GB in float32
    _refused(path, r"parameters, which needs about .* GiB to load; only .* GiB are available")


def test_size_bound_follows_available_memory(good, monkeypatch):
    monkeypatch.setattr(unet_files, "available_memory_bytes", lambda: 1000)
    _refused(good, r"GiB are available")


def test_missing_weights_file_refused(good, tmp_path):
    path = _copy(good, tmp_path)
    (path / WEIGHTS).unlink()
    _refused(path, r"no diffusion_pytorch_model.safetensors")


def test_sharded_weights_load_and_missing_shard_refused(good, tmp_path):
    path = _copy(good, tmp_path)
    state = load_file(str(path / WEIGHTS))
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(path / name))
    (path / WEIGHTS).unlink()
    index = {"weight_map": {k: n for n, names in shards.items() for k in names}}
    (path / (WEIGHTS + ".index.json")).write_text(json.dumps(index))
    unet = unet_files.load_unet_folder(path)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    (path / "b.safetensors").unlink()
    _refused(path, r"shard named by the index is missing")


def test_cli_missing_weight_is_one_line_exit_2(good, tmp_path, capsys):
    path = _copy(good, tmp_path)
    _edit_weights(path, lambda s: s.pop("conv_norm_out.weight"))
    out, spectrum = tmp_path / "r.json", tmp_path / "s.npz"
    assert main(["spectrum", "--data", "digits", "--out", str(spectrum)]) == 0
    capsys.readouterr()
    code = main(["eval", "--model", str(path), "--spectrum", str(spectrum), "--data", "digits", "--points", "4", "--limit", "2",
                 "--no-tune", "--quiet", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "conv_norm_out.weight" in err[0]
    assert not out.exists()
