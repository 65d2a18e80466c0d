"""Estimators against closed-form truth: Gaussians, Gaussian mixtures, finite discrete laws."""

import math

import pytest
import torch

import itdiffusion as itd
from itdiffusion.core.channel import add_noise
from conftest import gaussian_sample, make_mixture, random_gaussian, within


def test_gaussian_pointwise_density_with_another_reference(gen):
    """Optimal denoiser of N(mu, Sigma), reference N(0, I): recovers log N(x) per point, and h_g on average."""
    truth = random_gaussian(8)
    model = itd.ITDiffusion(truth, itd.GaussianSpectrum.isotropic((8,)))
    x = gaussian_sample(truth, 400, gen)
    nll = model.nll(x, 128, generator=gen)
    exact = -truth.log_prob(x)
    within(nll, exact)
    assert (nll - exact).abs().mean() < 0.15 * exact.std()  # pointwise, not only on average
    within(nll, torch.full_like(nll, truth.entropy()), n_se=4.0 * (nll.std() / (nll - exact).std()).item())


def test_gaussian_with_its_own_reference_is_exact(gen):
    truth = random_gaussian(5)
    model = itd.ITDiffusion(truth, truth)
    x = gaussian_sample(truth, 10, gen)
    assert torch.allclose(model.nll(x, 16, generator=gen), -truth.log_prob(x), atol=1e-9)


@pytest.mark.parametrize("d", [2, 64])
def test_isotropic_mixture_recovers_mean_nll(d, gen):
    mix = make_mixture(d, seed=d)
    spec = itd.GaussianSpectrum.from_data(mix.sample(max(4000, 8 * d), gen))
    model = itd.ITDiffusion(mix, spec)
    x = mix.sample(300, gen)
    nll = model.nll(x, 128, generator=gen)
    within(nll, -mix.log_prob(x))


@pytest.mark.parametrize("mode", ["iid", "midpoint"])
def test_other_point_placements_also_recover_it(mode, gen):
    mix = make_mixture(2, seed=7)
    model = itd.ITDiffusion(mix, itd.GaussianSpectrum.from_data(mix.sample(4000, gen)))
    x = mix.sample(300, gen)
    within(model.nll(x, 128, generator=gen, placement=mode, antithetic=False), -mix.log_prob(x), slack=0.02)


def discrete_law(d=2, seed=0):
    grid = itd.DiscreteGrid(-1.0, 1.0, 17)
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(3, d, generator=gen, dtype=torch.float64) * 1.4 - 0.7
    return grid, itd.FiniteDiscrete.discretized_mixture(grid, means, torch.tensor([0.2, 0.35, 0.25]))


def test_discrete_mixture_on_17_levels_recovers_log_prob(gen):
    grid, law = discrete_law()
    model = itd.ITDiffusion(law, itd.GaussianSpectrum.from_data(law.sample(5000, gen)))
    x = law.sample(400, gen)
    exact = -law.log_prob(x)
    nll = model.nll(x, 128, generator=gen, discrete=grid, rounding="none")
    within(nll, exact)
    # Rounding gives other denoisers: still upper bounds on average.
    for rounding in ("hard", "soft"):
        bound = model.nll(x, 128, generator=gen, discrete=grid, rounding=rounding)
        err = bound - exact
        assert err.mean() > -3 * err.std() / math.sqrt(len(err))


def test_continuous_estimate_of_discrete_data_runs_to_minus_infinity(gen):
    """A discrete law has no density: the continuous estimate drops as the range widens."""
    grid, law = discrete_law()
    model = itd.ITDiffusion(law, itd.GaussianSpectrum.from_data(law.sample(5000, gen)))
    x = law.sample(50, gen)
    narrow = model.nll(x, 64, seed=0, clip=4).mean()
    wide = model.nll(x, 64, seed=0, clip=10).mean()
    assert wide < narrow - 1.0


def test_right_tail_bound_closed_form_matches_its_integral():
    grid = itd.DiscreteGrid(-1.0, 1.0, 17)
    a_hi, d = 4.0, 3
    a = torch.linspace(a_hi, a_hi + 30, 200_001, dtype=torch.float64)
    j = torch.arange(1, grid.levels, dtype=torch.float64)
    t = (j - 0.5) * grid.delta * torch.exp(0.5 * a).unsqueeze(-1)
    q = 0.5 * torch.erfc(t / math.sqrt(2))
    err = d * torch.exp(a) * grid.delta**2 * ((2 * j - 1) * 2 * q).sum(-1)
    numeric = 0.5 * torch.trapezoid(err, a)
    assert itd.right_tail_bound(a_hi, grid, d).item() == pytest.approx(numeric.item(), rel=1e-5)


def tail_integrals(model, law, grid, x, a_lo, a_hi, gen, n_eps=100):
    """Numerically integrated left and right tails of the exact mmse (Monte Carlo in eps, trapezoid in a)."""
    def mmse(a_val):
        eps = torch.randn(len(x) * n_eps, *model.shape, generator=gen, dtype=torch.float64)
        xs = x.repeat_interleave(n_eps, 0)
        a = torch.full((len(xs),), a_val, dtype=torch.float64)
        err = ((eps - law(add_noise(xs, a, eps), a)) ** 2).sum(1)
        return err.mean().item()

    left_a = torch.linspace(a_lo - 20, a_lo, 41, dtype=torch.float64)
    right_a = torch.linspace(a_hi, a_hi + 20, 41, dtype=torch.float64)
    left = 0.5 * torch.trapezoid(torch.tensor([mmse(v) for v in left_a.tolist()]), left_a)
    right = 0.5 * torch.trapezoid(torch.tensor([mmse(v) for v in right_a.tolist()]), right_a)
    return left.item(), right.item()


@pytest.mark.parametrize("a_lo, a_hi", [(-2.0, 2.0), (0.0, 5.0)])
def test_tail_bounds_are_never_below_integrated_tails(a_lo, a_hi, gen):
    grid, law = discrete_law(seed=1)
    spec = itd.GaussianSpectrum.from_data(law.sample(5000, gen))
    model = itd.ITDiffusion(law, spec)
    x = law.sample(30, gen)
    left, right = tail_integrals(model, law, grid, x, a_lo, a_hi, gen)
    left_bound = 0.5 * spec.error_integral(x, a_lo).mean().item()
    right_bound = itd.right_tail_bound(a_hi, grid, 2).item()
    assert left_bound >= left * 0.98 - 1e-3
    assert right_bound >= right * 0.98 - 1e-3
    assert right_bound > 0


def test_rounding_returns_grid_values():
    grid = itd.DiscreteGrid(-1.0, 1.0, 17)
    x = torch.linspace(-1.5, 1.5, 301)
    rounded = grid.round(x)
    k = grid.index(rounded)
    assert torch.allclose(k, k.round(), atol=1e-5) and rounded.min() == -1 and rounded.max() == 1
    assert (rounded - x.clamp(-1, 1)).abs().max() <= grid.delta / 2 + 1e-6
    soft = grid.soft_round(x.reshape(1, -1), torch.tensor([30.0]))
    assert torch.allclose(soft[0], rounded, atol=1e-6)  # high SNR: soft -> hard
    soft_low = grid.soft_round(x.reshape(1, -1), torch.tensor([-5.0]))
    assert soft_low.min() >= -1 and soft_low.max() <= 1


@pytest.mark.parametrize("levels", [17, 256])
def test_windowed_soft_rounding_equals_dense(levels):
    from itdiffusion.core.grid import soft_round_index_dense

    grid = itd.DiscreteGrid(-1.0, 1.0, levels)
    gen = torch.Generator().manual_seed(0)
    x_hat = torch.rand(6, 50, generator=gen, dtype=torch.float64) * 2.4 - 1.2
    logsnr = torch.tensor([-8.0, 0.0, 4.0, 9.0, 12.0, 25.0], dtype=torch.float64)
    fast = grid.soft_round_index(x_hat, logsnr, max_elements=500)
    dense = soft_round_index_dense(grid, x_hat, logsnr)
    assert torch.allclose(fast, dense, atol=1e-6, rtol=0)


def test_results_do_not_depend_on_batch_size(gen):
    mix = make_mixture(3, seed=3)
    model = itd.ITDiffusion(mix, itd.GaussianSpectrum.from_data(mix.sample(2000, gen)))
    x = mix.sample(9, gen)
    whole = model.nll(x, 10, seed=5)
    assert torch.allclose(model.nll(x, 10, seed=5, batch_size=7), whole, rtol=1e-12)
    assert torch.equal(model.nll(x, 10, seed=5), whole)  # bit-identical rerun
    assert not torch.allclose(model.nll(x, 10, seed=6), whole)


@pytest.mark.parametrize("proposal", ["uniform", "logistic"])
def test_loss_is_a_differentiable_unbiased_nll(gen, proposal):
    mix = make_mixture(2, seed=4)
    spec = itd.GaussianSpectrum.from_data(mix.sample(4000, gen))
    x = mix.sample(128, gen)
    # a trainable denoiser: the exact one plus a learnable bias
    bias = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    model = itd.ITDiffusion(lambda z, a: mix(z, a) + bias, spec, train_clip=model_clip(spec), train_proposal=proposal)
    losses = torch.stack([model.loss(x, generator=gen) for _ in range(25)])
    loss = losses.mean()
    loss.backward()
    assert bias.grad is not None and bias.grad.abs().max() < 5.0
    truncated_truth = model.nll(x, 128, generator=gen, clip=model.train_clip).mean()
    se = losses.std() / math.sqrt(len(losses))
    assert abs(loss.item() - truncated_truth.item()) < 4 * se.item() + 0.05
    # a biased denoiser costs likelihood: gradient descent on the bias lowers the loss
    with torch.no_grad():
        bias.fill_(0.5)
    worse = torch.stack([model.loss(x, generator=torch.Generator().manual_seed(i)) for i in range(20)]).mean()
    assert worse > loss + 0.1


def model_clip(spec):
    return 6.0


def test_state_dict_carries_the_spectrum(gen):
    mix = make_mixture(4, seed=5)
    spec = itd.GaussianSpectrum.from_data(mix.sample(1000, gen))
    model = itd.ITDiffusion(mix, spec)
    state = model.state_dict()
    assert {"spectrum_mean", "spectrum_log_eigs", "spectrum_eigvecs", "proposal"} <= set(state)
    other = itd.ITDiffusion(mix, itd.GaussianSpectrum.isotropic((4,)))
    other.load_state_dict(state)
    assert torch.equal(other.spectrum.log_eigs, spec.log_eigs) and other.loc == model.loc


@pytest.mark.parametrize("d", [1, 2, 7, 64, 3072])
def test_chi2_antithetic_radius_is_exactly_chi2(d):
    from itdiffusion.core.noise import chi2_antithetic

    gen = torch.Generator().manual_seed(d)
    r2 = (torch.randn(4000, d, generator=gen, dtype=torch.float64) ** 2).sum(1)
    mirrored = chi2_antithetic(r2, d)
    a = torch.tensor(d / 2, dtype=torch.float64)
    # F(r') = 1 - F(r): the CDF values mirror exactly, far into both tails
    assert torch.allclose(torch.special.gammainc(a, mirrored / 2), torch.special.gammaincc(a, r2 / 2), atol=1e-10)
    assert torch.allclose(chi2_antithetic(mirrored, d), r2, rtol=1e-8)
    extreme = torch.tensor([1e-9 * d, 1e-3 * d, 5.0 * d + 60, 50.0 * d], dtype=torch.float64)
    assert torch.isfinite(chi2_antithetic(extreme, d)).all()


def test_antithetic_layout_noise_is_standard_normal():
    from itdiffusion.core.noise import CallLayout

    layout = CallLayout(8, antithetic=True)
    eps = torch.randn(3000, 2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = layout.call_noise(eps)
    assert calls.shape == (3000, 8, 5) and torch.equal(calls[:, 1], -calls[:, 0])
    flat = calls[:, 2]  # the mirrored-radius draw: still N(0, I)
    assert abs(flat.mean().item()) < 0.03 and abs(flat.var().item() - 1) < 0.03
    odd = CallLayout(6, antithetic=True)
    assert odd.n_strata == 2 and odd.stratum().tolist() == [0, 0, 0, 0, 1, 1]


def test_errors_in_x_units(gen):
    mix = make_mixture(3, seed=9)
    model = itd.ITDiffusion(mix, itd.GaussianSpectrum.from_data(mix.sample(500, gen)))
    x = mix.sample(4, gen)
    logsnr = torch.tensor([-2.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    eps = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    errs = model.errors(x, logsnr, eps)
    x_hat = itd.core.channel.x_from_eps(itd.core.channel.add_noise(x, logsnr, eps), mix(itd.core.channel.add_noise(x, logsnr, eps), logsnr), logsnr)
    assert torch.allclose(errs.in_x_units(logsnr).raw, ((x - x_hat) ** 2).sum(1), rtol=1e-9)
