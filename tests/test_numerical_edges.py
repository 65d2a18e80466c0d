"""Numerical edges: the core stays finite and within its mathematical bounds everywhere.

Property-based (hypothesis) over log-SNR in [-40, 40], clips up to 12, float32 and
float64, and data at and beyond the edges of discrete grids.  A denoiser that fails at
one log-SNR must be reported with that log-SNR, never averaged into an estimate.
"""

import decimal
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import itdiffusion as itd
from itdiffusion.core.channel import add_noise, alpha_sigma, eps_from_x, x_from_eps
from itdiffusion.core.grid import soft_round_index_dense
from itdiffusion.core.noise import CallLayout, chi2_antithetic

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = st.sampled_from([torch.float32, torch.float64])
LOGSNR = st.floats(-40.0, 40.0, allow_nan=False)
CLIP = st.floats(0.01, 12.0)
SCALE = st.floats(0.1, 10.0).filter(lambda s: s > 0.1)
LOC = st.floats(-1e4, 1e4, allow_nan=False)


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def logsnr_tensors(min_size=1, max_size=6):
    return st.lists(LOGSNR, min_size=min_size, max_size=max_size).map(lambda v: torch.tensor(v, dtype=torch.float64))


# --------------------------------------------------------------------------- #
# Integration over log-SNR
# --------------------------------------------------------------------------- #


@FAST
@given(loc=LOC, scale=SCALE, clip=CLIP, n=st.integers(1, 8), mode=st.sampled_from(["iid", "stratified", "midpoint"]),
       dtype=DTYPES, seed=st.integers(0, 2**31))
def test_logistic_points_and_weights_stay_in_range(loc, scale, clip, n, mode, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    logsnr, weights = itd.logistic_points(n, loc, scale, clip, placement=mode, batch_shape=(3,), generator=gen, dtype=dtype)
    assert logsnr.shape == weights.shape == (3, n) and logsnr.dtype == weights.dtype == dtype
    assert torch.isfinite(logsnr).all() and torch.isfinite(weights).all()
    # Points inside the truncated support (up to the rounding of the dtype).
    slack = 4 * ulp(dtype) * (abs(loc) + clip * scale)
    a = logsnr.double()
    assert (a >= loc - clip * scale - slack).all() and (a <= loc + clip * scale + slack).all()
    # Weights are the inverse truncated density over n: between its value at the centre
    # (4 scale tanh(clip/2)) and at the ends (scale tanh(clip/2) (2 + 2 cosh clip)).
    mass = scale * math.tanh(clip / 2.0) / n
    w = weights.double()
    rel = 1e-4 if dtype == torch.float32 else 1e-9
    assert (w > 0).all()
    assert (w >= 4.0 * mass * (1 - rel)).all()
    assert (w <= mass * (2.0 + 2.0 * math.cosh(clip)) * (1 + rel)).all()
    if mode != "iid":
        assert (a.diff(dim=-1) >= 0).all()


@FAST
@given(loc=LOC, scale=SCALE, clip=CLIP, fracs=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=6), dtype=DTYPES)
def test_logistic_weights_finite_and_positive_on_the_support(loc, scale, clip, fracs, dtype):
    # anywhere in loc +- clip * scale, its ends included
    logsnr = (loc + clip * scale * torch.tensor(fracs + [-1.0, 1.0], dtype=torch.float64)).to(dtype)
    w = itd.logistic_weights(logsnr, loc, scale, clip)
    assert torch.isfinite(w).all() and (w > 0).all()
    # symmetric about loc, smallest there
    assert torch.allclose(itd.logistic_weights(torch.tensor([loc - 1.0, loc + 1.0], dtype=torch.float64), loc, scale, clip).diff(),
                          torch.zeros(1, dtype=torch.float64), atol=1e-6 * scale)
    assert (w.double() >= 4.0 * scale * math.tanh(clip / 2) * (1 - 1e-4)).all()


# --------------------------------------------------------------------------- #
# The channel
# --------------------------------------------------------------------------- #


@FAST
@given(logsnr=logsnr_tensors(), dtype=DTYPES)
def test_alpha_sigma_on_the_unit_circle(logsnr, dtype):
    a = logsnr.to(dtype)
    alpha, sigma = alpha_sigma(a)
    assert alpha.dtype == sigma.dtype == dtype
    assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all()
    assert (alpha > 0).all() and (sigma > 0).all() and (alpha <= 1).all() and (sigma <= 1).all()
    assert torch.allclose((alpha**2 + sigma**2).double(), torch.ones(len(a), dtype=torch.float64), atol=4 * ulp(dtype))
    # alpha^2 / sigma^2 = e^a, checked in logs (no overflow)
    log_ratio = 2.0 * (alpha.double().log() - sigma.double().log())
    assert torch.allclose(log_ratio, a.double(), rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-5)


@FAST
@given(logsnr=st.lists(st.floats(-10.0, 10.0), min_size=1, max_size=4), dtype=DTYPES, seed=st.integers(0, 2**31))
def test_channel_round_trip_where_well_conditioned(logsnr, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.tensor(logsnr, dtype=dtype)
    x = (torch.rand(len(a), 5, generator=gen, dtype=torch.float64) * 4 - 2).to(dtype)
    eps = torch.randn(len(a), 5, generator=gen, dtype=torch.float64).to(dtype)
    z = add_noise(x, a, eps)
    assert torch.isfinite(z).all()
    # Undoing the channel amplifies rounding of z by 1/alpha (for x) or 1/sigma (for eps).
    amp = (1.0 + torch.exp(0.5 * a.double().abs())).reshape(-1, 1)
    tol = 16 * ulp(dtype) * amp * (1.0 + x.double().abs() + eps.double().abs())
    assert ((x_from_eps(z, eps, a).double() - x.double()).abs() <= tol).all()
    assert ((eps_from_x(z, x, a).double() - eps.double()).abs() <= tol).all()


@FAST
@given(logsnr=logsnr_tensors(), dtype=DTYPES, big=st.floats(1.0, 1e3))
def test_channel_extremes_stay_finite(logsnr, dtype, big):
    a = logsnr.to(dtype)
    x = torch.full((len(a), 3), big, dtype=dtype)
    eps = torch.full((len(a), 3), -big, dtype=dtype)
    z = add_noise(x, a, eps)
    assert torch.isfinite(z).all()
    assert (z.abs() <= big * math.sqrt(2) * (1 + 1e-5)).all()  # |alpha x + sigma eps| <= sqrt(2) * big
    # at the extremes, x_hat and eps_hat may grow like e^(|a|/2) ~ 5e8, never to Inf
    assert torch.isfinite(x_from_eps(z, eps, a)).all() and torch.isfinite(eps_from_x(z, x, a)).all()


# --------------------------------------------------------------------------- #
# Discrete grids: rounding, soft rounding, tail bound
# --------------------------------------------------------------------------- #

GRIDS = st.builds(
    lambda lo, width, levels: itd.DiscreteGrid(lo, lo + width, levels),
    st.floats(-10.0, 10.0), st.floats(0.01, 20.0), st.integers(2, 300),
)


def edge_values(grid: itd.DiscreteGrid) -> list[float]:
    """The grid's ends, just beyond them, far beyond them, and one interior value."""
    lo, hi, delta = grid.lo, grid.hi, grid.delta
    return [lo, hi, lo - 0.49 * delta, hi + 0.49 * delta, lo - 0.51 * delta, hi + 0.51 * delta,
            lo - 1e6, hi + 1e6, -1e30, 1e30, -math.inf, math.inf, 0.5 * (lo + hi)]


@FAST
@given(grid=GRIDS, dtype=DTYPES, extra=st.lists(st.floats(-1e4, 1e4), max_size=5))
def test_round_stays_on_the_grid(grid, dtype, extra):
    x = torch.tensor(edge_values(grid) + extra, dtype=dtype)
    k = grid.round_index(x)
    assert torch.isfinite(k).all() and (k >= 0).all() and (k <= grid.levels - 1).all()
    assert torch.equal(k, k.round())
    v = grid.round(x).double()
    slack = 4 * ulp(dtype) * max(abs(grid.lo), abs(grid.hi))
    assert (v >= grid.lo - slack).all() and (v <= grid.hi + slack).all()
    # the ends (and anything beyond them) round to the ends
    assert k[0] == 0 and k[1] == grid.levels - 1
    assert (k[[2, 4, 6, 8, 10]] == 0).all() and (k[[3, 5, 7, 9, 11]] == grid.levels - 1).all()
    assert abs(v[0].item() - grid.lo) <= slack and abs(v[1].item() - grid.hi) <= slack


@FAST
@given(grid=GRIDS, dtype=DTYPES, logsnr=logsnr_tensors(2, 2), seed=st.integers(0, 2**31))
def test_soft_round_index_bounded_and_matches_dense(grid, dtype, logsnr, seed):
    gen = torch.Generator().manual_seed(seed)
    edges = torch.tensor([v for v in edge_values(grid) if math.isfinite(v) and abs(v) < 1e7], dtype=torch.float64)
    inside = grid.lo + (grid.hi - grid.lo) * (torch.rand(len(edges), generator=gen, dtype=torch.float64) * 1.2 - 0.1)
    x_hat = torch.stack([edges, inside]).to(dtype)  # (2, n): one row per log-SNR
    k = grid.soft_round_index(x_hat, logsnr)
    assert k.dtype == torch.float64 and k.shape == x_hat.shape
    assert torch.isfinite(k).all() and (k >= 0).all() and (k <= grid.levels - 1).all()
    dense = soft_round_index_dense(grid, x_hat, logsnr)
    # 1e-6, except where the dense reference itself is ill-conditioned: there its logits
    # c (t - j)^2 carry rounding errors ~ eps c (t - j)^2 (c = e^a delta^2 / 2, huge at high
    # log-SNR), which move the mean by up to that times the posterior spread.
    t = grid.index(x_hat.double())
    c = (0.5 * torch.exp(logsnr) * grid.delta**2).reshape(-1, 1)
    levels = torch.arange(grid.levels, dtype=torch.float64).reshape(-1, 1, 1)
    p = torch.softmax(-c * (t - levels) ** 2, dim=0)
    spread = (p * (levels - dense) ** 2).sum(0).sqrt()
    reach = (t.abs() + grid.levels) ** 2
    tol = 1e-6 + 16 * ulp(torch.float64) * c * reach * spread
    assert ((k - dense).abs() <= tol).all(), (k - dense).abs().max()
    soft = grid.soft_round(x_hat, logsnr)
    slack = 4 * ulp(dtype) * max(abs(grid.lo), abs(grid.hi))
    assert soft.dtype == dtype and (soft.double() >= grid.lo - slack).all() and (soft.double() <= grid.hi + slack).all()


def _exact_soft_round_index(grid: itd.DiscreteGrid, t: float, logsnr: float) -> float:
    """Posterior-mean index in 50-digit decimal arithmetic."""
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        t, c = decimal.Decimal(t), decimal.Decimal(logsnr).exp() * decimal.Decimal(grid.delta) ** 2 / 2
        logits = [-(t - j) ** 2 * c for j in range(grid.levels)]
        top = max(logits)
        w = [(v - top).exp() if v - top > -300 else decimal.Decimal(0) for v in logits]
        return float(sum(j * wj for j, wj in enumerate(w)) / sum(w))


@pytest.mark.parametrize("logsnr", [-40.0, 0.0, 12.0, 20.0, 30.0, 40.0])
@pytest.mark.parametrize("levels", [2, 256])
def test_soft_round_index_exact_at_midpoints_and_edges(levels, logsnr):
    """Halfway between two levels the posterior mean is ill-conditioned; it must still be right."""
    grid = itd.DiscreteGrid(-1.0, 1.0, levels)
    x = torch.tensor([[-1.0, 1.0, 0.0, grid.value(torch.tensor(0.5)).item(), 0.3, -1.5, 1.5]], dtype=torch.float64)
    k = grid.soft_round_index(x, torch.tensor([logsnr], dtype=torch.float64))
    t = grid.index(x)
    exact = torch.tensor([[_exact_soft_round_index(grid, v, logsnr) for v in t[0].tolist()]], dtype=torch.float64)
    assert torch.allclose(k, exact, rtol=0, atol=1e-9), (k - exact).abs().max()


@FAST
@given(grid=GRIDS, d=st.integers(1, 4096), a1=LOGSNR, a2=LOGSNR)
def test_right_tail_bound_finite_non_negative_decreasing(grid, d, a1, a2):
    lo_a, hi_a = min(a1, a2), max(a1, a2)
    b = itd.right_tail_bound(torch.tensor([lo_a, hi_a]), grid, d)
    assert b.dtype == torch.float64 and torch.isfinite(b).all() and (b >= 0).all()
    assert b[1] <= b[0] * (1 + 1e-12)
    # its integrand is largest at t = 0, where the bracket is 1/2: a bound for every a_hi
    cap = d * sum(1.0 / (j - 0.5) for j in range(1, grid.levels))
    assert b[0] <= cap * (1 + 1e-12)
    assert itd.right_tail_bound(hi_a, grid, d).shape == ()


def test_right_tail_bound_vanishes_at_high_logsnr():
    grid = itd.DiscreteGrid(-1.0, 1.0, 256)
    assert itd.right_tail_bound(40.0, grid, 3072).item() == 0.0
    assert itd.right_tail_bound(-40.0, grid, 3072).item() > 0.0


# --------------------------------------------------------------------------- #
# The Gaussian reference
# --------------------------------------------------------------------------- #

SPECTRA = st.lists(st.floats(-20.0, 20.0), min_size=1, max_size=6).map(
    lambda logs: itd.GaussianSpectrum(
        mean=torch.linspace(-0.5, 0.5, len(logs), dtype=torch.float64),
        eigvecs=None,
        log_eigs=torch.tensor(logs, dtype=torch.float64),
        shape=(len(logs),),
    )
)


@FAST
@given(spec=SPECTRA, a1=LOGSNR, a2=LOGSNR)
def test_gaussian_mmse_between_zero_and_d_and_increasing(spec, a1, a2):
    a = torch.tensor([min(a1, a2), max(a1, a2)], dtype=torch.float64)
    m = spec.mmse(a)
    assert torch.isfinite(m).all() and (m >= 0).all() and (m <= spec.d).all()
    assert m[1] >= m[0]


@FAST
@given(spec=SPECTRA, a1=LOGSNR, a2=LOGSNR, offset=st.floats(-1e3, 1e3), at_mean=st.booleans())
def test_error_integral_finite_non_negative_increasing(spec, a1, a2, offset, at_mean):
    x = spec.mean.reshape(1, -1) + (0.0 if at_mean else offset)
    lo_a, hi_a = min(a1, a2), max(a1, a2)
    lo, hi = spec.error_integral(x, lo_a), spec.error_integral(x, hi_a)
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    assert (lo >= 0).all() and (hi >= 0).all()
    assert (hi >= lo * (1 - 1e-12)).all()


def test_error_integral_far_left_is_tiny_but_not_negative():
    # Cancellation between softplus and sigmoid used to give -1e-31 here.
    spec = itd.GaussianSpectrum.isotropic((4,))
    a = torch.linspace(-40.0, -30.0, 201, dtype=torch.float64)
    values = torch.stack([spec.error_integral(spec.mean.reshape(1, -1), v.item())[0] for v in a])
    assert (values > 0).all() and (values.diff() > 0).all()
    # Int_{-inf}^A sigmoid(a)^2 da ~ e^(2A) / 2 per coordinate
    assert torch.allclose(values, 4 * 0.5 * torch.exp(2 * a), rtol=1e-9)


@FAST
@given(spec=SPECTRA, dtype=DTYPES, logsnr=logsnr_tensors(3, 3), big=st.floats(0.0, 1e3))
def test_gaussian_log_prob_and_denoiser_finite(spec, dtype, logsnr, big):
    x = (spec.mean.reshape(1, -1) + torch.tensor([[0.0], [big], [-big]], dtype=torch.float64)).to(dtype)
    lp = spec.log_prob(x)
    assert lp.dtype == torch.float64 and torch.isfinite(lp).all()
    assert (lp <= -spec.entropy() + 0.5 * spec.d + 1e-9).all()  # the density peaks at the mean
    eps = torch.ones_like(x)
    z = add_noise(x, logsnr.to(dtype), eps)
    eps_hat = spec.denoise(z, logsnr)
    assert eps_hat.dtype == dtype and torch.isfinite(eps_hat).all()


# --------------------------------------------------------------------------- #
# Antithetic chi-square radii
# --------------------------------------------------------------------------- #


def _tails(r2: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.tensor(0.5 * d, dtype=torch.float64)
    return torch.special.gammainc(a, 0.5 * r2), torch.special.gammaincc(a, 0.5 * r2)


def _radius_range(d: int, p: float = 1e-100) -> tuple[float, float]:
    """log(r2) where the lower and the upper tail probabilities equal ``p`` (bisection)."""
    ends = []
    for which in (0, 1):
        lo, hi = -700.0, 20.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            tail = _tails(torch.tensor(math.exp(mid), dtype=torch.float64), d)[which].item()
            below = tail < p if which == 0 else tail > p
            lo, hi = (mid, hi) if below else (lo, mid)
        ends.append(0.5 * (lo + hi))
    return ends[0], ends[1]


RANGES = {d: _radius_range(d) for d in (1, 2, 3, 64, 3072)}


@FAST
@given(d=st.sampled_from(sorted(RANGES)), fracs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8))
def test_chi2_antithetic_finite_and_an_involution(d, fracs):
    lo, hi = RANGES[d]
    r2 = torch.exp(lo + (hi - lo) * torch.tensor(fracs, dtype=torch.float64))
    mirrored = chi2_antithetic(r2, d)
    assert torch.isfinite(mirrored).all() and (mirrored > 0).all()
    back = chi2_antithetic(mirrored, d)
    assert torch.allclose(back, r2, rtol=1e-9, atol=0), ((back - r2) / r2).abs().max()
    # the mirror's upper tail is the radius's lower tail (and vice versa)
    lower, upper = _tails(r2, d)
    m_lower, m_upper = _tails(mirrored, d)
    small = lower < 0.5
    assert torch.allclose(torch.where(small, m_upper, m_lower), torch.where(small, lower, upper), rtol=1e-9, atol=0)


@pytest.mark.parametrize("d", [1, 2, 3, 64, 3072])
def test_chi2_antithetic_median_and_far_tails(d):
    median = torch.tensor([math.exp(_radius_range(d, 0.5)[0])], dtype=torch.float64)
    assert torch.allclose(chi2_antithetic(median, d), median, rtol=1e-9)
    far = torch.tensor([0.0, 1e-300, 1e-30, 1e5 + 10.0 * d], dtype=torch.float64)
    out = chi2_antithetic(far, d)
    assert torch.isfinite(out).all() and (out >= 0).all()


@pytest.mark.parametrize("d", [1, 2, 3])
def test_antithetic_calls_survive_a_zero_noise_draw(d):
    eps = torch.zeros(1, 2, d)
    eps[0, 1] = 0.3
    noise = CallLayout(8, antithetic=True).call_noise(eps)
    assert torch.isfinite(noise).all()
    assert torch.equal(noise[0, :4], torch.zeros(4, d))  # nothing to mirror


# --------------------------------------------------------------------------- #
# The model at the edges of a discrete grid
# --------------------------------------------------------------------------- #


def grid_model(levels: int, clip: float, d: int = 4) -> tuple[itd.ITDiffusion, itd.DiscreteGrid]:
    grid = itd.DiscreteGrid(-1.0, 1.0, levels)
    gen = torch.Generator().manual_seed(levels)
    data = grid.round(torch.rand(64, d, generator=gen, dtype=torch.float64) * 2 - 1)
    spec = itd.GaussianSpectrum.from_data(data, diagonal=True)
    return itd.ITDiffusion(spec.denoise, spec, clip=clip), grid


@SLOW
@given(levels=st.sampled_from([2, 3, 16, 256]), clip=st.floats(1.0, 12.0), edge=st.sampled_from([-1.0, 1.0]),
       dtype=DTYPES, rounding=st.sampled_from(["hard", "soft", "none"]), mode=st.sampled_from(["stratified", "midpoint"]))
def test_nll_finite_for_data_at_the_grid_edges(levels, clip, edge, dtype, rounding, mode):
    model, grid = grid_model(levels, clip)
    x = torch.full((2, model.d), edge, dtype=dtype)
    x[1, 0] = -edge  # one coordinate at the other end
    nll = model.nll(x, 12, seed=0, discrete=grid, rounding=rounding, placement=mode)
    assert nll.dtype == torch.float64 and torch.isfinite(nll).all()
    clamped = model.nll(x, 12, seed=0, discrete=grid, rounding=rounding, clamp=(-1.0, 1.0), placement=mode)
    assert torch.isfinite(clamped).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_evaluate_finite_for_data_at_the_grid_edges(dtype):
    model, grid = grid_model(256, 12.0)
    x = torch.stack([torch.full((model.d,), -1.0), torch.full((model.d,), 1.0)]).to(dtype)
    results = itd.evaluate(model, [x], n_points=16, discrete=grid, soft=True, dequantize=True)
    for name, est in results.estimates.items():
        assert math.isfinite(est.nats), name
    for name, curve in results.curves.items():
        assert (curve == curve).all() and abs(curve).max() < math.inf, name


# --------------------------------------------------------------------------- #
# A denoiser that fails at one log-SNR is named, not averaged away
# --------------------------------------------------------------------------- #


class FailsAt:
    """The Gaussian denoiser, except NaN (or Inf) at one log-SNR value, for one example."""

    def __init__(self, spec: itd.GaussianSpectrum, target: float | None, bad: float = math.nan):
        self.spec, self.target, self.bad, self.seen = spec, target, bad, []

    def __call__(self, z, logsnr):
        self.seen.extend(logsnr.double().tolist())
        out = self.spec.denoise(z, logsnr)
        if self.target is not None:
            hit = (logsnr.double() - self.target).abs() <= 1e-5 * max(1.0, abs(self.target))
            rows = hit.nonzero().flatten()[:1]  # only the first matching pair
            out[rows, 0] = self.bad
        return out


def _named(message: str, target: float) -> bool:
    return f"{round(target, 4)}" in message or f"{target:.4g}" in message


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("discrete", [False, True])
def test_nan_at_one_logsnr_is_named_by_nll(bad, dtype, discrete):
    model, grid = grid_model(16, 6.0)
    grid = grid if discrete else None
    x = torch.full((3, model.d), 1.0, dtype=dtype)
    x[1] = -1.0
    probe = FailsAt(model.spectrum, None)
    model.denoiser = probe
    reference = model.nll(x, 10, seed=0, discrete=grid, placement="midpoint", antithetic=False)
    assert torch.isfinite(reference).all()
    points = sorted(set(probe.seen))
    target = points[len(points) // 2 + 1]  # an interior point, not the first or last
    model.denoiser = FailsAt(model.spectrum, target, bad)
    with pytest.raises(ValueError, match="NaN or Inf") as info:
        model.nll(x, 10, seed=0, discrete=grid, placement="midpoint", antithetic=False)
    message = str(info.value)
    assert _named(message, target), (message, target)
    others = [p for p in points if abs(p - target) > 1e-3]
    assert not any(f"{round(p, 4)}" in message for p in others), message


@pytest.mark.parametrize("soft", [False, True])
def test_nan_at_one_logsnr_is_named_by_evaluate(soft):
    model, grid = grid_model(16, 6.0)
    x = torch.full((3, model.d), -1.0)
    probe = FailsAt(model.spectrum, None)
    model.denoiser = probe
    results = itd.evaluate(model, [x], n_points=8, discrete=grid, soft=soft, dequantize=True)
    assert all(math.isfinite(e.nats) for e in results.estimates.values())
    points = sorted(set(round(p, 6) for p in probe.seen))
    assert len(points) == len(results.logsnr)
    target = points[2]
    model.denoiser = FailsAt(model.spectrum, target)
    with pytest.raises(ValueError, match="NaN or Inf") as info:
        itd.evaluate(model, [x[:1], x[1:]], n_points=8, discrete=grid, soft=soft, dequantize=True)
    assert _named(str(info.value), target), (str(info.value), target)
    # continuous data, antithetic groups: still named
    model.denoiser = FailsAt(model.spectrum, None)
    itd.evaluate(model, [x], n_points=8)
    points = sorted(set(model.denoiser.seen))
    model.denoiser = FailsAt(model.spectrum, points[-1])
    with pytest.raises(ValueError, match="NaN or Inf") as info:
        itd.evaluate(model, [x], n_points=8)
    assert _named(str(info.value), points[-1])
