"""The variational bounds on the same denoiser: discrete time (DDPM/IDDPM) and continuous time (VDM).

- :func:`vlb_discrete`: the discrete-time variational bound of DDPM/IDDPM
  (``calc_bpd_loop``): a prior term, ``T - 1`` Gaussian KL terms with fixed or learned
  variances and a decoder term, one network call per step.
- :func:`vlb_continuous`: the continuous-time bound of Variational Diffusion Models,
  ``KL(q(z_lo | x) || N(0, I)) + 1/2 Int_lo^hi E||eps - eps_hat||^2 da + E[-log p(x | z_hi)]``,
  integrated over log-SNR with the IT estimator's points and Gaussian control variate.

Results are per example, in nats (float64), with the network calls spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..denoisers.protocol import Denoiser
from ..core.channel import add_noise, alpha_sigma, x_from_eps
from ..core.errors import ErrorOptions
from ..core.grid import DiscreteGrid
from ..core.noise import seed_from
from ..core.units import bpd as _bpd
from .gaussian import (_broadcast, _flat, _randn_per_example, discretized_gaussian_nll, example_generators,
                       gaussian_nll, prior_kl)
from .schedule import VARIANCES, DiscreteSchedule

_MAX_ELEMENTS = 2**22  # elements per chunk in grid-decoder computations
_NOISE_PER_EXAMPLE = 2**16  # noise elements drawn per example at a time (discrete-time bound)

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
        return _bpd(self.nll, self.d)


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
    discrete: DiscreteGrid | None,
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
    if discrete is None:
        decoder = gaussian_nll(x64, x_hat, logvar)
    else:
        decoder = discretized_gaussian_nll(x64, x_hat, logvar, discrete)
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
    discrete: DiscreteGrid | None = None,
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
        variance: ``"fixed_small"``, ``"fixed_large"`` (DDPM's and IDDPM's: ``beta_t``, and
            ``beta_tilde_2`` at t = 1), ``"fixed_large_beta1"`` (``beta_t`` at every step) or
            ``"learned"`` (see :meth:`DiscreteSchedule.model_log_variance`).
        discrete: data on a grid (``DiscreteGrid``): discretised-Gaussian decoder (an upper bound on ``-log P(x)``);
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
    kwargs = dict(variance=variance, discrete=discrete, clamp=clamp)
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


def gaussian_decoder_nll(logsnr_hi: float, d: int) -> float:
    """``E_eps[-log N(x; z / alpha, e^-a I)]`` at ``a = logsnr_hi``, in nats (network-free decoder).

    ``x - z / alpha = -(sigma / alpha) eps`` and ``(sigma / alpha)^2 = e^-a``, so the expectation
    is ``d/2 (log(2 pi) - a + 1)`` whatever ``x`` is.
    """
    return 0.5 * d * (math.log(2 * math.pi) - float(logsnr_hi) + 1.0)


def grid_decoder_nll(x: torch.Tensor, logsnr_hi: float, eps: torch.Tensor, discrete: DiscreteGrid) -> torch.Tensor:
    """``-log p(x | z)`` for ``z = alpha x + sigma eps`` with VDM's network-free grid decoder, ``(B,)`` nats.

    ``p(x_i = v | z_i)`` is proportional to ``N(z_i; alpha v, sigma^2)`` over the grid values
    ``v`` (the exact posterior under a uniform prior on the grid), independently per dimension.
    """
    a = torch.tensor(float(logsnr_hi), dtype=torch.float64, device=x.device)
    alpha, sigma = alpha_sigma(a)
    z = _flat(add_noise(x.double(), a.expand(len(x)), eps.double()))
    k_x = discrete.round_index(_flat(x).double())
    levels = discrete.value(torch.arange(discrete.levels, dtype=torch.float64, device=x.device))
    out = []
    rows = max(1, _MAX_ELEMENTS // max(1, z.shape[1] * discrete.levels))
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
    discrete: DiscreteGrid | None = None,
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
    expectation), VDM's grid posterior for data on ``discrete`` (one noise draw).

    Args:
        model: an :class:`itdiffusion.ITDiffusion`.
        x: data ``(B, *shape)``.
        n_points: network calls per example.
        generator / seed: randomness (each example has its own stream).
        clip: integration half-width in logistic scales (default ``model.clip``).
        discrete: data on a grid (bound on ``-log P(x)``).
        control_variate: subtract the Gaussian denoiser's error on the same noise.
        antithetic, batch_size: as in :meth:`ITDiffusion.nll`.

    Returns:
        :class:`BoundTerms` ``(B,)`` float64.
    """
    estimator = model.estimator(n_points, discrete=discrete, rounding="none", clip=clip, antithetic=antithetic,
                                batch_size=batch_size)
    model.check_data(x, discrete)
    seed = seed_from(generator) if seed is None else int(seed)
    lo, hi = estimator.proposal.lo, estimator.proposal.hi
    measured = estimator.measure(model, model.spectrum, x, seed=seed,
                                 passes=(replace(estimator.data_pass(), options=ErrorOptions(batch_size=batch_size)),))
    errs, logsnr, weights = measured.errors["data"], measured.quadrature.logsnr, measured.quadrature.weights
    layout = estimator.sampling.layout
    if control_variate:
        split = hi if discrete is None else estimator.split
        below = (logsnr < split).to(errs.raw.dtype)
        spec = model.spectrum
        known = spec.error_integral(x, split) - spec.error_integral(x, lo)
        diffusion = 0.5 * (known.to(x.device) + (weights * (errs.raw - below * errs.gauss)).sum(-1))
    else:
        diffusion = 0.5 * (weights * errs.raw).sum(-1)
    if discrete is None:
        decoder = torch.full((len(x),), gaussian_decoder_nll(hi, model.d), dtype=torch.float64, device=x.device)
    else:
        eps = _randn_per_example(example_generators(seed, range(len(x)), salt=1), model.shape, x)
        decoder = grid_decoder_nll(x, hi, eps, discrete)
    return BoundTerms(prior=prior_kl(x, lo).to(x.device), diffusion=diffusion, decoder=decoder, d=model.d,
                      calls_per_example=layout.n_calls)
