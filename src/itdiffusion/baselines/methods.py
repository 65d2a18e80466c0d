"""Likelihood baselines computed from the *same* epsilon-denoiser as the IT estimator.

Three classical ways to turn a diffusion model into a likelihood, rewritten for the
variance-preserving channel of this package (``z = alpha x + sigma eps``,
``alpha^2 = sigmoid(a)``, ``sigma^2 = sigmoid(-a)``, ``a`` = log-SNR):

- :func:`vlb_discrete`: the discrete-time variational bound of DDPM/IDDPM
  (``calc_bpd_loop``): a prior term, ``T - 1`` Gaussian KL terms with fixed or learned
  variances and a decoder term, one network call per step.
- :func:`vlb_continuous`: the continuous-time bound of Variational Diffusion Models,
  ``KL(q(z_lo | x) || N(0, I)) + 1/2 Int_lo^hi E||eps - eps_hat||^2 da + E[-log p(x | z_hi)]``,
  integrated over log-SNR with the IT estimator's points and Gaussian control variate.
- :func:`ode_nll`: the probability-flow ODE likelihood (Song et al. 2021), integrated in
  log-SNR from the data to the noise with a fixed-step or adaptive Runge-Kutta solver.

All results are per example, in nats (float64), with the number of network calls spent.
Randomness comes only from explicit seeds or generators, one stream per example (see
:mod:`itdiffusion.core.noise`), so results do not depend on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..core.channel import add_noise, alpha_sigma, x_from_eps
from ..core.grid import DiscreteGrid
from ..core.errors import ErrorOptions
from ..core.proposal import LogisticProposal
from ..core.noise import example_seed, seed_from

LN2 = math.log(2.0)
DEFAULT_STEPS = 1000  # discrete-time steps when the denoiser has no schedule of its own
VARIANCES = ("fixed_small", "fixed_large", "learned")
SOLVERS = ("euler", "heun", "rk4", "dopri5")
EXACT_TRACE_MAX_D = 16  # "auto" trace: exact up to this dimension, Hutchinson above
ODE_SCALE_FACTOR = 2.0  # ODE time is a logistic quantile of scale ODE_SCALE_FACTOR * scale (see ode_nll)
_MAX_ELEMENTS = 2**22  # elements per chunk in grid-decoder computations
_NOISE_PER_EXAMPLE = 2**16  # noise elements drawn per example at a time (discrete-time bound)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DenoiserWithVariance = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class BoundTerms:
    """A variational bound ``prior + diffusion + decoder`` per example, each ``(B,)`` float64 nats.

    Attributes:
        prior: ``KL(q(z_T | x) || N(0, I))``.
        diffusion: the sum of the KL terms (discrete time) or the log-SNR integral
            (continuous time).
        decoder: ``-log p(x | z)`` at the least noisy step.
        d: dimension of one example.
        calls_per_example: network calls spent on each example.
    """

    prior: torch.Tensor
    diffusion: torch.Tensor
    decoder: torch.Tensor
    d: int
    calls_per_example: int

    @property
    def nll(self) -> torch.Tensor:
        """The bound on ``-log p(x)`` in nats, ``(B,)``."""
        return self.prior + self.diffusion + self.decoder

    @property
    def bpd(self) -> torch.Tensor:
        """The bound in bits per dimension, ``(B,)``."""
        return self.nll / (self.d * LN2)


@dataclass
class ODEResult:
    """Probability-flow ODE likelihood per example.

    Attributes:
        nll: ``-log p(x)`` in nats, ``(B,)`` float64 (for grid data: the dequantized bound
            ``-log p(x + u) - d log delta`` on ``-log P(x)``).
        d: dimension of one example.
        nfe: network (forward) evaluations along the trajectory.
        vjps_per_call: backward passes (vector-Jacobian products) per evaluation for the
            divergence: ``d`` for the exact trace, ``n_probes`` for Hutchinson.
        steps: accepted solver steps; ``rejected``: rejected ones (adaptive solver).
    """

    nll: torch.Tensor
    d: int
    nfe: int
    vjps_per_call: int
    steps: int
    rejected: int = 0

    @property
    def calls_per_example(self) -> int:
        """Network passes, forward and backward: ``nfe * (1 + vjps_per_call)``.

        A backward pass costs about two forward passes, so this count still flatters the
        ODE slightly when compared with forward-only methods.
        """
        return self.nfe * (1 + self.vjps_per_call)

    @property
    def bpd(self) -> torch.Tensor:
        return self.nll / (self.d * LN2)


# ============================================================================ helpers
def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1)


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` values reshaped to broadcast against ``(B, *shape)``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def example_generators(seed: int, indices: Sequence[int], salt: int = 0) -> list[torch.Generator]:
    """One CPU generator per example, seeded from ``(seed + salt, index)`` (see :mod:`itdiffusion.core.noise`).

    Draws are made on the CPU and moved to the data's device, so results do not depend
    on the device either.
    """
    gens = []
    for index in indices:
        gen = torch.Generator()
        gen.manual_seed(example_seed(int(seed) + int(salt), int(index)))
        gens.append(gen)
    return gens


def _randn_per_example(gens: Sequence[torch.Generator], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``(B, *shape)`` standard normal draws in ``like``'s dtype and device, row ``i`` from ``gens[i]``."""
    rows = [torch.randn(shape, generator=g, dtype=like.dtype) for g in gens]
    return torch.stack(rows).to(like.device)


def _rand_per_example(gens: Sequence[torch.Generator], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.rand(shape, generator=g, dtype=like.dtype) for g in gens]).to(like.device)


def _rademacher_per_example(gens, shape, like: torch.Tensor) -> torch.Tensor:
    bits = torch.stack([torch.randint(0, 2, shape, generator=g) for g in gens])
    return (2 * bits - 1).to(dtype=like.dtype, device=like.device)


def prior_kl(x: torch.Tensor, logsnr: float) -> torch.Tensor:
    """``KL(N(alpha x, sigma^2 I) || N(0, I))`` per example in nats, ``(B, *shape) -> (B,)`` float64.

    ``1/2 sum_i [sigma^2 - 1 - log sigma^2 + alpha^2 x_i^2]``, with ``sigma^2 - 1 - log sigma^2``
    written as ``softplus(a) - sigmoid(a)`` (stable when ``sigma`` is close to 1).
    """
    a = torch.tensor(float(logsnr), dtype=torch.float64)
    per_dim = F.softplus(a) - torch.sigmoid(a)
    y = _flat(x).double()
    return 0.5 * (y.shape[1] * per_dim + torch.sigmoid(a) * (y * y).sum(1))


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``-log N(x; mean, exp(logvar))`` summed over all but the first axis, float64 ``(B,)``."""
    diff = (x.double() - mean.double())
    logvar = logvar.double().expand_as(diff)
    per_dim = 0.5 * (math.log(2 * math.pi) + logvar + diff * diff * torch.exp(-logvar))
    return _flat(per_dim).sum(1)


def _log_diff_ndtr(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """``log(Phi(upper) - Phi(lower))`` for ``upper > lower``, accurate in both tails."""
    flip = (upper + lower) > 0  # work on the side where both CDFs are small
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, grid: DiscreteGrid) -> torch.Tensor:
    """``-log P(x)`` of a Gaussian discretised to ``grid``, summed per example, float64 ``(B,)``.

    Each grid value owns the bin ``x +- delta/2``; the bins of the lowest and highest
    values extend to ``-inf`` and ``+inf``, so the probabilities over the grid sum to one.
    Computed with exact normal CDFs in log space (no ``1e-12`` floor).
    """
    x, mean = x.double(), mean.double()
    inv_std = torch.exp(-0.5 * logvar.double()).expand_as(x)
    half = 0.5 * grid.delta
    upper = torch.where(x >= grid.hi - 0.5 * half, torch.full_like(x, math.inf), (x + half - mean) * inv_std)
    lower = torch.where(x <= grid.lo + 0.5 * half, torch.full_like(x, -math.inf), (x - half - mean) * inv_std)
    return -_flat(_log_diff_ndtr(upper, lower)).sum(1)


# ============================================================================ discrete time
@dataclass(frozen=True)
class DiscreteSchedule:
    """The coefficients of a discrete-time diffusion with ``T`` steps (float64 ``(T,)`` each).

    Step ``i = 0..T-1`` is the paper's ``t = i + 1``.  ``alphas_cumprod[i]`` is
    ``alpha_bar_t``; ``alphas_cumprod_prev[0] = 1`` is the data.
    """

    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    betas: torch.Tensor
    posterior_variance: torch.Tensor  # beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t, 0 at t = 1
    posterior_log_variance_clipped: torch.Tensor  # log beta_tilde_t, with t = 1 taking t = 2's value
    posterior_mean_coef_x: torch.Tensor  # coefficient of x_0 in the posterior mean
    logsnr: torch.Tensor  # log(abar_t / (1 - abar_t)), decreasing

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "DiscreteSchedule":
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().flatten()
        if len(abar) < 2 or not bool(((abar > 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError("alphas_cumprod must be a strictly decreasing sequence in (0, 1) of length >= 2")
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        betas = 1.0 - abar / prev
        post_var = (1.0 - prev) / (1.0 - abar) * betas
        clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        return cls(
            alphas_cumprod=abar,
            alphas_cumprod_prev=prev,
            betas=betas,
            posterior_variance=post_var,
            posterior_log_variance_clipped=clipped,
            posterior_mean_coef_x=prev.sqrt() * betas / (1.0 - abar),
            logsnr=torch.log(abar) - torch.log1p(-abar),
        )

    @property
    def steps(self) -> int:
        return len(self.alphas_cumprod)

    def model_log_variance(self, index: torch.Tensor, variance: str, frac: torch.Tensor | None = None) -> torch.Tensor:
        """Log-variance of ``p(x_{t-1} | x_t)`` at steps ``index`` (IDDPM conventions).

        ``fixed_small``: ``beta_tilde_t`` (``beta_tilde_2`` at t = 1, where ``beta_tilde_1 = 0``);
        ``fixed_large``: ``beta_t`` at every step, DDPM's and diffusers' definition (IDDPM's
        code takes ``beta_tilde_2`` at t = 1 instead; ``beta_1 = 1 - abar_1`` is the variance of
        ``x_0`` given ``x_1`` under a flat prior, which keeps the Gaussian decoder of continuous
        data calibrated); ``learned``: ``frac * log beta_t + (1 - frac) * log beta_tilde_t``
        (clipped) with ``frac = (v + 1) / 2`` from the network's second output half (``frac``
        must broadcast against the result).
        """
        clipped = self.posterior_log_variance_clipped.to(index.device)[index]
        if variance == "fixed_small":
            return clipped
        log_beta = torch.log(self.betas).to(index.device)[index]
        if variance == "fixed_large":
            return log_beta
        if variance == "learned":
            return frac * log_beta + (1.0 - frac) * clipped
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")


def logsnr_linear_alphas_cumprod(logsnr_lo: float, logsnr_hi: float, steps: int = DEFAULT_STEPS) -> torch.Tensor:
    """``alpha_bar_t`` ``(T,)`` of a schedule whose log-SNR falls linearly from ``logsnr_hi`` to ``logsnr_lo``.

    The default discrete-time schedule for a denoiser without one: with the model's
    integration range it spans the same log-SNRs as the IT estimator.
    """
    if int(steps) != steps or steps < 2 or not logsnr_hi > logsnr_lo:
        raise ValueError(f"need steps >= 2 and logsnr_hi > logsnr_lo, got {steps}, ({logsnr_lo}, {logsnr_hi})")
    return torch.sigmoid(torch.linspace(logsnr_hi, logsnr_lo, int(steps), dtype=torch.float64))


def _strata_steps(steps: int, n_calls: int | None, gens, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps to visit ``(B, n)`` and their weights ``(n,)`` or ``(B, n)``.

    ``n_calls=None``: every step once (the IDDPM protocol).  Otherwise step 0 (the decoder)
    and one uniformly drawn step in each of ``n_calls - 1`` contiguous blocks of steps
    ``1..T-1``, weighted by the block's size (an unbiased estimate of the sum).
    """
    n_examples = len(gens)
    if n_calls is None or n_calls >= steps:
        index = torch.arange(steps, device=device).expand(n_examples, steps)
        return index, torch.ones(steps, dtype=torch.float64, device=device)
    if int(n_calls) != n_calls or n_calls < 2:
        raise ValueError(f"n_calls must be an integer >= 2 (one decoder call and at least one KL term), got {n_calls!r}")
    edges = torch.linspace(1, steps, int(n_calls), dtype=torch.float64).round().long()  # n_calls - 1 blocks
    sizes = (edges[1:] - edges[:-1]).double()
    u = torch.stack([torch.rand(len(sizes), generator=g, dtype=torch.float64) for g in gens])
    picks = edges[:-1] + (u * sizes).floor().long()
    index = torch.cat([torch.zeros(n_examples, 1, dtype=torch.long), picks], 1).to(device)
    weights = torch.cat([torch.ones(1, dtype=torch.float64), sizes]).to(device)
    return index, weights


def _step_terms(
    x: torch.Tensor,
    eps: torch.Tensor,
    index: torch.Tensor,
    schedule: DiscreteSchedule,
    denoiser,
    *,
    variance: str,
    grid: DiscreteGrid | None,
    clamp: tuple[float, float] | None,
) -> torch.Tensor:
    """The KL term (step > 0) or decoder term (step 0) for pairs ``x, eps`` ``(P, *shape)``, ``index`` ``(P,)``.

    Returns ``(P,)`` float64 nats.  Exactly one network call per pair.
    """
    logsnr = schedule.logsnr.to(x.device)[index]
    z = add_noise(x, logsnr.to(x.dtype), eps)
    out = denoiser(z, logsnr.to(x.dtype))
    eps_hat, v = out if variance == "learned" else (out, None)
    x_hat = x_from_eps(z.double(), eps_hat.double(), logsnr)
    if clamp is not None:
        x_hat = x_hat.clamp(*clamp)
    if v is None:
        logvar = _broadcast(schedule.model_log_variance(index, variance), x_hat)
    else:
        logvar = schedule.model_log_variance(_broadcast(index, x_hat), variance, (v.double() + 1.0) / 2.0)
    x64 = x.double()
    # at t = 1 the posterior mean's coefficient of x_1 is 0: p(x_0 | x_1) has mean x_hat
    decoder = gaussian_nll(x64, x_hat, logvar) if grid is None else discretized_gaussian_nll(x64, x_hat, logvar, grid)
    return torch.where(index == 0, decoder, _posterior_kl(x64, x_hat, logvar, index, schedule))


def _posterior_kl(x, x_hat, logvar, index, schedule: DiscreteSchedule) -> torch.Tensor:
    """``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` per pair, float64 ``(P,)``.

    Both are Gaussian; their means differ by ``coef_x * (x_0 - x_hat)``.
    """
    pick = lambda table: _broadcast(table.to(x.device)[index], x)  # noqa: E731
    mean_sq = (pick(schedule.posterior_mean_coef_x) * (x - x_hat)) ** 2
    post_var, post_logvar = pick(schedule.posterior_variance), pick(schedule.posterior_log_variance_clipped)
    kl_dims = 0.5 * (logvar - post_logvar + (post_var + mean_sq) * torch.exp(-logvar) - 1.0)
    return _flat(kl_dims.expand_as(x)).sum(1)


@torch.no_grad()
def vlb_discrete(
    denoiser: Denoiser | DenoiserWithVariance,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    variance: str = "fixed_large",
    grid: DiscreteGrid | None = None,
    n_calls: int | None = None,
    clamp: tuple[float, float] | None = None,
    batch_size: int | None = None,
) -> BoundTerms:
    """Discrete-time variational bound on ``-log p(x)`` (IDDPM's ``calc_bpd_loop``), in nats.

    ``prior + sum_{t=2}^T KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) + [-log p(x_0 | x_1)]``,
    each term from one draw of ``x_t ~ q(x_t | x_0)`` and one network call.  The model
    mean is the posterior mean with ``x_0`` replaced by the denoiser's ``x_hat``.

    Args:
        denoiser: ``f(z, logsnr) -> eps_hat`` (``z`` ``(P, *shape)``, ``logsnr`` ``(P,)``); for
            ``variance="learned"``, ``f`` returns ``(eps_hat, v)`` with ``v`` in [-1, 1] the
            variance interpolation output (IDDPM's second output half).  The schedule's
            step ``t`` is called at log-SNR ``log(abar_t / (1 - abar_t))``.
        x: data ``(B, *shape)``.
        alphas_cumprod: ``(T,)`` strictly decreasing ``alpha_bar_t`` of the schedule.
        generator / seed: randomness; each example has its own stream.
        variance: ``"fixed_small"``, ``"fixed_large"`` or ``"learned"``.
        grid: data on a grid: discretised-Gaussian decoder (an upper bound on ``-log P(x)``);
            ``None``: Gaussian density decoder (continuous data).
        n_calls: ``None`` (default) evaluates all ``T`` steps; an integer ``n >= 2`` gives an
            unbiased estimate from the decoder step plus ``n - 1`` stratified KL steps.
        clamp: ``(lo, hi)`` to clamp ``x_hat`` into (IDDPM's ``clip_denoised``).
        batch_size: (example, step) pairs per network call (default 4096).

    Returns:
        :class:`BoundTerms` with per-example ``(B,)`` float64 terms.
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
    schedule = DiscreteSchedule.from_alphas_cumprod(alphas_cumprod)
    seed = seed_from(generator) if seed is None else int(seed)
    gens = example_generators(seed, range(len(x)))
    index, weights = _strata_steps(schedule.steps, n_calls, gens, x.device)
    step = int(batch_size or 4096)
    kwargs = dict(variance=variance, grid=grid, clamp=clamp)
    # Steps per chunk depend only on d, so every example's noise stream is read in the
    # same pieces whatever the batch (torch's normal draws depend on the request size).
    chunk = max(1, _NOISE_PER_EXAMPLE // math.prod(x.shape[1:]))
    terms = torch.cat([
        _chunk_terms(x, index[:, s : s + chunk], gens, schedule, denoiser, step, **kwargs)
        for s in range(0, index.shape[1], chunk)
    ], 1)  # (B, n); column 0 is step 0, the decoder
    return BoundTerms(
        prior=prior_kl(x, schedule.logsnr[-1].item()).to(x.device),
        diffusion=(terms[:, 1:] * weights[1:]).sum(1),
        decoder=terms[:, 0],
        d=math.prod(x.shape[1:]),
        calls_per_example=index.shape[1],
    )


def _chunk_terms(x, index, gens, schedule, denoiser, batch_size, **kwargs) -> torch.Tensor:
    """Terms ``(B, k)`` at steps ``index`` ``(B, k)``, one fresh noise draw per pair."""
    shape = tuple(x.shape[1:])
    k = index.shape[1]
    eps = _randn_per_example(gens, (k, *shape), x).reshape(-1, *shape)
    pairs_x = x.unsqueeze(1).expand(len(x), k, *shape).reshape(-1, *shape)
    flat_index = index.reshape(-1)
    parts = [
        _step_terms(pairs_x[i : i + batch_size], eps[i : i + batch_size], flat_index[i : i + batch_size],
                    schedule, denoiser, **kwargs)
        for i in range(0, len(flat_index), batch_size)
    ]
    return torch.cat(parts).reshape(len(x), k)


# ============================================================================ continuous time
def gaussian_decoder_nll(logsnr_hi: float, d: int) -> float:
    """``E_eps[-log N(x; z / alpha, e^-a I)]`` at ``a = logsnr_hi``, in nats (network-free decoder).

    ``x - z / alpha = -(sigma / alpha) eps`` and ``(sigma / alpha)^2 = e^-a``, so the expectation
    is ``d/2 (log(2 pi) - a + 1)`` whatever ``x`` is.
    """
    return 0.5 * d * (math.log(2 * math.pi) - float(logsnr_hi) + 1.0)


def grid_decoder_nll(x: torch.Tensor, logsnr_hi: float, eps: torch.Tensor, grid: DiscreteGrid) -> torch.Tensor:
    """``-log p(x | z)`` for ``z = alpha x + sigma eps`` with VDM's network-free grid decoder, ``(B,)`` nats.

    ``p(x_i = v | z_i)`` is proportional to ``N(z_i; alpha v, sigma^2)`` over the grid values
    ``v`` (the exact posterior under a uniform prior on the grid), independently per dimension.
    """
    a = torch.tensor(float(logsnr_hi), dtype=torch.float64, device=x.device)
    alpha, sigma = alpha_sigma(a)
    z = _flat(add_noise(x.double(), a.expand(len(x)), eps.double()))
    k_x = grid.round_index(_flat(x).double())
    levels = grid.value(torch.arange(grid.levels, dtype=torch.float64, device=x.device))
    out = []
    rows = max(1, _MAX_ELEMENTS // max(1, z.shape[1] * grid.levels))
    for i in range(0, len(z), rows):
        logits = -((z[i : i + rows, :, None] - alpha * levels) ** 2) / (2 * sigma**2)  # (b, d, levels)
        own = torch.gather(logits, 2, k_x[i : i + rows, :, None].long())[..., 0]
        out.append((torch.logsumexp(logits, 2) - own).sum(1))
    return torch.cat(out)


@torch.no_grad()
def vlb_continuous(
    model,
    x: torch.Tensor,
    n_points: int = 256,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    clip: float | None = None,
    grid: DiscreteGrid | None = None,
    control_variate: bool = True,
    antithetic: bool | None = None,
    batch_size: int | None = None,
) -> BoundTerms:
    """Continuous-time variational bound (Variational Diffusion Models) on ``-log p(x)``, in nats.

    ``KL(q(z_lo | x) || N(0, I)) + 1/2 Int_lo^hi E||eps - eps_hat(z_a, a)||^2 da + E[-log p(x | z_hi)]``
    over the model's log-SNR range ``[lo, hi] = model.logsnr_range(clip)``.  The integral
    uses the IT estimator's machinery: ``n_points`` calls at stratified points of the
    truncated-logistic proposal (antithetic groups by default for continuous data),
    per-example noise streams, and by
    default the Gaussian-optimal denoiser on the same noise as a control variate, whose
    expected integral is known in closed form (:meth:`GaussianSpectrum.error_integral`);
    the control variate changes the variance, not the expectation.  For grid data it is
    used only below ``model.discrete_split(clip)``, as in the IT estimator (above it the
    model's error vanishes while the Gaussian's does not).  The decoder is
    network-free: ``N(x; z / alpha, e^-hi I)`` for continuous data (closed-form
    expectation), VDM's grid posterior for data on ``grid`` (one noise draw).

    Args:
        model: an :class:`itdiffusion.ITDiffusion`.
        x: data ``(B, *shape)``.
        n_points: network calls per example.
        generator / seed: randomness (each example has its own stream).
        clip: integration half-width in logistic scales (default ``model.clip``).
        grid: data on a grid (bound on ``-log P(x)``).
        control_variate: subtract the Gaussian denoiser's error on the same noise.
        antithetic, batch_size: as in :meth:`ITDiffusion.nll`.

    Returns:
        :class:`BoundTerms` ``(B,)`` float64.
    """
    estimator = model.estimator(n_points, discrete=grid, rounding="none", clip=clip, antithetic=antithetic,
                                batch_size=batch_size)
    model.check_data(x, grid)
    seed = seed_from(generator) if seed is None else int(seed)
    lo, hi = estimator.proposal.lo, estimator.proposal.hi
    measured = estimator.measure(model, model.spectrum, x, seed=seed,
                                 passes=(replace(estimator.data_pass(), options=ErrorOptions(batch_size=batch_size)),))
    errs, logsnr, weights = measured.errors["data"], measured.quadrature.logsnr, measured.quadrature.weights
    layout = estimator.sampling.layout
    if control_variate:
        split = hi if grid is None else estimator.split
        below = (logsnr < split).to(errs.raw.dtype)
        spec = model.spectrum
        known = spec.error_integral(x, split) - spec.error_integral(x, lo)
        diffusion = 0.5 * (known.to(x.device) + (weights * (errs.raw - below * errs.gauss)).sum(-1))
    else:
        diffusion = 0.5 * (weights * errs.raw).sum(-1)
    if grid is None:
        decoder = torch.full((len(x),), gaussian_decoder_nll(hi, model.d), dtype=torch.float64, device=x.device)
    else:
        eps = _randn_per_example(example_generators(seed, range(len(x)), salt=1), model.shape, x)
        decoder = grid_decoder_nll(x, hi, eps, grid)
    return BoundTerms(prior=prior_kl(x, lo).to(x.device), diffusion=diffusion, decoder=decoder, d=model.d,
                      calls_per_example=layout.n_calls)


# ============================================================================ probability-flow ODE
def flow_velocity(z: torch.Tensor, eps_hat: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """``dz/da`` of the VP probability-flow ODE in log-SNR time, ``sigma/2 (sigma z - eps_hat)``.

    With ``score = -eps_hat / sigma`` the VP flow in noise time ``s = -a`` (for which
    ``beta(s) = sigma^2``) is ``dz/ds = -sigma^2 / 2 (z + score)``.  For a single data
    point it moves ``z = alpha x + sigma eps`` along fixed ``eps``.
    """
    _, sigma = alpha_sigma(_broadcast(logsnr, z).to(z.dtype))
    return 0.5 * sigma * (sigma * z - eps_hat)


def _divergence(eps_hat: torch.Tensor, z: torch.Tensor, probes: torch.Tensor | None) -> torch.Tensor:
    """``tr(d eps_hat / d z)`` per example, ``(B,)``: exact when ``probes`` is None, else Hutchinson.

    ``probes``: ``(B, K, *shape)`` fixed Rademacher vectors; the estimate is the mean of
    ``v^T J v`` over the ``K`` probes.
    """
    if probes is None:
        flat_out, d = _flat(eps_hat), z[0].numel()
        diag = []
        for i in range(d):
            grad = torch.autograd.grad(flat_out[:, i].sum(), z, retain_graph=i < d - 1)[0]
            diag.append(_flat(grad)[:, i])
        return torch.stack(diag, 1).sum(1)
    total = torch.zeros(len(z), dtype=z.dtype, device=z.device)
    for k in range(probes.shape[1]):
        v = probes[:, k]
        grad = torch.autograd.grad(eps_hat, z, v, retain_graph=k < probes.shape[1] - 1)[0]
        total = total + _flat(grad * v).sum(1)
    return total / probes.shape[1]


@dataclass
class _FlowTime:
    """ODE time ``s`` in [0, 1] runs from ``a = hi`` (data) to ``a = lo`` (noise) along a logistic quantile."""

    loc: float
    scale: float
    clip: float

    def logsnr(self, s: float) -> tuple[float, float]:
        """``(a(s), |da/ds|)``."""
        frac = torch.tensor([1.0 - s], dtype=torch.float64)
        a, speed = LogisticProposal(self.loc, self.scale, self.clip).quantile(frac)
        return a.item(), speed.item()


def _flow_field(model, time: _FlowTime, probes, counter: dict):
    """``f(s, z) -> (dz/ds, dl/ds)`` with ``l`` accumulating ``Int sigma/2 (tr J - d sigma) da``.

    ``sigma/2 (tr J - d sigma)`` is minus the flow's divergence; it vanishes at both ends of
    the log-SNR range, so the solver's error control sees a well-scaled integrand.
    """

    def rhs(s: float, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, speed = time.logsnr(s)
        logsnr = torch.full((len(z),), a, dtype=z.dtype, device=z.device)
        with torch.enable_grad():
            z_in = z.detach().requires_grad_(True)
            eps_hat = model(z_in, logsnr)
            div = _divergence(eps_hat, z_in, probes)
        counter["calls"] += 1
        sigma = math.exp(0.5 * F.logsigmoid(torch.tensor(-a, dtype=torch.float64)).item())
        dz = -speed * flow_velocity(z, eps_hat.detach(), logsnr)
        return dz, (speed * 0.5 * sigma) * (div.detach().double() - sigma * z[0].numel())

    return rhs


def _rk_fixed(rhs, z, n_steps: int, solver: str):
    """Integrate ``(z, l)`` over ``s`` in [0, 1] with ``n_steps`` equal steps; returns ``(z, l, steps)``."""
    h = 1.0 / n_steps
    ell = torch.zeros(len(z), dtype=torch.float64, device=z.device)
    for i in range(n_steps):
        s = i * h
        k1 = rhs(s, z)
        if solver == "euler":
            incr = k1
        elif solver == "heun":
            k2 = rhs(s + h, z + h * k1[0])
            incr = tuple(0.5 * (p + q) for p, q in zip(k1, k2))
        else:  # rk4
            k2 = rhs(s + h / 2, z + h / 2 * k1[0])
            k3 = rhs(s + h / 2, z + h / 2 * k2[0])
            k4 = rhs(s + h, z + h * k3[0])
            incr = tuple((p + 2 * q + 2 * r + t) / 6 for p, q, r, t in zip(k1, k2, k3, k4))
        z, ell = z + h * incr[0], ell + h * incr[1]
    return z, ell, n_steps, 0


# Dormand-Prince 5(4) tableau.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = _DP_A[6] + (0.0,)
_DP_B_LOW = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def _dopri5(rhs, z, rtol: float, atol: float, first_step: float = 0.02, max_steps: int = 10_000):
    """Adaptive Dormand-Prince 5(4) over ``s`` in [0, 1], one step size shared by the batch.

    The error norm is the RMS over each example's state ``(z, l)`` of
    ``err / (atol + rtol * max(|y_old|, |y_new|))``, maximised over the batch.
    """
    s, h = 0.0, first_step
    ell = torch.zeros(len(z), dtype=torch.float64, device=z.device)
    k_first = rhs(s, z)
    accepted = rejected = 0
    while s < 1.0 - 1e-12:
        h = min(h, 1.0 - s)
        ks = [k_first]
        for i in range(1, 7):
            dz = sum(a * k[0] for a, k in zip(_DP_A[i], ks) if a)
            ks.append(rhs(s + _DP_C[i] * h, z + h * dz))
        new_z = z + h * sum(b * k[0] for b, k in zip(_DP_B, ks) if b)
        new_ell = ell + h * sum(b * k[1] for b, k in zip(_DP_B, ks) if b)
        err_z = h * sum((b - c) * k[0] for b, c, k in zip(_DP_B, _DP_B_LOW, ks) if b != c)
        err_l = h * sum((b - c) * k[1] for b, c, k in zip(_DP_B, _DP_B_LOW, ks) if b != c)
        tol_z = atol + rtol * torch.maximum(z.abs(), new_z.abs())
        tol_l = atol + rtol * torch.maximum(ell.abs(), new_ell.abs())
        ratio = torch.cat([_flat(err_z / tol_z).double(), (err_l / tol_l)[:, None]], 1)
        norm = ratio.pow(2).mean(1).sqrt().max().item()
        if norm <= 1.0:
            s, z, ell, k_first = s + h, new_z, new_ell, ks[6]  # first-same-as-last
            accepted += 1
        else:
            rejected += 1
        h *= min(5.0, max(0.2, 0.9 * (norm + 1e-16) ** -0.2))
        if accepted + rejected > max_steps:
            raise RuntimeError(f"adaptive ODE solver did not finish in {max_steps} steps (stiff or diverging flow)")
    return z, ell, accepted, rejected


def reference_marginal_log_prob(spectrum, z: torch.Tensor, logsnr: float) -> torch.Tensor:
    """``log N(z; alpha mu, alpha^2 Sigma + sigma^2 I)``: the Gaussian reference seen through the channel.

    Used as the ODE's prior at the low end of the range: it differs from the true marginal
    of ``z`` by ``O(alpha^2)``, where ``N(0, I)`` differs by ``O(alpha)`` per example (the
    shifted mean).  ``(B, *shape) -> (B,)`` float64.
    """
    a = torch.tensor(float(logsnr), dtype=torch.float64)
    alpha, sigma = alpha_sigma(a)
    y = spectrum.to_eigenbasis(z, shift=alpha)
    log_var = torch.log(alpha**2 * torch.exp(spectrum.log_eigs) + sigma**2)
    return -0.5 * ((y * y * torch.exp(-log_var)).sum(1) + log_var.sum() + spectrum.d * math.log(2 * math.pi))


@torch.no_grad()
def ode_nll(
    model,
    x: torch.Tensor,
    *,
    solver: str = "dopri5",
    n_steps: int = 50,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    trace: str = "auto",
    n_probes: int = 1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    clip: float | None = None,
    grid: DiscreteGrid | None = None,
) -> ODEResult:
    """Probability-flow ODE likelihood ``-log p(x)`` in nats, ``(B, *shape) -> ODEResult``.

    The VP flow in log-SNR, ``dz/da = sigma/2 (sigma z - eps_hat(z, a))``, is integrated from
    ``z_hi = alpha_hi x`` at ``hi`` down to ``lo`` (``model.logsnr_range(clip)``).  By the
    instantaneous change of variables, with ``tr J`` the divergence of ``eps_hat``,

        log p(x) = log p_lo(z_lo) + Int_lo^hi sigma/2 (tr J - d sigma) da + d log alpha_hi,

    where ``-sigma/2 (tr J - d sigma)`` is the flow's divergence, ``d log alpha_hi`` is the
    change of scale of the starting point and the prior ``p_lo`` is the model's Gaussian
    reference seen through the channel (:func:`reference_marginal_log_prob`; Song et al.
    use ``N(0, I)``, which adds an ``O(alpha_lo)`` error per example).  The solver's time ``s``
    in [0, 1] is the quantile of a truncated logistic of scale ``2 * model.scale`` over the
    same range (the flow's speed decays like ``e^(-|a - loc| / 2)``, so equal steps in ``s``
    spend effort where the flow moves).

    Args:
        model: an :class:`itdiffusion.ITDiffusion`; the denoiser must be differentiable in ``z``.
        x: data ``(B, *shape)`` (its dtype is used for the flow; float64 recommended for tests).
        solver: ``"dopri5"`` (adaptive, ``rtol``/``atol``) or fixed-step ``"euler"``, ``"heun"``,
            ``"rk4"`` with ``n_steps`` steps.
        trace: ``"exact"`` (``d`` backward passes per call), ``"hutchinson"`` (``n_probes``
            Rademacher probes fixed along each trajectory; unbiased for ``log p``) or
            ``"auto"`` (exact up to ``d = 16``).
        generator / seed: randomness for probes and dequantization (one stream per example).
        clip: range half-width in logistic scales (default ``model.clip``).
        grid: data on a grid: returns the uniform-dequantization bound
            ``-log p(x + delta u) - d log delta`` on ``-log P(x)``.

    Returns:
        :class:`ODEResult`.  The batch shares the adaptive solver's steps, so its ``nfe`` is
        that of the whole batch (the hardest example sets the step size).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if trace not in ("auto", "exact", "hutchinson"):
        raise ValueError(f"unknown trace {trace!r}; choose 'auto', 'exact' or 'hutchinson'")
    if int(n_steps) != n_steps or n_steps < 1 or int(n_probes) != n_probes or n_probes < 1:
        raise ValueError(f"n_steps and n_probes must be positive integers, got {n_steps!r}, {n_probes!r}")
    model.check_data(x, grid)
    clip = model.clip if clip is None else float(clip)
    seed = seed_from(generator) if seed is None else int(seed)
    d = model.d
    gens = example_generators(seed, range(len(x)), salt=2)
    exact = trace == "exact" or (trace == "auto" and d <= EXACT_TRACE_MAX_D)
    probes = None if exact else _rademacher_per_example(gens, (int(n_probes), *model.shape), x)
    if grid is not None:
        x = x + grid.delta * (_rand_per_example(gens, model.shape, x) - 0.5)
    lo, hi = model.logsnr_range(clip)
    factor = ODE_SCALE_FACTOR
    time = _FlowTime(model.loc, factor * model.scale, clip / factor)
    counter = {"calls": 0}
    rhs = _flow_field(model, time, probes, counter)
    alpha_hi = math.exp(0.5 * F.logsigmoid(torch.tensor(hi, dtype=torch.float64)).item())
    if solver == "dopri5":
        z_lo, ell, steps, rejected = _dopri5(rhs, alpha_hi * x, rtol, atol)
    else:
        z_lo, ell, steps, rejected = _rk_fixed(rhs, alpha_hi * x, int(n_steps), solver)
    log_p = reference_marginal_log_prob(model.spectrum, z_lo, lo) + ell + d * math.log(alpha_hi)
    nll = -log_p - (d * math.log(grid.delta) if grid is not None else 0.0)
    return ODEResult(nll=nll, d=d, nfe=counter["calls"], vjps_per_call=d if exact else int(n_probes),
                     steps=steps, rejected=rejected)
