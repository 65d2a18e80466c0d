"""Turning per-point denoising errors into likelihood estimates.

Every estimate has the form

    nll(x) = offset(x) + 1/2 * sum_i weights_i * integrand(x, a_i)

with ``offset`` a closed-form term and ``integrand`` built from epsilon-form squared errors
of the model (``err``) and of the Gaussian-optimal denoiser on the *same* noise
(``err_g``), which serves as a control variate:

- **continuous**: ``offset = -log N(x)``, ``integrand = err - err_g``.  Exact because the
  Gaussian's own pointwise identity ``-log N(x) = h_g + 1/2 Int (E err_g(x, a) - mmse_g(a)) da``
  cancels against the reference form ``h_g + 1/2 Int (mmse(x, a) - mmse_g(a)) da``.
  Outside the integration range the Gaussian denoiser is used, so nothing is added.
- **discrete**: no constant.  The Gaussian control variate is used below a split point
  ``a_s`` and the model alone above it (where rounding drives the error to zero while
  ``err_g`` stays near ``d``): ``offset = 1/2 G(x, a_s) + R(a_hi)``,
  ``integrand = err - [a < a_s] err_g``, with ``G`` the closed-form integral of the
  Gaussian denoiser's expected error from ``-inf`` (which also covers the left tail) and
  ``R`` the right-tail bound of :func:`itdiffusion.core.grid.right_tail_bound`.

``gauss`` is the integrand the Gaussian denoiser itself would have (zero for the
continuous form); taking ``min(integrand, gauss)`` per point on averaged curves gives the
"Gaussian-clamped" estimate and ensembles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import DiscreteGrid, right_tail_bound
from .proposal import Quadrature
from .spectrum import GaussianSpectrum


@dataclass
class Integrand:
    """Offset ``(B,)`` nats, integrand and Gaussian integrand ``(B, n)`` (eps-form errors)."""

    offset: torch.Tensor
    values: torch.Tensor
    gauss: torch.Tensor

    def integrate(self, quad: Quadrature) -> torch.Tensor:
        """Per-example estimate ``offset + 1/2 sum_i w_i values_i`` in nats, ``(B,)`` float64."""
        return self.offset + 0.5 * quad.integrate(self.values)


def continuous(spectrum: GaussianSpectrum, x: torch.Tensor, err: torch.Tensor, err_g: torch.Tensor) -> Integrand:
    """Terms of ``-log p(x)`` for continuous data (see module docstring)."""
    offset = -spectrum.log_prob(x).to(err.device)
    return Integrand(offset=offset, values=err - err_g, gauss=torch.zeros_like(err))


def discrete(
    spectrum: GaussianSpectrum,
    grid: DiscreteGrid,
    x: torch.Tensor,
    err: torch.Tensor,
    err_g: torch.Tensor,
    logsnr: torch.Tensor,
    split: float,
    logsnr_hi: float,
) -> Integrand:
    """Terms of the upper bound on ``-log P(x)`` for data on ``grid`` (see module docstring).

    ``logsnr`` is ``(n,)`` or ``(B, n)``; ``split`` must lie inside the integration range.
    """
    below = (logsnr < split).to(err.dtype).expand_as(err)
    offset = 0.5 * spectrum.error_integral(x, split).to(err.device)
    offset = offset + right_tail_bound(logsnr_hi, grid, spectrum.d).to(err.device)
    return Integrand(offset=offset, values=err - below * err_g, gauss=(1.0 - below) * err_g)
