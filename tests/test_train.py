"""Training with the IT objective: checkpoints, resume, validation."""

import json

import pytest
import torch
from torch import nn

import itdiffusion as itd
from itdiffusion.training.checkpoint import load_checkpoint
from itdiffusion.training.train import TrainConfig, train
from conftest import make_mixture


class TinyDenoiser(nn.Module):
    def __init__(self, d=2, hidden=32, dropout=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, d))

    def forward(self, z, logsnr):
        return z * torch.sigmoid(-logsnr)[:, None].sqrt() + self.net(torch.cat([z, logsnr[:, None] / 10], 1))


def make_model(seed=0):
    mix = make_mixture(2, seed=3)
    gen = torch.Generator().manual_seed(seed)
    x = mix.sample(600, gen).float()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = TinyDenoiser()
    return itd.ITDiffusion(net, itd.GaussianSpectrum.from_data(x)), x[:500], x[500:]


def test_training_lowers_the_loss_and_writes_checkpoints(tmp_path):
    model, x, x_val = make_model()
    cfg = TrainConfig(epochs=4, lr=3e-3, batch_size=50, val_points=16)
    hist = train(model, x, cfg, x_val=x_val, out_dir=tmp_path, progress=False, meta={"net": "tiny"})
    losses = [r.train_loss for r in hist.records]
    assert losses[-1] < losses[0]
    assert all(r.val_nll is not None and r.val_se > 0 for r in hist.records)
    ckpt = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert ckpt.epoch == 4 and ckpt.meta["model"] == {"net": "tiny"}
    assert "spectrum_log_eigs" in ckpt.model_state
    assert len(json.loads((tmp_path / "history.json").read_text())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "history.json"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(epochs=4, lr=3e-3, batch_size=64, val_points=8, seed=7)
    full, x, x_val = make_model()
    train(full, x, cfg, x_val=x_val, out_dir=tmp_path / "full", progress=False)
    # "killed" after epoch 2: train 2 epochs, then a fresh process resumes to 4
    part, _, _ = make_model()
    train(part, x, TrainConfig(**{**cfg.__dict__, "epochs": 2}), x_val=x_val, out_dir=tmp_path / "part",
          progress=False)
    fresh, _, _ = make_model(seed=123)  # different initial weights: all must come from the checkpoint
    hist = train(fresh, x, cfg, x_val=x_val, out_dir=tmp_path / "part", resume=True, progress=False)
    assert [r.epoch for r in hist.records] == [1, 2, 3, 4]
    for (name, a), b in zip(full.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_changed_settings(tmp_path):
    model, x, _ = make_model()
    train(model, x, TrainConfig(epochs=1, batch_size=100), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(model, x, TrainConfig(epochs=2, batch_size=100, lr=0.5), out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="nothing to resume"):
        train(model, x, TrainConfig(epochs=2), out_dir=tmp_path / "none", resume=True, progress=False)


def test_truncated_checkpoint_is_detected(tmp_path):
    model, x, _ = make_model()
    train(model, x, TrainConfig(epochs=1, batch_size=100), out_dir=tmp_path, progress=False)
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or invalid"):
        load_checkpoint(path)


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", -1), ("lr", 0.0)])
def test_bad_config(field, value):
    model, x, _ = make_model()
    with pytest.raises(ValueError, match=field):
        train(model, x, TrainConfig(**{field: value}), progress=False)


def test_global_rng_is_untouched():
    model, x, _ = make_model()
    torch.manual_seed(42)
    before = torch.rand(1)
    torch.manual_seed(42)
    train(model, x, TrainConfig(epochs=1, batch_size=100), progress=False)
    assert torch.equal(torch.rand(1), before)


def test_dequantized_training_is_deterministic_and_differs(tmp_path):
    cfg = TrainConfig(epochs=1, lr=3e-3, batch_size=100, dequantize=0.1)
    runs = []
    for _ in range(2):
        model, x, _ = make_model()
        train(model, x, cfg, progress=False)
        runs.append(model.state_dict())
    plain, x, _ = make_model()
    train(plain, x, TrainConfig(epochs=1, lr=3e-3, batch_size=100), progress=False)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], plain.state_dict()[k]) for k in runs[0])
    with pytest.raises(ValueError, match="dequantize"):
        TrainConfig(dequantize=-1.0).validate()
