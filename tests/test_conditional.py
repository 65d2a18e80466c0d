"""Conditional likelihood, pointwise mutual information and zero-shot classification (issue 18),
against class-conditional laws with exact conditional and unconditional denoisers."""

import math

import pytest
import torch

import itdiffusion as itd
from itdiffusion.core.condition import as_condition, takes_y

from conftest import within


def overlapping_mixture(d=6, k=3, seed=0):
    """Classes close enough that the Bayes posterior is far from one-hot."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=gen, dtype=torch.float64) * 0.6
    stds = torch.rand(k, generator=gen, dtype=torch.float64) * 0.4 + 0.6
    return itd.ClassMixture(means, stds, torch.rand(k, generator=gen, dtype=torch.float64) + 0.5)


def mixture_model(law, n=400, seed=1):
    x, labels = law.sample_labelled(n, torch.Generator().manual_seed(seed))
    return itd.ITDiffusion(law, itd.GaussianSpectrum.from_data(x)), x, labels


def joint_finite():
    grid = itd.DiscreteGrid(-1, 1, 6)
    means = torch.tensor([[-0.5, -0.3], [0.4, 0.1], [0.0, 0.6]], dtype=torch.float64)
    return grid, itd.JointFinite.discretized(grid, means, [0.5, 0.6, 0.4], [1.0, 2.0, 1.5])


def test_conditional_nll_matches_exact():
    model, x, labels = mixture_model(overlapping_mixture())
    nll = model.nll(x, 64, seed=0, y=labels)
    within(nll, -model.denoiser.log_prob(x, labels))
    assert not torch.allclose(nll, model.nll(x, 64, seed=0))


def test_mi_matches_exact_pointwise_mi():
    law = overlapping_mixture()
    model, x, labels = mixture_model(law)
    mi, se = model.mi(x, labels, 64, seed=0, return_se=True)
    truth = law.pointwise_mi(x, labels)
    err = mi - truth
    bias_se = (se**2).sum().sqrt() / len(x)
    rmse = err.pow(2).mean().sqrt().item()
    print(f"\ncontinuous mi: bias {err.mean().item():+.4f} nats (se {bias_se.item():.4f}), "
          f"per-example RMSE {rmse:.3f} nats, mean se {se.mean().item():.3f}, spread of truth {truth.std().item():.3f}")
    assert abs(err.mean().item()) < 4 * bias_se.item()
    assert 0.7 < (err / se).std().item() < 1.3  # the standard errors are honest
    assert rmse < 0.5 * truth.std().item()


def test_mi_is_the_difference_of_nll_at_the_same_seed():
    model, x, labels = mixture_model(overlapping_mixture(), n=20)
    mi = model.mi(x, labels, 32, seed=3)
    diff = model.nll(x, 32, seed=3) - model.nll(x, 32, seed=3, y=labels)
    torch.testing.assert_close(mi, diff, rtol=0, atol=1e-10)


def test_mi_discrete_matches_exact():
    grid, law = joint_finite()
    x, labels = law.sample_labelled(400, torch.Generator().manual_seed(2))
    model = itd.ITDiffusion(law, itd.GaussianSpectrum.from_data(x))
    mi, se = model.mi(x, labels, 64, seed=0, discrete=grid, rounding="none", return_se=True)
    err = mi - law.pointwise_mi(x, labels)
    bias_se = ((se**2).sum().sqrt() / len(x)).item()
    print(f"\ndiscrete mi: bias {err.mean().item():+.4f} (se {bias_se:.4f}), RMSE {err.pow(2).mean().sqrt().item():.3f}")
    assert abs(err.mean().item()) < 4 * bias_se


def test_classify_agrees_with_bayes_posterior():
    law = overlapping_mixture()
    model, x, labels = mixture_model(law, n=200)
    scores = model.classify(x, labels=[0, 1, 2], n_points=64, seed=0)
    assert scores.shape == (200, 3)
    post, truth = torch.softmax(scores, 1), law.posterior(x, uniform=True)
    l1 = (post - truth).abs().sum(1).mean().item()
    agree = (post.argmax(1) == truth.argmax(1)).double().mean().item()
    print(f"\nclassify: posterior L1 {l1:.4f}, argmax agreement {agree:.3f}")
    assert l1 < 0.1 and agree > 0.95
    # the scores are -nll per candidate at the same seed (shared noise)
    torch.testing.assert_close(scores[:, 1], -model.nll(x, 64, seed=0, y=1), rtol=0, atol=1e-10)


def test_classify_early_drop_saves_calls():
    law = overlapping_mixture(d=8, seed=4)
    law = itd.ClassMixture(law.means * 3, 0.8)  # well separated: most candidates drop early
    model, x, _ = mixture_model(law, n=60)
    scores, calls = model.classify(x, 3, 64, seed=0, early_drop=3.0, return_calls=True)
    truth = law.posterior(x, uniform=True).argmax(1)
    assert (scores.argmax(1) == truth).double().mean() > 0.95
    saved = 1 - calls.sum().item() / (64 * 3 * len(x))
    assert saved > 0.2
    assert (calls.max(1).values == 64).all()  # the winner gets every call


def test_refusals():
    mix = itd.GaussianMixture(torch.zeros(2, 3, dtype=torch.float64), 1.0)
    model = itd.ITDiffusion(mix, itd.GaussianSpectrum.isotropic((3,)))
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="not conditional"):
        model.nll(x, 8, seed=0, y=0)
    with pytest.raises(ValueError, match="not conditional"):
        model.mi(x, [0, 1, 0, 1], 8, seed=0)
    cond = itd.ITDiffusion(itd.ClassMixture(torch.zeros(2, 3, dtype=torch.float64), 1.0),
                           itd.GaussianSpectrum.isotropic((3,)))
    with pytest.raises(ValueError, match="3 conditions for 4 examples"):
        cond.nll(x, 8, seed=0, y=[0, 1, 0])
    with pytest.raises(ValueError, match="labels must lie"):
        cond.nll(x, 8, seed=0, y=5)
    with pytest.raises(ValueError, match="early_drop"):
        cond.classify(x, 2, 8, seed=0, early_drop=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        cond.classify(x, [], 8, seed=0)


def test_takes_y():
    assert takes_y(itd.ClassMixture(torch.zeros(2, 3), 1.0))
    assert not takes_y(itd.GaussianMixture(torch.zeros(2, 3), 1.0))
    assert takes_y(lambda z, logsnr, y=None: z)
    assert not takes_y(lambda z, logsnr: z)
    assert as_condition(2, 3).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="NaN"):
        as_condition(torch.tensor([math.nan]), 1)


def test_diffusers_conditional_flag():
    diffusers = pytest.importorskip("diffusers")
    from itdiffusion.denoisers.diffusers import DiffusersDenoiser

    config = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                  norm_num_groups=4)
    schedule = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    torch.manual_seed(0)
    plain = DiffusersDenoiser(diffusers.UNet2DModel(**config).eval(), schedule)
    assert plain.conditional is False and not takes_y(plain)
    torch.manual_seed(0)
    labelled = DiffusersDenoiser(diffusers.UNet2DModel(**config, num_class_embeds=3).eval(), schedule)
    assert labelled.conditional is True
    model = itd.ITDiffusion(labelled, itd.GaussianSpectrum.isotropic((1, 8, 8)))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    scores = model.classify(x, 3, 8, seed=0)
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()
    assert not torch.allclose(scores[:, 0], scores[:, 1])  # the labels reach the network
    with pytest.raises(ValueError, match="not conditional"):
        itd.ITDiffusion(plain, itd.GaussianSpectrum.isotropic((1, 8, 8))).nll(x, 8, seed=0, y=0)
