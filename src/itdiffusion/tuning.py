"""Fitting the estimator to the data on a pilot: ``ITDiffusion.tune`` (see :mod:`itdiffusion.core.adaptive`).

The pilot spends at most ``n_calls`` denoiser calls on pilot examples (never the examples
that are then evaluated), in antithetic groups of four at stratified points of the model's
default proposal, keeping every call's errors.  From them it fits:

1. for discrete data, the rounding of each log-SNR region (:func:`~itdiffusion.core.adaptive.choose_rounding`):
   the choice depends on the pilot only, so the estimate stays an upper bound;
2. for each way of spending calls (antithetic groups of four at ``n/4`` points, or one call
   at each of ``n`` points), the proposal ``~ sqrt(E f^2)`` of its per-point values;
3. the way with the lower variance: the pilot's own stratified estimate with group means at
   ``n/4`` points, against one call per point at ``n/4`` points divided by 4 (noise and curve
   shape both seen by the successive-difference estimator; dividing by 4 credits the
   single-call layout's four times as many points with the noise part's gain only, so it
   leans towards groups), and its proposal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .core.adaptive import (PiecewiseProposal, RoundingMap, cell_masses, choose_rounding, fit_proposal,
                            pair_variance, predicted_variance, smooth)
from .core.errors import ErrorOptions
from .core.grid import DiscreteGrid
from .core.noise import seed_from
from .core.pipeline import Estimator, Pass, Sampling

MIN_PILOT_CALLS = 16  # calls per pilot example, at least (four antithetic groups)


@dataclass(frozen=True)
class Tuning:
    """A fit of the estimator: its log-SNR proposal, call layout and (discrete data) rounding map.

    ``pilot``: what the pilot spent and measured (``examples``, ``calls_per_example``,
    ``calls``, ``mix`` of the default proposal, predicted variances); informative only.
    """

    proposal: PiecewiseProposal
    antithetic: bool
    rounding: RoundingMap | None = None
    pilot: dict | None = None

    def to_dict(self) -> dict:
        """JSON-able description (saved in ``Results.config["tuning"]``)."""
        return {"proposal": self.proposal.to_dict(), "antithetic": self.antithetic,
                "rounding": None if self.rounding is None else self.rounding.to_dict(), "pilot": self.pilot or {}}

    def identity(self) -> dict:
        """What a resumed evaluation must match: the fit itself (not the pilot's statistics)."""
        out = self.to_dict()
        out.pop("pilot")
        return out


def _pilot_layout(n_calls: int, n_examples: int, calls_per_example: int | None) -> tuple[int, int]:
    """``(examples, calls per example)`` of a pilot of at most ``n_calls`` calls."""
    if isinstance(n_calls, bool) or int(n_calls) != n_calls or n_calls < MIN_PILOT_CALLS:
        raise ValueError(f"a pilot needs at least {MIN_PILOT_CALLS} calls, got n_calls={n_calls!r}")
    n_calls = int(n_calls)
    per = max(MIN_PILOT_CALLS, n_calls // n_examples if calls_per_example is None else int(calls_per_example))
    per = min(-(-per // 4) * 4, n_calls // 4 * 4)
    return max(1, min(n_examples, n_calls // per)), per


@torch.no_grad()
def pilot_errors(model, x: torch.Tensor, calls: int, seed: int, discrete: DiscreteGrid | None, batch_size=None):
    """Per-call errors ``(B, calls)`` and their log-SNR of an antithetic, stratified pilot."""
    estimator = Estimator(model.logsnr_proposal(), Sampling(calls, True, "stratified"), discrete,
                          split=model.discrete_split(), batch_size=batch_size)
    roundings = ("hard", "soft") if discrete is not None else ()
    passes = (Pass("data", False, ErrorOptions(discrete, roundings, None, batch_size)),)
    m = estimator.measure(model, model.spectrum, x, seed=seed, passes=passes, per_call=True)
    logsnr = m.quadrature.logsnr.expand(len(x), -1).repeat_interleave(4, dim=1)[:, :calls]
    return estimator, m.errors["data"], logsnr.cpu()


def _layout_fit(points: torch.Tensor, streams: list[torch.Tensor], base, n_points: int, gen):
    """Proposal and predicted variance of one layout: ``streams``, one or more ``(B, n)`` arrays
    of per-point values at the pilot's ``points`` ``(B, n)``, give both the second moments
    (all of them pooled) and, from neighbour differences, the variance ``v``."""
    proposal, info = fit_proposal(points.repeat(1, len(streams)).reshape(-1), torch.cat(streams, 1).reshape(-1),
                                  base, generator=gen)
    edges = torch.tensor(proposal.edges, dtype=torch.float64)
    centres = 0.5 * (edges[1:] + edges[:-1])
    mids, half_sq = zip(*(pair_variance(points, s) for s in streams))
    v = smooth(centres, torch.cat(mids), torch.cat(half_sq), info["bandwidth"])
    default = PiecewiseProposal(proposal.edges, cell_masses(base, edges).tolist())
    return proposal, info, predicted_variance(proposal, centres, v, n_points), \
        predicted_variance(default, centres, v, n_points)


def _stratified_variance(points: torch.Tensor, summands: torch.Tensor) -> float:
    """Variance of the pilot's stratified estimate ``mean_i summands_i`` ``(B, n)``, from pairs of
    neighbouring strata (the successive-difference estimator), averaged over examples."""
    order = points.argsort(-1)
    g = summands.gather(-1, order)
    n = g.shape[1] // 2 * 2
    if n < 2:
        return float("inf")
    diff = g[:, 0:n:2] - g[:, 1:n:2]
    return float((diff**2).sum(-1).mean()) / g.shape[1] ** 2


def tune(model, x_pilot: torch.Tensor, n_calls: int, *, generator: torch.Generator | None = None,
         discrete: DiscreteGrid | None = None, calls_per_example: int | None = None,
         batch_size: int | None = None) -> Tuning:
    """Fit the estimator of ``model`` on ``x_pilot`` ``(P, *shape)`` with at most ``n_calls`` calls.

    ``calls_per_example``: the calls per example of the evaluation to come (the pilot then
    measures at that resolution; default ``n_calls // P``).  See the module docstring.
    """
    model.check_data(x_pilot, discrete, name="pilot data")
    n_ex, per = _pilot_layout(n_calls, len(x_pilot), calls_per_example)
    seed = seed_from(generator)
    gen = torch.Generator().manual_seed(seed % (2**63))
    estimator, errs, call_logsnr = pilot_errors(model, x_pilot[:n_ex], per, seed, discrete, batch_size)
    base = estimator.proposal
    rounding, f = None, (errs.raw - errs.gauss).cpu()
    if discrete is not None:
        errs = errs.map(lambda t: t.cpu())
        rounding = choose_rounding(call_logsnr.reshape(-1), errs.map(lambda t: t.reshape(-1)), base.lo, base.hi)
        below = (call_logsnr < estimator.split).double()
        f = rounding.select(errs, call_logsnr) - below * errs.gauss
    groups, points = f.reshape(n_ex, -1, 4), call_logsnr[:, ::4]
    n_eval = per if calls_per_example is None else int(calls_per_example)
    anti = _layout_fit(points, [groups.mean(-1)], base, -(-n_eval // 4), gen)
    single = _layout_fit(points, [groups[..., j] for j in range(4)], base, n_eval, gen)
    weights = base.inverse_density(points)
    var_groups = _stratified_variance(points, groups.mean(-1) * weights)
    var_points = sum(_stratified_variance(points, groups[..., j] * weights) for j in range(4)) / 16
    antithetic = var_groups <= var_points
    proposal, info = (anti if antithetic else single)[:2]
    pilot = {"examples": n_ex, "calls_per_example": per, "calls": n_ex * per, "mix": info["mix"],
             "estimate_variance": {"groups": var_groups, "points": var_points}}
    if discrete is not None:
        pilot["rounding_regions"] = {r: rounding.choices.count(r) for r in ("none", "hard", "soft")}
    return Tuning(proposal, bool(antithetic), rounding, pilot)


# ============================================================================ buffers
BUFFERS = ("tuned_edges", "tuned_masses", "tuned_rounding_edges", "tuned_rounding_codes", "tuned_layout")


def to_buffers(tuning: Tuning | None) -> dict[str, torch.Tensor]:
    """The fit as float64 tensors (empty when untuned) for a module's buffers."""
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    if tuning is None:
        return {name: torch.zeros(0, dtype=torch.float64) for name in BUFFERS}
    pilot = tuning.pilot or {}
    rounding = tuning.rounding
    codes = [] if rounding is None else [("none", "hard", "soft").index(c) for c in rounding.choices]
    return {
        "tuned_edges": f64(tuning.proposal.edges), "tuned_masses": f64(tuning.proposal.masses),
        "tuned_rounding_edges": f64([] if rounding is None else rounding.edges), "tuned_rounding_codes": f64(codes),
        "tuned_layout": f64([float(tuning.antithetic), pilot.get("examples", 0), pilot.get("calls_per_example", 0),
                             pilot.get("calls", 0), pilot.get("mix", math.nan)]),
    }


def from_buffers(buffers: dict[str, torch.Tensor]) -> Tuning | None:
    """The fit held in :func:`to_buffers`' tensors, or ``None``."""
    if buffers["tuned_edges"].numel() == 0:
        return None
    codes = buffers["tuned_rounding_codes"].tolist()
    rounding = None if not codes else RoundingMap(buffers["tuned_rounding_edges"].tolist(),
                                                  tuple(("none", "hard", "soft")[int(c)] for c in codes))
    layout = buffers["tuned_layout"].tolist()
    pilot = {"examples": int(layout[1]), "calls_per_example": int(layout[2]), "calls": int(layout[3]), "mix": layout[4]}
    proposal = PiecewiseProposal(buffers["tuned_edges"].tolist(), buffers["tuned_masses"].tolist())
    return Tuning(proposal, bool(layout[0]), rounding, pilot)
