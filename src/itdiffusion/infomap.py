"""Information maps: ``-log p(x)`` split over the data's dimensions (where an image's bits are).

:func:`nll_map` measures per-dimension errors through the one pipeline (the pass's
``ErrorOptions(per_dim=True)``) at the same noise and points as
:meth:`~itdiffusion.model.ITDiffusion.nll` with the same seed and settings, so the map sums to
that estimate (to float rounding).  Continuous data: the map is
``offset_i + 1/2 Int (err_i - err_g,i) da`` per dimension ``i``, with the Gaussian offset
``-log N(x)`` split in the spectrum's eigen-basis and assigned to dimensions by the squared
eigenvector entries (see :mod:`itdiffusion.core.perdim`).  Discrete data: the per-dimension
integral of the bound itself (rounded errors), with its Gaussian part below the split and the
right-tail bound assigned the same way.  A dimension's value can be negative for continuous
data (a density above one there); maps in bits are the values divided by ``log 2``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .core import perdim
from .core.pipeline import Estimator

__all__ = ["nll_map", "mi_map"]

# (example, point, dimension) float64 values held at once per error kind: examples are measured
# in blocks under this size (the map is small; the per-point, per-dimension errors are not).
_MAP_BUDGET = 2**24


def _per_dim_pass(estimator: Estimator, name: str = "data", y=None):
    base = estimator.data_pass()
    return replace(base, name=name, y=y, options=replace(base.options, per_dim=True))


def _integrand(estimator: Estimator, spectrum, x, errs, quad) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offset (B, d), values (B, m, d))`` of the estimate per dimension."""
    if estimator.discrete is None:
        return perdim.continuous_offset(spectrum, x), errs.raw - errs.gauss
    logsnr = quad.logsnr.to(x.device).unsqueeze(-1)
    if estimator.rounding == "auto":
        err = estimator.rounding_map.select(errs, logsnr)
    else:
        err = errs.rounded(estimator.rounding)
    below = (logsnr < estimator.split).to(err.dtype)
    offset = perdim.discrete_offset(spectrum, estimator.discrete, x, estimator.split, quad.hi)
    return offset, err - below * errs.gauss


def _blocks(estimator: Estimator, x: torch.Tensor):
    per_example = estimator.sampling.n_points * max(1, x[0].numel())
    step = max(1, _MAP_BUDGET // per_example)
    return range(0, len(x), step), step


@torch.no_grad()
def nll_map(model, x: torch.Tensor, estimator: Estimator, *, seed: int, y=None) -> torch.Tensor:
    """Per-dimension contributions to ``-log p(x)`` (``-log p(x | y)``) in nats, ``(B, *shape)`` float64.

    ``map.flatten(1).sum(1)`` equals ``estimator.nll(model, spectrum, x, seed=seed, y=y)``.
    """
    spectrum, out = model.spectrum, []
    starts, step = _blocks(estimator, x)
    for start in starts:
        xb = x[start : start + step]
        yb = None if y is None else y[start : start + step]
        m = estimator.measure(model, spectrum, xb, seed=seed, first_index=start,
                              passes=(_per_dim_pass(estimator, y=yb),))
        offset, values = _integrand(estimator, spectrum, xb, m.errors["data"], m.quadrature)
        out.append(offset + 0.5 * perdim.integrate(m.quadrature.weights, values))
    return torch.cat(out).reshape(len(x), *x.shape[1:])


@torch.no_grad()
def mi_map(model, x: torch.Tensor, y: torch.Tensor, estimator: Estimator, *, seed: int) -> torch.Tensor:
    """Per-dimension contributions to ``i(x; y)`` in nats, ``(B, *shape)`` float64 (they sum to
    :func:`itdiffusion.conditional.mutual_information` at the same seed): the unconditional and
    conditional per-dimension error curves on the same noise, their difference integrated."""
    spectrum, out = model.spectrum, []
    starts, step = _blocks(estimator, x)
    for start in starts:
        xb, yb = x[start : start + step], y[start : start + step]
        passes = (_per_dim_pass(estimator, "uncond"), _per_dim_pass(estimator, "cond", yb))
        m = estimator.measure(model, spectrum, xb, seed=seed, first_index=start, passes=passes)
        _, v_u = _integrand(estimator, spectrum, xb, m.errors["uncond"], m.quadrature)
        _, v_c = _integrand(estimator, spectrum, xb, m.errors["cond"], m.quadrature)
        out.append(0.5 * perdim.integrate(m.quadrature.weights, v_u - v_c))
    return torch.cat(out).reshape(len(x), *x.shape[1:])
