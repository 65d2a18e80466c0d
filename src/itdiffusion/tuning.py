"""Fitting the estimator to the data on a pilot: ``ITDiffusion.tune`` (see :mod:`itdiffusion.core.adaptive`).

The pilot spends at most ``n_calls`` denoiser calls on pilot examples (never the examples
that are then evaluated): at ``k`` stratified points of the model's default proposal per
example, two antithetic groups of four calls each, so that the noise variance of one group
mean and of one call is measured directly at every point (:class:`~itdiffusion.core.adaptive.PilotValues`).
From it:

1. for discrete data, the rounding of each log-SNR region (:func:`~itdiffusion.core.adaptive.choose_rounding`):
   the choice depends on the pilot only, so the estimate stays an upper bound;
2. the proposal and the layout (antithetic groups of four at ``n/4`` points, or one call at each
   of ``n`` points) with the lowest predicted variance under the stratified sampling used,
   noise and mean-curve shape both counted (:func:`~itdiffusion.core.adaptive.choose_proposal`);
   the default proposal and layout are kept unless a fit predicts a clear gain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .core.adaptive import PiecewiseProposal, PilotValues, RoundingMap, choose_proposal, choose_rounding
from .core.errors import Errors
from .core.grid import DiscreteGrid
from .core.noise import NOISE_BUDGET, CallLayout, seed_from
from .core.proposal import fractions

MIN_PILOT_CALLS = 16  # calls per pilot example, at least (two points of two antithetic groups of four)
PILOT_CALLS_PER_POINT = 8  # two antithetic groups of four


@dataclass(frozen=True)
class Tuning:
    """A fit of the estimator: its log-SNR proposal, call layout and (discrete data) rounding map.

    ``proposal``: the fitted proposal, or ``None`` for the model's default (logistic) one.

    ``pilot``: what the pilot spent and measured (``examples``, ``calls_per_example``,
    ``calls``, ``mix`` of the default proposal, predicted variances); informative only.
    """

    proposal: PiecewiseProposal | None
    antithetic: bool
    rounding: RoundingMap | None = None
    pilot: dict | None = None

    def to_dict(self) -> dict:
        """JSON-able description (saved in ``Results.config["tuning"]``)."""
        return {"proposal": {"kind": "default"} if self.proposal is None else self.proposal.to_dict(), "antithetic": self.antithetic,
                "rounding": None if self.rounding is None else self.rounding.to_dict(), "pilot": self.pilot or {}}

    def identity(self) -> dict:
        """What a resumed evaluation must match: the fit itself (not the pilot's statistics)."""
        out = self.to_dict()
        out.pop("pilot")
        return out


def _pilot_layout(n_calls: int, n_examples: int, calls_per_example: int | None) -> tuple[int, int]:
    """``(examples, calls per example)`` of a pilot of at most ``n_calls`` calls (a multiple of 8 per example)."""
    if isinstance(n_calls, bool) or int(n_calls) != n_calls or n_calls < MIN_PILOT_CALLS:
        raise ValueError(f"a pilot needs at least {MIN_PILOT_CALLS} calls, got n_calls={n_calls!r}")
    n_calls, step = int(n_calls), PILOT_CALLS_PER_POINT
    per = max(MIN_PILOT_CALLS, n_calls // n_examples if calls_per_example is None else int(calls_per_example))
    per = min(-(-per // step) * step, n_calls // step * step)
    return max(1, min(n_examples, n_calls // per)), per


@torch.no_grad()
def pilot_errors(model, x: torch.Tensor, calls: int, generator: torch.Generator, discrete: DiscreteGrid | None,
                 batch_size=None) -> tuple[torch.Tensor, Errors]:
    """Points ``(B, k)`` and errors ``(B, k, 2, 4)`` of two antithetic groups of four calls at each of
    ``k = calls // 8`` stratified points of the default proposal per example (noise from ``generator``)."""
    k = calls // PILOT_CALLS_PER_POINT
    logsnr, _ = model.logsnr_proposal().quantile(
        fractions(k, "stratified", torch.rand(len(x), k, generator=generator, dtype=torch.float64)))
    layout = CallLayout(PILOT_CALLS_PER_POINT * k, True)
    roundings = ("hard", "soft") if discrete is not None else ()
    chunk = max(1, NOISE_BUDGET // (PILOT_CALLS_PER_POINT * k * model.d))
    parts = []
    for start in range(0, len(x), chunk):
        xs = x[start:start + chunk]
        eps = torch.randn((len(xs), 2 * k, *model.shape), generator=generator, dtype=x.dtype).to(x.device)
        a = logsnr[start:start + chunk].repeat_interleave(PILOT_CALLS_PER_POINT, dim=1).to(x.device)
        errs = model.point_errors(xs, a, layout.call_noise(eps), discrete=discrete, roundings=roundings,
                                  batch_size=batch_size)
        parts.append(errs.map(lambda t: t.double().cpu().reshape(len(xs), k, 2, 4)))
    return logsnr, Errors.cat(parts)


def tune(model, x_pilot: torch.Tensor, n_calls: int, *, generator: torch.Generator | None = None,
         discrete: DiscreteGrid | None = None, calls_per_example: int | None = None,
         batch_size: int | None = None) -> Tuning:
    """Fit the estimator of ``model`` on ``x_pilot`` ``(P, *shape)`` with at most ``n_calls`` calls.

    ``calls_per_example``: the calls per example of the evaluation to come (the pilot then
    measures at that resolution and the fit is scored at it; default ``n_calls // P``).
    See the module docstring.
    """
    from .model import default_antithetic

    model.check_data(x_pilot, discrete, name="pilot data")
    n_ex, per = _pilot_layout(n_calls, len(x_pilot), calls_per_example)
    seed = seed_from(generator)
    gen = torch.Generator().manual_seed(seed % (2**63))
    logsnr, errs = pilot_errors(model, x_pilot[:n_ex], per, gen, discrete, batch_size)
    call_logsnr = logsnr[..., None, None].expand(errs.raw.shape)
    rounding, f = None, errs.raw - errs.gauss
    if discrete is not None:
        flat = errs.map(lambda t: t.reshape(-1))
        rounding = choose_rounding(call_logsnr.reshape(-1), flat, *model.logsnr_range())
        below = (call_logsnr < model.discrete_split()).double()
        f = rounding.select(errs, call_logsnr) - below * errs.gauss
    n_eval = per if calls_per_example is None else int(calls_per_example)
    proposal, antithetic, info = choose_proposal(model.logsnr_proposal(), PilotValues.from_calls(logsnr, f), n_eval,
                                                 default_antithetic(discrete), generator=gen)
    pilot = {"examples": n_ex, "calls_per_example": per, "calls": n_ex * per, "mix": info["mix"],
             "predicted_variance": {"chosen": info["scores"][f"{info['layout']}:{info['mix']}"],
                                    "default": info["default_score"]}}
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
        # the default proposal: one edge and no masses
        "tuned_edges": f64([0.0] if tuning.proposal is None else tuning.proposal.edges),
        "tuned_masses": f64([] if tuning.proposal is None else tuning.proposal.masses),
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
    masses = buffers["tuned_masses"]
    proposal = None if masses.numel() == 0 else PiecewiseProposal(buffers["tuned_edges"].tolist(), masses.tolist())
    return Tuning(proposal, bool(layout[0]), rounding, pilot)
