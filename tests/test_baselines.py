"""Likelihood baselines against closed forms: variational bounds and the probability-flow ODE."""

import math

import pytest
import torch

import itdiffusion as itd
from itdiffusion import baselines as bl
from itdiffusion.core.channel import add_noise, alpha_sigma
from conftest import gaussian_sample, make_mixture, random_gaussian, within


class LinearGaussian(torch.nn.Module):
    """The optimal denoiser of N(mu, Sigma), differentiable in z (the spectrum's own is not)."""

    def __init__(self, spec: itd.GaussianSpectrum):
        super().__init__()
        self.spec = spec

    def forward(self, z, logsnr):
        alpha, sigma = alpha_sigma(logsnr.double().reshape(-1, 1))
        y = (z.double() - alpha * self.spec.mean) @ self.spec.eigvecs
        gain = sigma / (alpha**2 * self.spec.log_eigs.exp() + sigma**2)
        return ((gain * y) @ self.spec.eigvecs.T).to(z.dtype)


def mixture_model(d, gen, seed=None):
    mix = make_mixture(d, seed=d if seed is None else seed)
    spec = itd.GaussianSpectrum.from_data(mix.sample(max(4000, 8 * d), gen))
    return mix, itd.ITDiffusion(mix, spec)


def discrete_law(seed=0):
    grid = itd.DiscreteGrid(-1.0, 1.0, 17)
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(3, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.7
    return grid, itd.FiniteDiscrete.discretized_mixture(grid, means, torch.tensor([0.2, 0.35, 0.25]))


# ----------------------------------------------------------------------------- Gaussian: exact
@pytest.fixture(scope="module")
def gauss_case():
    truth = random_gaussian(4)
    model = itd.ITDiffusion(LinearGaussian(truth), truth)
    x = gaussian_sample(truth, 8, torch.Generator().manual_seed(0))
    return model, x, -truth.log_prob(x)


@pytest.mark.parametrize("solver, n_steps", [("rk4", 16), ("dopri5", 0)])
def test_ode_is_exact_for_a_gaussian(gauss_case, solver, n_steps):
    model, x, exact = gauss_case
    result = bl.ode_nll(model, x, solver=solver, n_steps=max(n_steps, 1), seed=0)
    assert torch.allclose(result.nll, exact, atol=1e-3)
    assert result.vjps_per_call == 4 and result.calls_per_example == result.nfe * 5
    if solver == "rk4":
        assert result.nfe == 64


def test_ode_solver_error_shrinks_with_steps(gauss_case):
    model, x, exact = gauss_case
    errors = [(bl.ode_nll(model, x, solver="heun", n_steps=n, seed=0).nll - exact).abs().max().item() for n in (4, 16)]
    assert errors[1] < errors[0] / 4


def test_hutchinson_trace_is_unbiased(gauss_case):
    model, x, exact = gauss_case
    runs = torch.stack([bl.ode_nll(model, x, solver="rk4", n_steps=8, trace="hutchinson", seed=s).nll
                        for s in range(20)])
    many = bl.ode_nll(model, x, solver="rk4", n_steps=8, trace="hutchinson", n_probes=64, seed=99).nll
    within(runs.mean(0), exact, slack=2e-3)
    assert (many - exact).abs().mean() < (runs[0] - exact).abs().mean()


def test_continuous_vlb_is_exact_for_a_gaussian_with_its_own_reference(gauss_case):
    """err == err_g on the same noise: the bound is the closed-form Gaussian terms, tight at clip 10."""
    model, x, exact = gauss_case
    terms = bl.vlb_continuous(model, x, 16, seed=0)
    assert torch.allclose(terms.nll, exact, atol=1e-3)
    assert terms.calls_per_example == 16 and (terms.prior > 0).all()
    assert torch.allclose(terms.bpd, terms.nll / (4 * math.log(2)))


def test_discrete_vlb_approaches_exact_for_a_gaussian(gauss_case):
    model, x, exact = gauss_case
    abar = bl.logsnr_linear_alphas_cumprod(*model.logsnr_range(), 1000)
    # beta_1 at t = 1 is the calibrated decoder of continuous data; DDPM's fixed_large (beta_tilde_2
    # there, far below beta_1 on a fine schedule) is a valid but loose bound on a density
    terms = bl.vlb_discrete(model, x, abar, seed=0, variance="fixed_large_beta1")
    assert terms.calls_per_example == 1000
    assert abs((terms.nll - exact).mean().item()) < 0.3  # T = 1000: a gap of order 100 d / T nats
    peers = bl.vlb_discrete(model, x, abar, seed=0, variance="fixed_large")
    assert torch.equal(peers.diffusion, terms.diffusion) and (peers.decoder > terms.decoder).all()


# ----------------------------------------------------------------------------- closed forms
def test_flow_velocity_moves_a_point_along_its_noise():
    """For one data point the flow keeps eps fixed: dz/da = d/da (alpha x + sigma eps)."""
    x = torch.tensor([[0.7, -1.2]], dtype=torch.float64)
    eps = torch.tensor([[0.3, 0.9]], dtype=torch.float64)
    a = torch.tensor([0.4], dtype=torch.float64)
    h = 1e-5
    numeric = (add_noise(x, a + h, eps) - add_noise(x, a - h, eps)) / (2 * h)
    assert torch.allclose(bl.flow_velocity(add_noise(x, a, eps), eps, a), numeric, atol=1e-8)


def test_prior_kl_and_gaussian_decoder_closed_forms():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    a = -2.0
    alpha2, sigma2 = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(a))
    direct = 0.5 * (3 * (sigma2 - 1 - math.log(sigma2)) + alpha2 * (x * x).sum(1))
    assert torch.allclose(bl.prior_kl(x, a), direct)
    eps = torch.randn(20000, 3, generator=gen, dtype=torch.float64)
    z = add_noise(x[:1].expand(20000, 3), torch.full((20000,), 5.0, dtype=torch.float64), eps)
    alpha, _ = alpha_sigma(torch.tensor(5.0, dtype=torch.float64))
    mc = bl.gaussian_nll(x[:1].expand(20000, 3), z / alpha, torch.tensor(-5.0)).mean()
    assert mc.item() == pytest.approx(bl.gaussian_decoder_nll(5.0, 3), abs=0.05)


def test_discretized_gaussian_sums_to_one_and_matches_cdf_differences():
    grid = itd.DiscreteGrid(-1.0, 1.0, 9)
    values = grid.value(torch.arange(9, dtype=torch.float64)).reshape(9, 1)
    for mean, logvar in [(0.1, -3.0), (0.9, -9.0), (-3.0, 0.0), (0.0, -30.0)]:
        m, lv = torch.full_like(values, mean), torch.tensor(logvar, dtype=torch.float64)
        nll = bl.discretized_gaussian_nll(values, m, lv, grid)
        assert torch.isfinite(nll).all()
        assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-9)
    normal = torch.distributions.Normal(0.1, math.exp(-1.5))
    mid = torch.tensor([[0.0]], dtype=torch.float64)
    expected = -torch.log(normal.cdf(mid + grid.delta / 2) - normal.cdf(mid - grid.delta / 2))
    assert bl.discretized_gaussian_nll(mid, torch.full_like(mid, 0.1), torch.tensor(-3.0), grid).item() == \
        pytest.approx(expected.item(), rel=1e-6)
    far = bl.discretized_gaussian_nll(mid, torch.full_like(mid, 0.9), torch.tensor(-12.0), grid)
    assert 1e3 < far.item() < math.inf  # deep in the tail, still finite (no 1e-12 floor)


def test_discrete_schedule_follows_ddpm_conventions():
    abar = torch.tensor([0.99, 0.9, 0.6, 0.2], dtype=torch.float64)
    s = bl.DiscreteSchedule.from_alphas_cumprod(abar)
    assert torch.allclose(s.betas, torch.tensor([0.01, 1 - 0.9 / 0.99, 1 - 0.6 / 0.9, 1 - 0.2 / 0.6], dtype=torch.float64))
    assert s.posterior_variance[0] == 0 and s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
    assert torch.allclose(torch.sigmoid(s.logsnr), abar)
    idx = torch.arange(4)
    small, large = s.model_log_variance(idx, "fixed_small"), s.model_log_variance(idx, "fixed_large_beta1")
    assert torch.allclose(s.model_log_variance(idx, "learned", torch.zeros(4)), small)
    assert torch.allclose(s.model_log_variance(idx, "learned", torch.ones(4)), large)
    assert torch.allclose(large, s.betas.log())
    # fixed_large as DDPM's and IDDPM's code define it: log(append(posterior_variance[1], betas[1:]))
    peers = torch.log(torch.cat([s.posterior_variance[1:2], s.betas[1:]]))
    assert torch.allclose(s.model_log_variance(idx, "fixed_large"), peers)
    with pytest.raises(ValueError):
        bl.DiscreteSchedule.from_alphas_cumprod(torch.tensor([0.5, 0.7]))


# ----------------------------------------------------------------------------- Gaussian mixtures
@pytest.mark.parametrize("d, trace", [(2, "auto"), (16, "hutchinson")])
def test_ode_matches_mixture_log_density(d, trace, gen):
    mix, model = mixture_model(d, gen)
    x = mix.sample(100, gen)
    result = bl.ode_nll(model, x, solver="rk4", n_steps=24, trace=trace, generator=gen)
    within(result.nll, -mix.log_prob(x), slack=0.01)


@pytest.mark.parametrize("d", [2, 64])
def test_continuous_vlb_is_never_below_exact(d, gen):
    mix, model = mixture_model(d, gen)
    x = mix.sample(200, gen)
    exact = -mix.log_prob(x)
    terms = bl.vlb_continuous(model, x, 128, generator=gen)
    err = terms.nll - exact
    se = err.std().item() / math.sqrt(len(err))
    assert err.mean().item() > -3 * se
    assert err.mean().item() < 4 * se + 0.05  # and tight for the exact denoiser


def test_continuous_vlb_control_variate_keeps_the_expectation(gen):
    mix, model = mixture_model(2, gen, seed=3)
    x = mix.sample(300, gen)
    exact = -mix.log_prob(x)
    with_cv = bl.vlb_continuous(model, x, 64, generator=gen, clip=4).nll
    plain = bl.vlb_continuous(model, x, 64, generator=gen, clip=4, control_variate=False).nll
    within(plain, with_cv)
    # over the wide default range the plain estimator's weights explode where the error does not vanish
    wide_cv = bl.vlb_continuous(model, x, 64, generator=gen).nll
    wide_plain = bl.vlb_continuous(model, x, 64, generator=gen, control_variate=False).nll
    assert (wide_cv - exact).std() < (wide_plain - exact).std() / 3


def test_discrete_vlb_subsampled_steps_are_unbiased(gen):
    mix, model = mixture_model(2, gen, seed=5)
    x = mix.sample(200, gen)
    abar = bl.logsnr_linear_alphas_cumprod(*model.logsnr_range(), 200)
    full = bl.vlb_discrete(model, x, abar, generator=gen)
    part = bl.vlb_discrete(model, x, abar, generator=gen, n_calls=20)
    assert part.calls_per_example == 20 and full.calls_per_example == 200
    within(part.nll, full.nll)
    with pytest.raises(ValueError):
        bl.vlb_discrete(model, x, abar, generator=gen, n_calls=1)


def test_an_imperfect_denoiser_raises_every_estimate(gen):
    """Theory: E[nll] of a wrong model is a cross-entropy >= the entropy for all three methods."""
    mix, exact_model = mixture_model(8, gen, seed=8)
    bias = 0.3 * torch.ones(8, dtype=torch.float64)
    biased = itd.ITDiffusion(lambda z, a: mix(z, a) + bias, exact_model.spectrum)
    x = mix.sample(150, gen)
    exact = -mix.log_prob(x)
    abar = bl.logsnr_linear_alphas_cumprod(*biased.logsnr_range(), 300)
    estimates = {
        "it": biased.nll(x, 256, generator=gen),
        "vlb": bl.vlb_discrete(biased, x, abar, generator=gen).nll,
        "vlb-ct": bl.vlb_continuous(biased, x, 256, generator=gen).nll,
        "ode": bl.ode_nll(biased, x, solver="rk4", n_steps=16, trace="hutchinson", generator=gen).nll,
    }
    for name, nll in estimates.items():
        err = nll - exact
        se = err.std().item() / math.sqrt(len(err))
        assert err.mean().item() > 3 * se + 0.1, (name, err.mean().item(), se)


def test_results_do_not_depend_on_batch_size(gen):
    mix, model = mixture_model(3, gen, seed=9)
    x = mix.sample(5, gen)
    abar = bl.logsnr_linear_alphas_cumprod(*model.logsnr_range(), 50)
    whole = bl.vlb_discrete(model, x, abar, seed=3).nll
    assert torch.allclose(bl.vlb_discrete(model, x, abar, seed=3, batch_size=7).nll, whole, rtol=1e-12)
    assert torch.allclose(bl.vlb_discrete(model, x[:2], abar, seed=3).nll, whole[:2], rtol=1e-12)
    ct = bl.vlb_continuous(model, x, 16, seed=3).nll
    assert torch.allclose(bl.vlb_continuous(model, x[:2], 16, seed=3).nll, ct[:2], rtol=1e-12)
    ode = bl.ode_nll(model, x, solver="heun", n_steps=6, trace="hutchinson", seed=3).nll
    assert torch.allclose(bl.ode_nll(model, x[:2], solver="heun", n_steps=6, trace="hutchinson", seed=3).nll,
                          ode[:2], rtol=1e-10)


# ----------------------------------------------------------------------------- discrete data
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_discrete_vlb_bounds_finite_support_log_prob(variance, gen):
    grid, law = discrete_law()
    model = itd.ITDiffusion(law, itd.GaussianSpectrum.from_data(law.sample(5000, gen)))
    x = law.sample(200, gen)
    exact = -law.log_prob(x)
    abar = bl.logsnr_linear_alphas_cumprod(*model.logsnr_range(), 400)
    terms = bl.vlb_discrete(model, x, abar, generator=gen, variance=variance, discrete=grid, clamp=(-1.0, 1.0))
    err = terms.nll - exact
    assert err.mean().item() >= -3 * err.std().item() / math.sqrt(len(err))
    assert err.mean().item() < 1.0  # and not vacuous


def test_continuous_time_vlb_on_a_grid_bounds_log_prob(gen):
    grid, law = discrete_law(seed=1)
    model = itd.ITDiffusion(law, itd.GaussianSpectrum.from_data(law.sample(5000, gen)))
    x = law.sample(200, gen)
    exact = -law.log_prob(x)
    terms = bl.vlb_continuous(model, x, 128, generator=gen, discrete=grid)
    err = terms.nll - exact
    # rare large errors at high log-SNR make the estimator skewed: the sample se understates it
    assert err.mean().item() >= -4 * err.std().item() / math.sqrt(len(err))
    assert (terms.decoder >= 0).all() and terms.decoder.mean() < 1e-3  # the grid decoder is sharp at the top


def test_bad_arguments_raise(gauss_case):
    model, x, _ = gauss_case
    abar = bl.logsnr_linear_alphas_cumprod(-5.0, 5.0, 10)
    with pytest.raises(ValueError, match="variance"):
        bl.vlb_discrete(model, x, abar, seed=0, variance="medium")
    with pytest.raises(ValueError, match="solver"):
        bl.ode_nll(model, x, solver="rk45", seed=0)
    with pytest.raises(ValueError, match="trace"):
        bl.ode_nll(model, x, trace="approx", seed=0)
    with pytest.raises(ValueError):
        bl.logsnr_linear_alphas_cumprod(5.0, -5.0, 10)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_large_beta1", "fixed_small"])
def test_fixed_decoder_term_matches_the_gaussian_closed_form(variance):
    """The t = 1 term -log N(x; x_hat, var) with the exact denoiser of Gaussian data x ~ N(mu, s^2 I):
    x - x_hat ~ N(0, v) with v = s^2 sigma^2 / (alpha^2 s^2 + sigma^2) at step 1, so its mean is
    d/2 (log(2 pi var) + v / var), var = beta_tilde_2 (fixed_large, fixed_small) or beta_1."""
    d, s2 = 3, 0.7**2
    law = itd.GaussianMixture(torch.tensor([[0.4, -1.0, 0.2]], dtype=torch.float64), torch.tensor([0.7]),
                              torch.tensor([1.0]))
    x = law.sample(4000, torch.Generator().manual_seed(0))
    abar = bl.logsnr_linear_alphas_cumprod(-4.0, 5.0, 100)  # fine steps: beta_tilde_2 far below beta_1
    sched = bl.DiscreteSchedule.from_alphas_cumprod(abar)
    terms = bl.vlb_discrete(law, x, abar, seed=1, variance=variance, n_calls=2)  # the decoder and one KL step
    alpha2, sigma2 = abar[0].item(), 1.0 - abar[0].item()
    v = s2 * sigma2 / (alpha2 * s2 + sigma2)
    var = sched.betas[0].item() if variance == "fixed_large_beta1" else sched.posterior_variance[1].item()
    want = 0.5 * d * (math.log(2 * math.pi * var) + v / var)
    se = terms.decoder.std().item() / math.sqrt(len(x))
    assert abs(terms.decoder.mean().item() - want) < 4 * se
    other = sched.posterior_variance[1].item() if variance == "fixed_large_beta1" else sched.betas[0].item()
    assert abs(0.5 * d * (math.log(2 * math.pi * other) + v / other) - want) > 20 * se  # the test tells them apart
