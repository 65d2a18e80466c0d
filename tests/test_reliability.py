"""Silent wrong numbers turned into one-line refusals (issue 16, group 3)."""

import numpy as np
import pytest
import torch

import itdiffusion as itd
from itdiffusion.cli import main


def test_clip_that_overflows_the_log_snr_range_is_refused():
    spec = itd.GaussianSpectrum.isotropic((4,), variance=1.0)
    model = itd.ITDiffusion(spec, spec)
    with pytest.raises(ValueError, match="clip must be at most"):
        model.nll(torch.randn(3, 4), 8, seed=0, clip=1e300)


def test_a_spectrum_with_non_orthonormal_eigenvectors_is_refused(tmp_path):
    spec = itd.GaussianSpectrum.from_data(torch.randn(200, 5, generator=torch.Generator().manual_seed(0)))
    spec.save(tmp_path / "s.npz")
    arrays = dict(np.load(tmp_path / "s.npz"))
    arrays["eigvecs"] = arrays["eigvecs"] * 1.01
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="not orthonormal"):
        itd.GaussianSpectrum.load(tmp_path / "bad.npz")
    assert itd.GaussianSpectrum.load(tmp_path / "s.npz").d == 5


def test_non_finite_weights_are_never_saved(tmp_path):
    from itdiffusion.training.checkpoint import Checkpoint, save_checkpoint

    state = {"w": torch.tensor([1.0, float("nan")]), "steps": torch.tensor([3])}
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_checkpoint(tmp_path / "c.safetensors", Checkpoint(model_state=state, optimizer_state=None, epoch=1, meta={}))
    assert not list(tmp_path.iterdir())


def test_finetune_that_diverges_saves_nothing(tmp_path):
    """The CLI bounds --lr by 1; a Python run that still diverges stops in one line and saves nothing."""
    import itdiffusion as itd
    from itdiffusion.data.images import load_data
    from itdiffusion.resolve import resolve_model
    from itdiffusion.training.train import TrainConfig, train

    data = load_data("digits", "train", limit=32)
    spectrum = itd.GaussianSpectrum.from_data(data.x, diagonal=True)
    model = itd.ITDiffusion(resolve_model("small-unet", spectrum=spectrum, grid=data.grid).denoiser, spectrum)
    run = tmp_path / "run"
    with pytest.raises((ValueError, FloatingPointError), match="became (inf|nan)|NaN or Inf") as err:
        train(model, data.x, TrainConfig(epochs=1, batch_size=16, lr=1e308), out_dir=run, progress=False)
    assert "\n" not in str(err.value)
    assert not (run / "checkpoint.safetensors").exists()
