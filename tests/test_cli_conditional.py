"""``itd infomap``, ``itd mi`` and ``itd classify`` on digits with a tiny class-conditional diffusers UNet."""

import json

import numpy as np
import pytest
import torch

import itdiffusion as itd
from itdiffusion.cli import main
from itdiffusion.data.labelled import network_labels, read_labelled_folder, write_labelled_folder

diffusers = pytest.importorskip("diffusers")

SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
            "prediction_type": "epsilon"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("cond")
    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == k)[:3] for k in (0, 1, 7)])
    x = torch.tensor(digits.data[keep].reshape(-1, 1, 8, 8) / 8.0 - 1.0, dtype=torch.float32)
    write_labelled_folder(x, torch.tensor(digits.target[keep]), root / "digits")
    itd.GaussianSpectrum.from_data(read_labelled_folder(root / "digits").x, diagonal=True).save(root / "spectrum.npz")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 8), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=11)
    unet.save_pretrained(root / "unet")
    (root / "unet" / "scheduler_config.json").write_text(json.dumps(SCHEDULE))
    return root


def common(files):
    return ["--model", str(files / "unet"), "--data", str(files / "digits"), "--spectrum", str(files / "spectrum.npz"),
            "--points", "8", "--null-label", "10"]


def test_labelled_folder(files):
    data = read_labelled_folder(files / "digits")
    assert data.classes == ("0", "1", "7") and data.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert network_labels(data.classes).tolist() == [0, 1, 7]


def test_infomap(files, capsys):
    out = files / "map.png"
    assert main(["infomap", *common(files), "--out", str(out)]) == 0
    arrays = np.load(files / "map.npz")
    np.testing.assert_allclose(arrays["nll_map_nats"].reshape(9, -1).sum(1), arrays["nll_nats"], rtol=1e-12)
    assert out.stat().st_size > 1000 and "bits/dim" in capsys.readouterr().out
    assert main(["infomap", *common(files), "--out", str(out)]) == 2  # exists


def test_conditional_infomap_and_mi(files, capsys):
    assert main(["infomap", *common(files), "--y", "7", "--out", str(files / "map7.png")]) == 0
    out = files / "mi.png"
    assert main(["mi", *common(files), "--out", str(out)]) == 0
    result = json.loads((files / "mi.json").read_text())
    assert result["y"] == [0] * 3 + [1] * 3 + [7] * 3 and len(result["mi_nats"]) == 9
    arrays = np.load(files / "mi.npz")
    np.testing.assert_allclose(arrays["mi_map_nats"].reshape(9, -1).sum(1), arrays["mi_nats"], rtol=1e-9, atol=1e-9)
    assert out.stat().st_size > 1000


def test_classify(files, capsys):
    out = files / "cls.json"
    assert main(["classify", *common(files), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert np.array(result["confusion"]).sum() == 9 and 0 <= result["accuracy"] <= 1
    assert (files / "cls.png").stat().st_size > 1000
    assert main(["classify", *common(files), "--out", str(files / "cls2.json"), "--early-drop", "2"]) == 0
    assert "saved" in capsys.readouterr().out


def test_refusals(files, capsys):
    args = [a for a in common(files) if a not in ("--null-label", "10")]
    assert main(["mi", *args, "--out", str(files / "mi2.png")]) == 2  # no null label: y=None refused
    assert "--null-label" in capsys.readouterr().err
    assert main(["classify", *common(files), "--out", str(files / "x.png")]) == 2
    assert "must name a .json" in capsys.readouterr().err
    assert main(["classify", *common(files)[:2], "--data", str(files), "--spectrum", str(files / "spectrum.npz"),
                 "--out", str(files / "y.json")]) == 2


def test_outputs_beside_the_figure_never_replace_the_spectrum(files, capsys):
    """``--out spectrum.png`` would write its maps to ``spectrum.npz``, the input: refused, even with --overwrite."""
    spectrum = files / "spectrum.npz"
    before = spectrum.read_bytes()
    for command in ("infomap", "mi"):
        capsys.readouterr()
        assert main([command, *common(files), "--out", str(files / "spectrum.png"), "--overwrite"]) == 2
        assert "would replace the input" in capsys.readouterr().err
    assert spectrum.read_bytes() == before
