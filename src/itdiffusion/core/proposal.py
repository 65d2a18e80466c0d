"""The log-SNR proposal and the quadrature it gives: where the integrals over log-SNR are evaluated.

The integrals of I-MMSE run over the whole real line of log-SNR ``a``; we estimate them on a
finite range ``[lo, hi]`` by importance sampling from a *proposal* density ``q`` on that range:

    Int_lo^hi f(a) da  ~=  sum_i w_i f(a_i),     a_i = Q(u_i),   w_i = 1 / (n q(a_i)),

with ``Q`` the proposal's quantile function and ``u_i`` fractions in ``[0, 1)``.  A proposal is
any object with ``lo``, ``hi`` and ``quantile(frac) -> (logsnr, inverse_density)``;
:class:`LogisticProposal` (the default) is the truncated logistic of the published code.
Three ways to place the fractions (``placement``):

- ``"iid"``: independent uniform draws (what the published code does);
- ``"stratified"``: one draw in each of ``n`` equal-probability strata (unbiased, much lower
  variance for smooth integrands);
- ``"midpoint"``: the midpoints of the strata, a deterministic quantile rule.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol

import torch

PLACEMENTS = ("iid", "stratified", "midpoint")
MAX_CLIP = 700.0  # scales: cosh(clip) and the truncated density overflow/underflow float64 beyond


def check_n_points(n_points) -> int:
    """``n_points`` as an int; ``ValueError`` unless it is a positive integer."""
    if isinstance(n_points, bool) or not isinstance(n_points, numbers.Real) or int(n_points) != n_points \
            or n_points < 1:
        raise ValueError(f"n_points must be a positive integer, got {n_points!r}")
    return int(n_points)


def check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {PLACEMENTS}")
    return placement


class Proposal(Protocol):
    """A density on the log-SNR range ``[lo, hi]``, given by its quantile function."""

    lo: float
    hi: float

    def quantile(self, frac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logsnr, 1 / density)`` at fractions ``frac`` in ``[0, 1]`` (any shape, float64)."""
        ...


@dataclass(frozen=True)
class LogisticProposal:
    """The logistic distribution ``(loc, scale)`` truncated to ``loc +- clip * scale``.

    Its inverse density is ``scale * tanh(clip / 2) / (sigmoid(v) sigmoid(-v))`` with
    ``v = (a - loc) / scale``; ``tanh(clip / 2)`` is the mass kept by the truncation.
    """

    loc: float
    scale: float
    clip: float

    def __post_init__(self):
        if not math.isfinite(self.loc):
            raise ValueError(f"loc must be finite, got {self.loc!r}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be positive and finite, got {self.scale!r}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"clip must be positive and finite, got {self.clip!r}")
        if self.clip > MAX_CLIP:
            raise ValueError(f"clip must be at most {MAX_CLIP:g} scales (the proposal's density underflows float64 "
                             f"beyond), got {self.clip:g}")

    @property
    def lo(self) -> float:
        return self.loc - self.clip * self.scale

    @property
    def hi(self) -> float:
        return self.loc + self.clip * self.scale

    def inverse_density(self, logsnr: torch.Tensor) -> torch.Tensor:
        """``1 / q(a)`` at ``logsnr`` (any shape), in log-SNR units."""
        v = (logsnr - self.loc) / self.scale
        # 1 / (sigmoid(v) sigmoid(-v)) = exp(softplus(v) + softplus(-v)), stable for large |v|.
        inv = torch.exp(torch.nn.functional.softplus(v) + torch.nn.functional.softplus(-v))
        return self.scale * math.tanh(self.clip / 2.0) * inv

    def quantile(self, frac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frac = frac.to(torch.float64)
        lo, hi = 1.0 / (1.0 + math.exp(self.clip)), 1.0 / (1.0 + math.exp(-self.clip))
        logsnr = self.loc + self.scale * torch.logit(lo + (hi - lo) * frac)
        return logsnr, self.inverse_density(logsnr)


@dataclass(frozen=True)
class Quadrature:
    """Log-SNR points and weights of one integral over the proposal's range.

    ``logsnr`` and ``weights`` are ``(m,)`` (points shared by every example) or ``(B, m)``
    (each example its own), float64; ``sum(weights * f(logsnr), -1)`` estimates
    ``Int_lo^hi f(a) da`` (the weights hold the ``1/m`` of the average).
    """

    logsnr: torch.Tensor
    weights: torch.Tensor
    proposal: Proposal

    @property
    def lo(self) -> float:
        return self.proposal.lo

    @property
    def hi(self) -> float:
        return self.proposal.hi

    @property
    def n_points(self) -> int:
        return self.logsnr.shape[-1]

    @property
    def shared(self) -> bool:
        return self.logsnr.dim() == 1

    def integrate(self, values: torch.Tensor) -> torch.Tensor:
        """``sum_i w_i values_i`` over the last axis: ``(B, m) -> (B,)``."""
        return (self.weights.to(values.device) * values).sum(-1)

    def to(self, device) -> "Quadrature":
        return Quadrature(self.logsnr.to(device), self.weights.to(device), self.proposal)

    def rows(self, index) -> "Quadrature":
        """The points of some examples (all of them when shared)."""
        if self.shared:
            return self
        return Quadrature(self.logsnr[index], self.weights[index], self.proposal)


def fractions(n_points: int, placement: str, draws: torch.Tensor | None = None) -> torch.Tensor:
    """Fractions in ``[0, 1)`` for ``n_points`` points, ``(*batch, n)`` float64.

    ``draws`` ``(*batch, n)`` are uniform draws (needed by ``"iid"`` and ``"stratified"``).
    """
    n = check_n_points(n_points)
    check_placement(placement)
    if placement == "midpoint":
        return (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if draws is None:
        raise ValueError(f"placement {placement!r} needs uniform draws (or a torch.Generator)")
    draws = draws.to(torch.float64)
    if placement == "iid":
        return draws
    return (torch.arange(n, dtype=torch.float64, device=draws.device) + draws) / n


def quadrature(proposal: Proposal, n_points: int, placement: str = "stratified",
               draws: torch.Tensor | None = None, device=None) -> Quadrature:
    """The quadrature of ``n_points`` points of ``proposal`` placed by ``placement``
    (see :func:`fractions`); shared ``(m,)`` for ``"midpoint"`` or ``(m,)`` draws, else ``(B, m)``."""
    frac = fractions(n_points, placement, draws)
    logsnr, inv_density = proposal.quantile(frac)
    return Quadrature(logsnr.to(device), (inv_density / frac.shape[-1]).to(device), proposal)


def logistic_points(
    n_points: int,
    loc: float,
    scale: float,
    clip: float = 4.0,
    *,
    placement: str = "stratified",
    batch_shape: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-SNR points and weights of the truncated logistic ``(loc, scale, clip)``.

    Returns ``(logsnr, weights)`` of shape ``(*batch_shape, n)`` (``(n,)`` broadcast for
    ``"midpoint"``), sorted along the last axis except for ``"iid"``; ``generator`` is the
    only source of randomness (required unless ``placement="midpoint"``).
    """
    n = check_n_points(n_points)
    proposal = LogisticProposal(float(loc), float(scale), float(clip))
    check_placement(placement)
    draws = None
    if placement != "midpoint":
        if generator is None:
            raise ValueError(f"placement {placement!r} needs a torch.Generator (generator=...)")
        draws = torch.rand((*batch_shape, n), generator=generator, dtype=torch.float64, device=generator.device).cpu()
    quad = quadrature(proposal, n, placement, draws)
    logsnr, weights = quad.logsnr.expand(*batch_shape, n), quad.weights.expand(*batch_shape, n)
    return logsnr.to(dtype=dtype, device=device), weights.to(dtype=dtype, device=device)


def logistic_weights(logsnr: torch.Tensor, loc: float, scale: float, clip: float) -> torch.Tensor:
    """Inverse density of the truncated logistic at ``logsnr`` (any shape), in log-SNR units."""
    return LogisticProposal(float(loc), float(scale), float(clip)).inverse_density(logsnr)


def default_loc_scale(log_eigs: torch.Tensor) -> tuple[float, float]:
    """Moment-matched logistic proposal for a Gaussian with log-eigenvalues ``log_eigs``.

    The Gaussian's mmse curve ``sum_i sigmoid(a + log lambda_i)`` is a sum of logistic CDFs;
    matching the mean and variance of the mixture of their densities gives
    ``loc = -mean(log lambda)`` and ``scale = sqrt(1 + 3/pi^2 * var(log lambda))``
    (a logistic of scale ``s`` has variance ``s^2 pi^2 / 3``).
    """
    log_eigs = log_eigs.double()
    loc = -log_eigs.mean().item()
    var = log_eigs.var(unbiased=False).item() if log_eigs.numel() > 1 else 0.0
    return loc, math.sqrt(1.0 + 3.0 / math.pi**2 * var)
