"""Conditional uses of one denoiser: pointwise mutual information and zero-shot classification.

With a conditional denoiser ``f(z, logsnr, y=None)`` the identity that gives ``-log p(x)`` gives
``-log p(x | y)`` too.  Measured on the *same* noise and log-SNR points (one
:meth:`~itdiffusion.core.pipeline.Estimator.measure`, one pass per condition), the closed-form
offset and the Gaussian control variate are identical for every condition and cancel in every
difference, so

    i(x; y) = log p(x | y) - log p(x) = 1/2 Int (mmse(x, a) - mmse(x, a | y)) da

is estimated from the difference of the two error curves alone (each a control variate of the
other), and the ``(B, K)`` table ``log p(x | y_k)`` of :func:`class_log_likelihoods` has errors
that are strongly correlated across candidates (Kong et al., ICLR 2024; Li et al., 2023).

**Standard errors.**  An estimate is ``offset + mean_i t_i`` over the ``m`` points of an
example, ``t_i = 1/2 m w_i v_i`` (``w`` the quadrature weights, ``v`` the integrand).  Its
standard error is ``std(t) / sqrt(m)``: exact for i.i.d. points, conservative (too large) for
stratified points.  The integral is taken over the estimator's log-SNR range; outside it both
curves are the Gaussian's, so a difference gets nothing there.

For discrete data (``discrete=`` a grid) the same differences are taken of the discrete bounds
(rounding included); the result estimates the difference of two bounds, exact when both are tight.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .core.noise import example_seed
from .core.pipeline import Estimator, Pass

__all__ = ["point_terms", "mutual_information", "class_log_likelihoods"]

MIN_POINTS_TO_DROP = 8  # points seen before a candidate may be dropped (fewer give no usable standard error)


def point_terms(estimator: Estimator, spectrum, x, measurement, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offset (B,), t (B, m))`` of pass ``name``: its estimate is ``offset + t.mean(1)`` nats."""
    quad = measurement.quadrature
    terms = estimator.integrand(spectrum, x, measurement.errors[name], quad)
    weights = quad.weights.to(terms.values.device).expand_as(terms.values)
    return terms.offset, 0.5 * terms.values.shape[1] * weights * terms.values


def mean_se(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the last axis and its standard error ``std / sqrt(m)`` (zero for one point)."""
    m = t.shape[-1]
    se = t.std(-1) / math.sqrt(m) if m > 1 else torch.zeros_like(t[..., 0])
    return t.mean(-1), se


def _condition_passes(estimator: Estimator, conditions: dict) -> tuple[Pass, ...]:
    base = estimator.data_pass()
    return tuple(replace(base, name=name, y=y) for name, y in conditions.items())


@torch.no_grad()
def mutual_information(model, x: torch.Tensor, y, estimator: Estimator, *, seed: int):
    """Per-example ``i(x; y)`` in nats and its standard error, ``((B,), (B,))`` float64.

    ``model``: an :class:`~itdiffusion.model.ITDiffusion` with a conditional denoiser; ``y`` the
    condition of each example (see :meth:`~itdiffusion.model.ITDiffusion.condition`).
    """
    cond = model.condition(y, x)
    spectrum = model.spectrum
    m = estimator.measure(model, spectrum, x, seed=seed,
                          passes=_condition_passes(estimator, {"uncond": None, "cond": cond}))
    _, t_u = point_terms(estimator, spectrum, x, m, "uncond")
    _, t_c = point_terms(estimator, spectrum, x, m, "cond")
    return mean_se(t_u - t_c)


def _labels(model, labels, x) -> list:
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = list(range(labels))
    labels = list(labels)
    if not labels:
        raise ValueError("classify needs at least one candidate label")
    return [model.condition(label, x) for label in labels]


@torch.no_grad()
def class_log_likelihoods(model, x: torch.Tensor, labels, estimator: Estimator, *, seed: int,
                          early_drop: float | None = None, rounds: int = 4):
    """``(scores (B, K), calls (B, K))``: ``log p(x | y_k)`` in nats and the network calls spent on each.

    Every candidate is measured on the same noise and points.  ``labels``: ``K`` candidate
    conditions (ints, or tensors one per example), or an int ``K`` for ``0..K-1``.  For
    continuous data the scores are ``log p(x | y_k)`` (the shared constant is zero); for
    discrete data minus the bounds.  ``softmax(scores, 1)`` is ``p(y | x)`` under a uniform prior.

    ``early_drop``: spend the calls in ``rounds`` rounds (each an estimate over the whole range
    on its own noise, from ``seed`` and the round); after each round a candidate whose running
    ``-log p(x | y_k)`` is behind the leader's by more than ``early_drop`` standard errors of
    their paired difference is dropped, and keeps the estimate of the rounds it was measured
    in, capped at the lowest survivor's (so the decision is a survivor).  No candidate is dropped
    before ``MIN_POINTS_TO_DROP`` points.  ``None`` (default): all candidates get every call, in one round.
    """
    conditions = _labels(model, labels, x)
    if early_drop is None:
        names = {f"y{k}": c for k, c in enumerate(conditions)}
        m = estimator.measure(model, model.spectrum, x, seed=seed, passes=_condition_passes(estimator, names))
        scores = []
        for name in names:
            offset, t = point_terms(estimator, model.spectrum, x, m, name)
            scores.append(-(offset + t.mean(1)))
        calls = torch.full((len(x), len(conditions)), estimator.sampling.n_calls, dtype=torch.long)
        return torch.stack(scores, 1), calls
    if not early_drop > 0 or int(rounds) != rounds or rounds < 1:
        raise ValueError(f"early_drop must be a positive number of standard errors and rounds a positive int, "
                         f"got {early_drop!r} and {rounds!r}")
    per_round = estimator.with_sampling(n_calls=max(1, -(-estimator.sampling.n_calls // int(rounds))))
    return _early_drop(model, x, conditions, per_round, seed, float(early_drop), int(rounds))


def _early_drop(model, x, conditions: list, estimator: Estimator, seed: int, z: float, rounds: int):
    """Rounds of calls on the candidates still in the running for each example (each round on its own
    noise from ``seed`` and the round; within a round, shared by the candidates)."""
    n, k, m = len(x), len(conditions), estimator.sampling.n_points
    active = torch.ones(n, k, dtype=torch.bool)
    terms = torch.full((n, k, rounds * m), float("nan"), dtype=torch.float64)
    offset = torch.zeros(n, dtype=torch.float64)
    for r in range(rounds):
        for j in range(k):
            rows = active[:, j].nonzero()[:, 0]
            if len(rows) == 0:
                continue
            dev_rows = rows.to(x.device)
            passes = _condition_passes(estimator, {"y": conditions[j][dev_rows]})
            meas = estimator.measure(model, model.spectrum, x[dev_rows], seed=example_seed(seed, r),
                                     indices=rows.tolist(), passes=passes)
            off, t = point_terms(estimator, model.spectrum, x[dev_rows], meas, "y")
            terms[rows, j, r * m : (r + 1) * m] = t.cpu()
            offset[rows] = off.cpu()
        if r < rounds - 1 and (r + 1) * m >= MIN_POINTS_TO_DROP:
            active &= ~_behind(terms[:, :, : (r + 1) * m], active, z)
    calls = (~terms[:, :, ::m].isnan()).sum(2) * estimator.sampling.n_calls
    scores = -(offset[:, None] + terms.nanmean(2))
    # A dropped candidate keeps its estimate, capped at the lowest survivor's: the decision is a survivor.
    floor = torch.where(active, scores, torch.full_like(scores, float("inf"))).min(1, keepdim=True).values
    return torch.where(active, scores, torch.minimum(scores, floor)).to(x.device), calls


def _behind(terms: torch.Tensor, active: torch.Tensor, z: float) -> torch.Tensor:
    """``(B, K)``: active candidates whose running ``-log p`` exceeds the leader's (the lowest) by more
    than ``z`` standard errors of their paired difference over the points seen, ``terms (B, K, s)``."""
    means = torch.where(active, terms.mean(2), torch.full_like(terms[:, :, 0], float("inf")))
    lead = means.argmin(1)
    diff = terms - terms[torch.arange(len(terms)), lead][:, None]
    mean, se = mean_se(diff)
    return active & (mean > z * se) & (se > 0)
