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
MIXES = (0.05, 0.2, 0.5, 0.8, 1.0)  # candidate weights of q0 in the fitted mixture (1.0: q0 itself)
MIN_FIT_EXAMPLES = 8  # pilot examples needed to fit a proposal (held-out halves of four or more)
MARGIN = 0.8  # a fit replaces the default only where it predicts at most this fraction of its variance


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

    def cdf(self, logsnr: torch.Tensor) -> torch.Tensor:
        """``Q(a)``, the probability below ``logsnr`` (any shape; 0 below the range, 1 above)."""
        edges, masses, cdf = self._tensors(logsnr.device)
        a = logsnr.to(torch.float64).clamp(edges[0], edges[-1])
        k = (torch.searchsorted(edges, a.contiguous(), right=True) - 1).clamp(0, len(masses) - 1)
        return (cdf[k] + masses[k] * (a - edges[k]) / (edges[k + 1] - edges[k])).clamp(0.0, 1.0)

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


LAYOUTS = {"groups": True, "points": False}  # how calls are spent: antithetic groups of four, or one call per point


@dataclass(frozen=True)
class PilotValues:
    """What a pilot measured, per example and point: two antithetic groups of four calls at each.

    ``logsnr`` ``(B, k)``: the points; ``h`` ``(B, k)``: the mean integrand of the eight calls
    (an estimate of the example's mean curve there); ``noise``: per layout, an unbiased
    estimate at each point of the variance of one value of that layout (``"groups"``: the mean
    of a group of four, from the difference of the two groups; ``"points"``: one call, from the
    differences of the calls that share their place in the two groups, whose noises are independent).
    """

    logsnr: torch.Tensor
    h: torch.Tensor
    noise: dict

    @classmethod
    def from_calls(cls, logsnr: torch.Tensor, f: torch.Tensor) -> "PilotValues":
        """From ``f`` ``(B, k, 2, 4)``: the integrand of the two groups of four calls at ``logsnr`` ``(B, k)``."""
        f = f.double().cpu()
        groups = f.mean(-1)
        noise = {"groups": 0.5 * (groups[..., 0] - groups[..., 1]) ** 2,
                 "points": 0.5 * ((f[..., 0, :] - f[..., 1, :]) ** 2).mean(-1)}
        return cls(logsnr.double().cpu(), groups.mean(-1), noise)

    def rows(self, index: torch.Tensor) -> "PilotValues":
        return PilotValues(self.logsnr[index], self.h[index], {k: v[index] for k, v in self.noise.items()})

    def noise_curve(self, layout: str, at: torch.Tensor, bandwidth: float, base) -> torch.Tensor:
        """The variance of one value of ``layout`` at log-SNR ``at`` ``(K,)``, kernel-smoothed over examples.

        Beyond the pilot's outermost points, where nothing was measured, it is taken to fall
        off like ``q0^2`` (``base``'s density) from there: the default's share is kept in the tails."""
        v = smooth(at, self.logsnr.reshape(-1), self.noise[layout].reshape(-1), bandwidth)
        lo, hi = float(self.logsnr.min()), float(self.logsnr.max())
        q0 = 1.0 / base.inverse_density(at)
        for end, outside in ((lo, at < lo), (hi, at > hi)):
            ref = torch.tensor([end], dtype=torch.float64)
            tail = smooth(ref, self.logsnr.reshape(-1), self.noise[layout].reshape(-1), bandwidth) \
                * (q0 * base.inverse_density(ref)) ** 2
            v = torch.where(outside, tail, v)
        return v


    def slope_curve(self, at: torch.Tensor, bandwidth: float) -> torch.Tensor:
        """``D(a) = E_x h_x'(a)^2`` at ``at`` ``(K,)``: squared differences of neighbouring points'
        values of each example, less their noise, over the squared distance (kernel-smoothed
        at the midpoints; pairs closer than a quarter of the median distance are left out)."""
        order = self.logsnr.argsort(-1)
        a, h = self.logsnr.gather(-1, order), self.h.gather(-1, order)
        var_h = 0.25 * self.noise["groups"].gather(-1, order)  # the mean of two groups: half of one group's variance
        if a.shape[1] < 2:
            return torch.zeros_like(at)
        da = a[:, 1:] - a[:, :-1]
        d = ((h[:, 1:] - h[:, :-1]) ** 2 - var_h[:, 1:] - var_h[:, :-1]) / da.clamp_min(1e-12) ** 2
        keep = da >= 0.25 * da.median()
        mid = 0.5 * (a[:, 1:] + a[:, :-1])
        return smooth(at, mid[keep], d[keep].clamp_min(0.0), bandwidth)


def curve_moment(proposal: PiecewiseProposal, pilot: PilotValues) -> float:
    """``E_x Int_0^1 g_x'(u)^2 du``, where ``g_x(u) = h_x(a) / q(a)`` at ``a = Q^-1(u)``: what the
    stratification leaves of the shape of each example's mean curve ``h_x`` (see
    :func:`stratified_variance`).  Finite differences between an example's neighbouring pilot
    points in ``u``, less the noise of their values (so unbiased for the differences, averaged over examples)."""
    order = pilot.logsnr.argsort(-1)
    a, h = pilot.logsnr.gather(-1, order), pilot.h.gather(-1, order)
    var_h = 0.25 * pilot.noise["groups"].gather(-1, order)  # the mean of two groups: half of one group's variance
    q, u = proposal.density(a), proposal.cdf(a)
    g, var_g = h / q, var_h / q**2
    du = (u[:, 1:] - u[:, :-1]).clamp_min(1e-9)
    terms = ((g[:, 1:] - g[:, :-1]) ** 2 - var_g[:, 1:] - var_g[:, :-1]) / du
    return max(0.0, float(terms.sum(-1).mean()))


def stratified_variance(proposal: PiecewiseProposal, at: torch.Tensor, noise: torch.Tensor, slope: torch.Tensor,
                        n_points: int) -> float:
    """Predicted variance of one example's stratified estimate of ``Int f da`` with ``n_points``
    points of ``proposal``: ``1/n Int v / q da`` (the noise: ``noise`` ``(K,)``, the variance
    ``v`` of one value at the cell centres ``at``) plus ``1/(12 n^3) Int D / q^3 da`` (the mean
    curve within each stratum, of width ``1 / (n q)``: ``slope`` ``(K,)``, ``D = E h'^2``)."""
    edges = torch.tensor(proposal.edges, dtype=torch.float64)
    width, inv = edges[1:] - edges[:-1], proposal.inverse_density(at)
    return float((noise * inv * width).sum()) / n_points + float((slope * inv**3 * width).sum()) / (12.0 * n_points**3)


def candidates(base, pilot: PilotValues, layout: str, edges: torch.Tensor, bandwidth: float) -> dict:
    """Per mixing weight of :data:`MIXES`: ``(1 - mix) sqrt(v) + mix q0`` on the cells ``edges``
    (``sqrt(v)``, the noise-optimal stratified density of ``layout``; ``q0`` the default's cell masses)."""
    centres, width = 0.5 * (edges[1:] + edges[:-1]), edges[1:] - edges[:-1]
    q0 = cell_masses(base, edges)
    fit = torch.sqrt(pilot.noise_curve(layout, centres, bandwidth, base)) * width
    mixes = MIXES if bool(fit.sum() > 0) and bool(torch.isfinite(fit).all()) else (1.0,)
    out = {}
    for mix in mixes:
        masses = q0 if mix == 1.0 else (1.0 - mix) * fit / fit.sum() + mix * q0
        out[mix] = PiecewiseProposal(edges.tolist(), masses.tolist())
    return out


def _n_points(n_calls: int, layout: str) -> int:
    return -(-int(n_calls) // 4) if LAYOUTS[layout] else int(n_calls)


def _scores(base, pilot: PilotValues, n_calls: int, edges, bandwidth: float, generator) -> dict:
    """Held-out predicted variance of every (layout, mix): fitted on half of the pilot's examples,
    scored on the other half, and the other way round (one example: fitted and scored on it)."""
    centres = 0.5 * (edges[1:] + edges[:-1])
    n = pilot.h.shape[0]
    perm = torch.randperm(n, generator=generator)
    halves = [(perm[: n // 2], perm[n // 2 :]), (perm[n // 2 :], perm[: n // 2])] if n >= 2 else [(perm, perm)]
    scores: dict = {}
    for fit_rows, test_rows in halves:
        fit_p, test_p = pilot.rows(fit_rows), pilot.rows(test_rows)
        slope = test_p.slope_curve(centres, bandwidth)
        # the slopes' shape gives how the curve part changes with q; its size, the differences in u under q0
        q0 = PiecewiseProposal(edges.tolist(), cell_masses(base, edges).tolist())
        size = float((slope * q0.inverse_density(centres) ** 3 * (edges[1:] - edges[:-1])).sum())
        slope = slope * (curve_moment(q0, test_p) / size if size > 0 else 0.0)
        for layout in LAYOUTS:
            noise = test_p.noise_curve(layout, centres, bandwidth, base)
            for mix, prop in candidates(base, fit_p, layout, edges, 4 * bandwidth).items():
                n_points = _n_points(n_calls, layout)
                s = stratified_variance(prop, centres, noise, slope, n_points)
                s_noise = predicted_variance(prop, centres, noise, n_points)
                old = scores.get((layout, mix), (0.0, 0.0))
                scores[(layout, mix)] = (old[0] + s / len(halves), old[1] + s_noise / len(halves))
    return scores


def choose_proposal(base, pilot: PilotValues, n_calls: int, default_antithetic: bool, *, n_cells: int = 256,
                    margin: float = MARGIN, generator: torch.Generator | None = None):
    """The proposal and layout with the lowest held-out predicted variance at ``n_calls`` calls.

    Candidates: for each layout, the mixtures of :func:`candidates` (mix 1: the default
    proposal itself).  A fitted proposal is taken only where its predicted variance is below
    ``margin`` times the default estimator's (``base`` with the default layout); else the default.

    Returns:
        ``(proposal, antithetic, info)``: ``proposal`` ``None`` for the default (logistic) proposal.
    """
    edges = torch.linspace(base.lo, base.hi, n_cells + 1, dtype=torch.float64)
    bandwidth = (base.hi - base.lo) / 80.0
    scores = _scores(base, pilot, n_calls, edges, bandwidth, generator)
    default = ("groups" if default_antithetic else "points", 1.0)
    if pilot.h.shape[0] < MIN_FIT_EXAMPLES:  # too few examples to score fits on held-out ones: the default
        scores = {default: scores[default]}
    # a fitted proposal must predict less noise than the default proposal in its layout (the
    # noise part is measured directly; the curve part, from a few points per example, is not trusted alone)
    ok = {key: s for key, s in scores.items() if key[1] == 1.0 or s[1] < margin * scores[(key[0], 1.0)][1]}
    best = min(ok, key=lambda key: ok[key][0])
    if not scores[best][0] < margin * scores[default][0]:
        best = default
    info = {"layout": best[0], "mix": best[1], "bandwidth": bandwidth, "default_score": scores[default][0],
            "scores": {f"{layout}:{mix}": s[0] for (layout, mix), s in scores.items()}}
    if best[1] == 1.0:
        return None, LAYOUTS[best[0]], info
    return candidates(base, pilot, best[0], edges, 4 * bandwidth)[best[1]], LAYOUTS[best[0]], info

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


def predicted_variance(proposal: PiecewiseProposal, at: torch.Tensor, variance: torch.Tensor, n_points: int) -> float:
    """Noise part of the variance of a stratified estimate with ``n_points`` points:
    ``1/n Int v(a) / q(a) da`` (``variance`` ``(K,)`` per cell at the cell centres ``at``)."""
    edges = torch.tensor(proposal.edges, dtype=torch.float64)
    width = edges[1:] - edges[:-1]
    return float((variance * proposal.inverse_density(at) * width).sum()) / n_points
