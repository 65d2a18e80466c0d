"""An estimator fitted to the data: a piecewise log-SNR proposal and a per-region rounding choice.

A pilot run measures the integrand ``f(x, a)`` (one value per call or per antithetic group)
at log-SNR points drawn from the default proposal ``q0``.  From it:

- :func:`fit_proposal`: a density piecewise constant on a fine grid of cells of the range,
  proportional to a kernel-smoothed ``sqrt(E f(a)^2)`` (the density that minimises the
  variance of one importance-sampled point), mixed with ``q0``'s cell masses so that no cell
  gets zero mass.  The mixing weight is chosen on held-out pilot points.
- :func:`choose_rounding`: per log-SNR region, whether the raw, hard- or soft-rounded error
  has the lowest pilot mean (a rounded error is taken only where it is lower by more than
  ``z`` standard errors of the paired difference, so an exact denoiser keeps the raw error).

:class:`PiecewiseProposal` is a proposal like :class:`~itdiffusion.core.proposal.LogisticProposal`:
its quantile function returns points and *exactly* their inverse density (uniform within a
cell), so any fractions (stratified, midpoint) give a valid quadrature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import Errors

ROUNDING_CODES = ("none", "hard", "soft")  # stored as 0, 1, 2
MIXES = (0.02, 0.1, 0.3, 1.0)  # candidate weights of q0 in the fitted mixture (1.0: q0 itself)


@dataclass(frozen=True)
class PiecewiseProposal:
    """A density on ``[edges[0], edges[-1]]``, constant ``masses[k] / width_k`` in cell ``k``.

    ``edges``: ``K + 1`` increasing log-SNR values; ``masses``: ``K`` positive cell
    probabilities (normalised here).
    """

    edges: tuple[float, ...]
    masses: tuple[float, ...]

    def __post_init__(self):
        edges = tuple(float(e) for e in self.edges)
        masses = tuple(float(m) for m in self.masses)
        if len(edges) < 2 or len(masses) != len(edges) - 1:
            raise ValueError(f"a piecewise proposal needs K + 1 edges and K masses, got {len(edges)} and {len(masses)}")
        if not all(math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError("proposal edges must be finite and strictly increasing")
        total = sum(masses)
        if not all(m > 0 and math.isfinite(m) for m in masses):
            raise ValueError("every cell of a piecewise proposal needs a positive, finite mass")
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "masses", tuple(m / total for m in masses))

    @property
    def lo(self) -> float:
        return self.edges[0]

    @property
    def hi(self) -> float:
        return self.edges[-1]

    def _tensors(self, device=None):
        edges = torch.tensor(self.edges, dtype=torch.float64, device=device)
        masses = torch.tensor(self.masses, dtype=torch.float64, device=device)
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64, device=device), masses.cumsum(0)])
        return edges, masses, cdf

    def density(self, logsnr: torch.Tensor) -> torch.Tensor:
        """``q(a)`` at ``logsnr`` (any shape; zero outside the range), per log-SNR unit."""
        edges, masses, _ = self._tensors(logsnr.device)
        a = logsnr.to(torch.float64)
        k = (torch.searchsorted(edges, a, right=True) - 1).clamp(0, len(masses) - 1)
        inside = (a >= edges[0]) & (a <= edges[-1])
        return torch.where(inside, masses[k] / (edges[k + 1] - edges[k]), torch.zeros_like(a))

    def inverse_density(self, logsnr: torch.Tensor) -> torch.Tensor:
        """``1 / q(a)`` at ``logsnr`` inside the range."""
        return 1.0 / self.density(logsnr)

    def quantile(self, frac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logsnr, 1 / density)`` at fractions ``frac`` in ``[0, 1]`` (any shape, float64)."""
        frac = frac.to(torch.float64)
        edges, masses, cdf = self._tensors(frac.device)
        k = (torch.searchsorted(cdf, frac.contiguous(), right=True) - 1).clamp(0, len(masses) - 1)
        width = edges[k + 1] - edges[k]
        inside = ((frac - cdf[k]) / masses[k]).clamp(0.0, 1.0)
        return edges[k] + inside * width, width / masses[k]

    def to_dict(self) -> dict:
        return {"kind": "piecewise", "edges": list(self.edges), "masses": list(self.masses)}


@dataclass(frozen=True)
class RoundingMap:
    """Which error (``"none"``, ``"hard"`` or ``"soft"``) each log-SNR region uses.

    ``edges``: ``R + 1`` increasing log-SNR values (the first and last extend to infinity);
    ``choices``: ``R`` roundings.
    """

    edges: tuple[float, ...]
    choices: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        object.__setattr__(self, "choices", tuple(self.choices))
        if len(self.choices) != len(self.edges) - 1 or not self.choices:
            raise ValueError("a rounding map needs R + 1 edges and R choices")
        if any(c not in ROUNDING_CODES for c in self.choices):
            raise ValueError(f"rounding choices must be among {ROUNDING_CODES}, got {set(self.choices)}")

    @property
    def needed(self) -> tuple[str, ...]:
        """The roundings the map uses (to be computed by every call)."""
        return tuple(r for r in ("hard", "soft") if r in self.choices)

    def codes(self, logsnr: torch.Tensor) -> torch.Tensor:
        """Index into :data:`ROUNDING_CODES` of the rounding at each log-SNR (``logsnr``'s shape)."""
        edges = torch.tensor(self.edges[1:-1], dtype=torch.float64, device=logsnr.device)
        codes = torch.tensor([ROUNDING_CODES.index(c) for c in self.choices], device=logsnr.device)
        return codes[torch.bucketize(logsnr.to(torch.float64).contiguous(), edges, right=True)]

    def select(self, errs: Errors, logsnr: torch.Tensor) -> torch.Tensor:
        """The chosen error at every point: ``(B, m)`` errors, ``logsnr`` ``(m,)`` or ``(B, m)``."""
        code = self.codes(logsnr.to(errs.raw.device)).expand_as(errs.raw)
        out = errs.raw
        for i, rounding in enumerate(ROUNDING_CODES[1:], start=1):
            if rounding in self.choices:
                out = torch.where(code == i, errs.rounded(rounding), out)
        return out

    def to_dict(self) -> dict:
        return {"edges": list(self.edges), "choices": list(self.choices)}


# ============================================================================ fitting
def smooth(at: torch.Tensor, logsnr: torch.Tensor, values: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Kernel (Nadaraya-Watson, Gaussian) average of non-negative ``values`` ``(N,)`` observed at
    ``logsnr`` ``(N,)``, evaluated ``at`` ``(K,)``: ``E[value | a]`` whatever density drew the points.
    Far from every point it takes the nearest points' values (computed in log space)."""
    logk = -0.5 * ((at[:, None] - logsnr[None, :]) / bandwidth) ** 2
    num = torch.logsumexp(logk + torch.log(values.clamp_min(0.0))[None, :], 1)
    den = torch.logsumexp(logk, 1)
    return torch.exp(num - den)


def cell_masses(proposal, edges: torch.Tensor) -> torch.Tensor:
    """Probability of each cell under ``proposal`` (numerically, from its density at 16 nodes per cell)."""
    nodes = (torch.arange(16, dtype=torch.float64) + 0.5) / 16
    a = edges[:-1, None] + (edges[1:] - edges[:-1])[:, None] * nodes[None, :]
    width = (edges[1:] - edges[:-1])
    mass = (1.0 / proposal.inverse_density(a)).mean(1) * width
    return mass / mass.sum()


def _mixture(fit: torch.Tensor, base: torch.Tensor, mix: float) -> torch.Tensor:
    return (1.0 - mix) * fit / fit.sum() + mix * base


def fit_proposal(logsnr: torch.Tensor, values: torch.Tensor, base, *, n_cells: int = 256,
                 bandwidth: float | None = None, generator: torch.Generator | None = None) -> tuple[PiecewiseProposal, dict]:
    """The piecewise proposal ``(1 - mix) sqrt(E f^2) + mix q0`` from pilot integrand values.

    Args:
        logsnr, values: ``(N,)`` pilot points (drawn from ``base``) and integrand values there.
        base: the pilot's proposal ``q0`` (its range is the fitted proposal's range).
        n_cells: cells of the piecewise density.
        bandwidth: of the kernel smoothing ``f^2`` (default: the range / 80).

    The mixing weight is the one of :data:`MIXES` with the lowest held-out estimate of
    ``Int E f^2 / q da`` (proposal fitted on half of the points, scored on the other half).

    Returns:
        ``(proposal, info)``; ``info`` holds the chosen mix and the held-out scores.
    """
    logsnr, values = logsnr.double().reshape(-1).cpu(), values.double().reshape(-1).cpu()
    edges = torch.linspace(base.lo, base.hi, n_cells + 1, dtype=torch.float64)
    centres, width = 0.5 * (edges[1:] + edges[:-1]), edges[1:] - edges[:-1]
    h = (base.hi - base.lo) / 80.0 if bandwidth is None else float(bandwidth)
    q0 = cell_masses(base, edges)
    w0 = base.inverse_density(logsnr)
    perm = torch.randperm(len(logsnr), generator=generator)
    halves = (perm[: len(perm) // 2], perm[len(perm) // 2 :])
    scores = {m: 0.0 for m in MIXES}
    for train, test in (halves, halves[::-1]):
        fit = torch.sqrt(smooth(centres, logsnr[train], values[train] ** 2, h)) * width
        for mix in MIXES:
            prop = PiecewiseProposal(edges.tolist(), _mixture(fit, q0, mix).tolist())
            # E_q0[f^2 / (q q0)] = Int E f^2 / q da, estimated on the held-out points.
            scores[mix] += float((values[test] ** 2 * w0[test] * prop.inverse_density(logsnr[test])).mean()) / 2
    mix = min(MIXES, key=lambda m: scores[m])
    fit = torch.sqrt(smooth(centres, logsnr, values**2, h)) * width
    proposal = PiecewiseProposal(edges.tolist(), _mixture(fit, q0, mix).tolist())
    return proposal, {"mix": mix, "heldout_second_moment": {str(m): s for m, s in scores.items()}, "bandwidth": h}


def choose_rounding(logsnr: torch.Tensor, errs: Errors, lo: float, hi: float, *, n_regions: int = 24,
                    z: float = 2.0) -> RoundingMap:
    """Per region of ``[lo, hi]``, the error with the lowest pilot mean (see module docstring).

    ``logsnr`` ``(N,)`` and ``errs`` ``(N,)`` (raw, hard and soft) from pilot calls.  A
    rounding replaces the raw error only where the mean of the paired difference is below
    ``-z`` of its standard error; a region without pilot points takes its nearest region's choice.
    """
    a = logsnr.double().reshape(-1).cpu()
    edges = torch.linspace(lo, hi, n_regions + 1, dtype=torch.float64)
    region = torch.bucketize(a, edges[1:-1], right=True)
    choices: list[str | None] = []
    for r in range(n_regions):
        sel = region == r
        if int(sel.sum()) < 4:
            choices.append(None)
            continue
        best, best_mean = "none", 0.0
        for rounding in ("hard", "soft"):
            diff = (errs.rounded(rounding).reshape(-1).cpu() - errs.raw.reshape(-1).cpu())[sel].double()
            mean, se = diff.mean().item(), diff.std().item() / math.sqrt(len(diff))
            if mean < -z * se and mean < best_mean:
                best, best_mean = rounding, mean
        choices.append(best)
    known = [i for i, c in enumerate(choices) if c is not None]
    if not known:
        return RoundingMap((lo, hi), ("none",))
    filled = [choices[min(known, key=lambda k: (abs(k - i), -k))] for i in range(n_regions)]
    return RoundingMap(edges.tolist(), tuple(filled))


def pair_variance(logsnr: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise variance of per-point values from neighbouring points of each example.

    ``logsnr``, ``values`` ``(B, n)``: returns the midpoints ``(B * (n - 1),)`` of neighbouring
    points (sorted by log-SNR) and half the squared differences of their values there, an
    estimate of the variance of one value at that log-SNR (plus the change of the mean curve
    between the two points).
    """
    order = logsnr.argsort(-1)
    a, v = logsnr.gather(-1, order), values.gather(-1, order)
    mid = 0.5 * (a[:, 1:] + a[:, :-1])
    return mid.reshape(-1), (0.5 * (v[:, 1:] - v[:, :-1]) ** 2).reshape(-1)


def predicted_variance(proposal: PiecewiseProposal, at: torch.Tensor, variance: torch.Tensor, n_points: int) -> float:
    """Variance of a stratified estimate with ``n_points`` points: ``1/n Int v(a) / q(a) da``
    (the noise part; ``variance`` ``(K,)`` per cell at the cell centres ``at``)."""
    edges = torch.tensor(proposal.edges, dtype=torch.float64)
    width = edges[1:] - edges[:-1]
    return float((variance * proposal.inverse_density(at) * width).sum()) / n_points
