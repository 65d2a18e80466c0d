"""The fitted estimator (issue 13): piecewise proposal, rounding choice, ``ITDiffusion.tune``,
and the exact denoisers it is checked with (full-covariance mixtures, product laws on a grid)."""

import math

import pytest
import torch

import itdiffusion as itd
from itdiffusion.core.adaptive import (PiecewiseProposal, PilotValues, RoundingMap, cell_masses, candidates, choose_proposal,
                                       choose_rounding, predicted_variance, stratified_variance)
from itdiffusion.core.analytic import FullGaussianMixture, ProductDiscrete
from itdiffusion.core.errors import Errors
from itdiffusion.core.proposal import LogisticProposal, fractions, quadrature


def _proposal(seed=0, k=12):
    gen = torch.Generator().manual_seed(seed)
    edges = torch.cumsum(torch.rand(k + 1, generator=gen, dtype=torch.float64) + 0.1, 0) - 3.0
    return PiecewiseProposal(edges.tolist(), (torch.rand(k, generator=gen, dtype=torch.float64) + 0.05).tolist())


# ============================================================================ the proposal
def test_weights_are_exactly_the_inverse_density():
    prop = _proposal()
    a, inv = prop.quantile(torch.rand(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert ((a >= prop.lo) & (a <= prop.hi)).all()
    torch.testing.assert_close(inv, prop.inverse_density(a), rtol=1e-12, atol=0)
    edges = torch.tensor(prop.edges, dtype=torch.float64)
    mass = (prop.density(0.5 * (edges[1:] + edges[:-1])) * (edges[1:] - edges[:-1])).sum()
    assert abs(mass.item() - 1.0) < 1e-12


def test_midpoint_rule_is_exact_for_linear_functions_when_cells_hold_whole_strata():
    n, k = 40, 8
    counts = torch.tensor([1, 3, 7, 2, 9, 5, 8, 5], dtype=torch.float64)  # strata per cell, sum 40
    edges = [-4.0, -3.1, -1.0, 0.0, 0.5, 2.0, 2.2, 5.0, 6.0]
    prop = PiecewiseProposal(edges, (counts / n).tolist())
    quad = quadrature(prop, n, "midpoint")
    f = lambda a: 3.0 * a - 2.0  # noqa: E731
    exact = 1.5 * (6.0**2 - 4.0**2) - 2.0 * 10.0
    assert abs(quad.integrate(f(quad.logsnr)[None]).item() - exact) < 1e-10
    assert k == len(prop.masses)


def test_weights_integrate_a_known_function_without_bias():
    prop = _proposal(2)
    exact = math.log1p(math.exp(prop.hi)) - math.log1p(math.exp(prop.lo))  # Int sigmoid
    quad = quadrature(prop, 2**16, "midpoint")
    # a stratum straddling a cell edge makes the deterministic rule O(cells / n) off
    assert abs(quad.integrate(torch.sigmoid(quad.logsnr)[None]).item() - exact) < 12 * 8 / 2**16
    draws = torch.rand(400, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for placement in ("iid", "stratified"):
        q = quadrature(prop, 16, placement, draws)
        est = q.integrate(torch.sigmoid(q.logsnr))
        assert abs(est.mean().item() - exact) < 4 * est.std().item() / 20 + 1e-12, placement


def _noise_pilot(std, base, n_examples, k, seed):
    """Pilot values (two groups of four calls at ``k`` stratified points per example) of a
    curve-free integrand: independent noise of standard deviation ``std(a)`` at every call."""
    gen = torch.Generator().manual_seed(seed)
    frac = fractions(k, "stratified", torch.rand(n_examples, k, generator=gen, dtype=torch.float64))
    a, _ = base.quantile(frac)
    f = std(a)[..., None, None] * torch.randn(n_examples, k, 2, 4, generator=gen, dtype=torch.float64)
    return PilotValues.from_calls(a, f)


def test_fit_on_a_gaussian_recovers_a_near_optimal_proposal():
    # the noise of a Gaussian's own error, sum_i mmse_i(a) (chi2_1 - 1): variance 2 sum_i mmse_i^2
    log_eigs = torch.linspace(-9.0, 0.0, 16, dtype=torch.float64)
    base = LogisticProposal(4.5, 2.0, 6.0)
    var = lambda a: 2 * (torch.sigmoid(a[..., None] + log_eigs) ** 2).sum(-1)  # noqa: E731
    pilot = _noise_pilot(lambda a: var(a).sqrt(), base, 64, 32, 0)
    edges = torch.linspace(base.lo, base.hi, 257, dtype=torch.float64)
    centres, width = 0.5 * (edges[1:] + edges[:-1]), edges[1:] - edges[:-1]
    optimum = ((var(centres).sqrt() * width).sum() ** 2).item()  # Int v / q at q ~ sqrt(v), one point
    default = PiecewiseProposal(edges.tolist(), cell_masses(base, edges).tolist())
    fitted = candidates(base, pilot, "points", edges, (base.hi - base.lo) / 20)[0.05]
    got, was = predicted_variance(fitted, centres, var(centres), 1), predicted_variance(default, centres, var(centres), 1)
    assert got < 1.1 * optimum < was
    proposal, antithetic, info = choose_proposal(base, pilot, 128, True, generator=torch.Generator().manual_seed(1))
    assert proposal is not None and info["mix"] < 1.0


def test_default_kept_when_it_is_already_the_noise_optimal_proposal():
    # noise ~ q0 (the default's density): sqrt(v) ~ q0, so no fit predicts a gain
    base = LogisticProposal(0.0, 1.5, 8.0)
    pilot = _noise_pilot(lambda a: 1.0 / base.inverse_density(a), base, 64, 16, 2)
    proposal, antithetic, info = choose_proposal(base, pilot, 64, True, generator=torch.Generator().manual_seed(3))
    assert proposal is None and antithetic and info["mix"] == 1.0


def test_predicted_stratified_variance_matches_the_closed_form():
    # f(a) = h(a) + noise: stratified variance 1/n Int v/q + 1/(12 n^3) Int h'^2 / q^3 (large n)
    base = LogisticProposal(0.0, 1.0, 4.0)
    edges = torch.linspace(base.lo, base.hi, 257, dtype=torch.float64)
    centres = 0.5 * (edges[1:] + edges[:-1])
    prop = PiecewiseProposal(edges.tolist(), cell_masses(base, edges).tolist())
    n, v = 64, torch.full_like(centres, 0.3)
    slope = torch.sigmoid(centres) ** 2 * torch.sigmoid(-centres) ** 2  # h = sigmoid: h'^2
    pred = stratified_variance(prop, centres, v, slope, n)
    gen = torch.Generator().manual_seed(4)
    draws = torch.rand(20000, n, generator=gen, dtype=torch.float64)
    quad = quadrature(prop, n, "stratified", draws)
    f = torch.sigmoid(quad.logsnr) + 0.3**0.5 * torch.randn(quad.logsnr.shape, generator=gen, dtype=torch.float64)
    est = quad.integrate(f)
    assert abs(est.var().item() / pred - 1) < 0.05


# ============================================================================ the rounding choice
def test_rounding_choice_takes_a_rounding_only_where_it_is_lower():
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(6000, generator=gen, dtype=torch.float64) * 20 - 10
    raw = 1.0 + torch.rand(6000, generator=gen, dtype=torch.float64)
    hard = torch.where(a > 2.0, raw - 0.5, raw + 0.5)
    soft = torch.where(a < -5.0, raw - 0.2, raw + 0.1)
    rmap = choose_rounding(a, Errors(raw=raw, gauss=raw, hard=hard, soft=soft), -10.0, 10.0, n_regions=20)
    codes = {c: [e for e, choice in zip(rmap.edges, rmap.choices) if choice == c] for c in ("none", "hard", "soft")}
    assert min(codes["hard"]) >= 2.0 and max(codes["soft"]) < -5.0 and codes["none"]
    same = choose_rounding(a, Errors(raw=raw, gauss=raw, hard=raw + 1e-3, soft=raw), -10.0, 10.0)
    assert set(same.choices) == {"none"}  # equal errors: no rounding


def test_rounding_map_selects_per_point():
    rmap = RoundingMap((-1.0, 0.0, 1.0, 2.0), ("hard", "none", "soft"))
    errs = Errors(raw=torch.zeros(1, 4), gauss=torch.zeros(1, 4), hard=torch.ones(1, 4), soft=2 * torch.ones(1, 4))
    got = rmap.select(errs, torch.tensor([-5.0, 0.5, 1.5, 9.0], dtype=torch.float64))
    assert got.tolist() == [[1.0, 0.0, 2.0, 2.0]] and rmap.needed == ("hard", "soft")


# ============================================================================ exact denoisers
def test_full_covariance_mixture_of_one_component_is_the_gaussian():
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    cov = q @ torch.diag(torch.logspace(-3, 0, 5, dtype=torch.float64)) @ q.T
    mean = torch.randn(1, 5, generator=gen, dtype=torch.float64)
    law = FullGaussianMixture(mean, cov[None])
    x, z = law.sample(7, gen), torch.randn(7, 5, generator=gen, dtype=torch.float64)
    a = torch.linspace(-4, 6, 7, dtype=torch.float64)
    eigvecs = torch.linalg.eigh(cov).eigenvectors
    spec = itd.GaussianSpectrum(mean[0], eigvecs, torch.linalg.eigvalsh(cov).log(), (5,))
    torch.testing.assert_close(law(z, a), spec(z, a), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(law.log_prob(x), spec.log_prob(x), rtol=1e-10, atol=1e-10)


def test_product_law_matches_the_enumerated_law():
    grid = itd.DiscreteGrid(-1.0, 1.0, 3)
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=torch.float64)
    law = ProductDiscrete(grid, probs)
    support = torch.cartesian_prod(law.values, law.values)
    joint = probs[0][grid.round_index(support[:, 0]).long()] * probs[1][grid.round_index(support[:, 1]).long()]
    full = itd.FiniteDiscrete(support, joint)
    gen = torch.Generator().manual_seed(6)
    z, a = torch.randn(9, 2, generator=gen, dtype=torch.float64), torch.linspace(-3, 5, 9, dtype=torch.float64)
    torch.testing.assert_close(law(z, a), full(z, a), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(law.log_prob(support), full.log_prob(support), rtol=1e-12, atol=1e-12)


# ============================================================================ tune
def _covariance_mixture(d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    covs = []
    for _ in range(3):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        covs.append(q @ torch.diag(torch.logspace(-4, 0, d, dtype=torch.float64)) @ q.T)
    means = 0.5 * torch.randn(3, d, generator=gen, dtype=torch.float64)
    law = FullGaussianMixture(means, torch.stack(covs), torch.tensor([0.8, 0.15, 0.05]))
    return law, itd.ITDiffusion(law, itd.GaussianSpectrum.from_data(law.sample(8000, gen))), gen


class _Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, z, logsnr):
        self.calls += len(z)
        return self.inner(z, logsnr)


def test_tune_spends_its_budget_lowers_the_error_and_round_trips():
    law, model, gen = _covariance_mixture()
    x, pilot = law.sample(80, gen), law.sample(32, gen)
    exact = -law.log_prob(x)
    before = model.nll(x, 32, seed=1)
    counting = _Counting(law)
    tuned = itd.ITDiffusion(counting, model.spectrum)
    assert tuned.tune(pilot, 1000, generator=torch.Generator().manual_seed(2), calls_per_example=32) is tuned
    assert counting.calls <= 1000 and tuned.tuning.pilot["calls"] == counting.calls
    after = tuned.nll(x, 32, seed=1)
    rmse = lambda v: (v - exact).pow(2).mean().sqrt().item()  # noqa: E731
    assert rmse(after) < rmse(before)
    torch.testing.assert_close(tuned.nll(x, 32, seed=1, tuned=False), before, rtol=1e-12, atol=1e-12)
    again = itd.ITDiffusion(_Counting(law), model.spectrum)
    again.load_state_dict(tuned.state_dict())
    assert again.tuning.to_dict() == tuned.tuning.to_dict()
    torch.testing.assert_close(again.nll(x, 32, seed=1), after, rtol=0, atol=0)
    old = {k: v for k, v in itd.ITDiffusion(_Counting(law), model.spectrum).state_dict().items()
           if not k.startswith("tuned_")}
    again.load_state_dict(old)  # a checkpoint from before tuning existed: untuned
    assert again.tuning is None
    torch.testing.assert_close(again.nll(x, 32, seed=1), before, rtol=0, atol=0)


def test_exact_denoiser_on_a_grid_keeps_the_raw_error_and_is_unbiased():
    grid = itd.DiscreteGrid(-1.0, 1.0, 9)
    law = ProductDiscrete(grid, torch.exp(-torch.arange(9.0) / 2.0), d=8)
    gen = torch.Generator().manual_seed(7)
    model = itd.ITDiffusion(law, itd.GaussianSpectrum.from_data(law.sample(4000, gen)))
    with pytest.raises(ValueError, match="auto"):
        model.nll(law.sample(2, gen), 16, seed=0, discrete=grid, rounding="auto")
    model.tune(law.sample(48, gen), 48 * 64, generator=torch.Generator().manual_seed(8), discrete=grid,
               calls_per_example=64)
    rmap = model.tuning.rounding
    lows = [e for e, c in zip(rmap.edges, rmap.choices) if c != "none"]
    assert not lows or min(lows) > model.loc  # rounding only at high log-SNR, where the raw error vanishes
    x = law.sample(150, gen)
    err = model.nll(x, 64, seed=3, discrete=grid) + law.log_prob(x)
    hard = model.nll(x, 64, seed=3, discrete=grid, rounding="hard", tuned=False) + law.log_prob(x)
    assert abs(err.mean().item()) < 4 * err.std().item() / math.sqrt(len(x)) + 0.005 * 8 * math.log(2)
    assert hard.mean().item() > 10 * err.std().item() / math.sqrt(len(x))  # hard rounding: loose
    assert fractions(4, "midpoint").tolist() == [0.125, 0.375, 0.625, 0.875]


# ============================================================================ evaluate
def test_evaluate_tunes_on_the_pilot_reports_it_and_resume_refuses_another_fit(tmp_path):
    grid = itd.DiscreteGrid(-1.0, 1.0, 9)
    law = ProductDiscrete(grid, torch.exp(-torch.arange(9.0) / 2.0), d=6)
    gen = torch.Generator().manual_seed(9)
    spec = itd.GaussianSpectrum.from_data(law.sample(3000, gen))
    x, pilot = law.sample(40, gen), law.sample(16, gen)
    plain = itd.evaluate(itd.ITDiffusion(law, spec), [x], n_points=32, discrete=grid, seed=2)
    assert plain.config["tuning"] is None and plain.config["pilot"] is None
    model = itd.ITDiffusion(law, spec)
    res = itd.evaluate(model, [x[:20], x[20:]], n_points=32, discrete=grid, seed=2, pilot=pilot, pilot_calls=512,
                       checkpoint=tmp_path / "run")
    assert res.config["pilot"]["calls"] <= 512 and res.config["rounding"] == "auto"
    assert res.config["tuning"] == model.tuning.identity()
    assert {"mmse_auto", "mmse_hard", "mmse_soft"} <= set(res.curves)
    truth = -law.log_prob(x).mean().item()
    assert abs(res.estimates["discrete"].nats - truth) < 4 * res.estimates["discrete"].se_nats + 0.05
    assert plain.estimates["discrete"].nats > res.estimates["discrete"].nats  # hard rounding is looser
    other = itd.ITDiffusion(law, spec).tune(pilot, 256, generator=torch.Generator().manual_seed(1), discrete=grid)
    with pytest.raises(ValueError, match="other settings"):
        itd.evaluate(other, [x], n_points=32, discrete=grid, seed=2, checkpoint=tmp_path / "run")
    with pytest.raises(ValueError, match="pilot"):
        itd.evaluate(itd.ITDiffusion(law, spec), [x], n_points=32, discrete=grid, tune=True)
