"""Per-dimension pieces of the likelihood: the estimate of ``-log p(x)`` as a sum over dimensions.

The model's squared error ``||eps - eps_hat||^2`` is a sum over the data's dimensions, so its
integral splits exactly into one term per dimension (pixel and channel).  The Gaussian
reference's closed-form terms (``-log N(x)`` for continuous data, the error integral ``G`` of the
discrete bound) are sums over the *spectrum's eigen-coordinates* instead.  They are assigned to
dimensions with the weights ``U_ij^2`` (``U`` the orthonormal eigenvectors, columns ``j``): the
share of eigenvector ``j``'s energy at dimension ``i``.  Each column of ``U^2`` sums to one, so
the assignment keeps the total exactly; for a diagonal spectrum (``U = I``) it is the dimension
itself.  The Gaussian denoiser's error on the same noise (the control variate) is assigned the
same way (per eigen-coordinate, then ``U^2``), so in expectation it cancels its closed-form
integral dimension by dimension and the map's expectation is, per dimension ``i``,

- discrete data: ``1/2 Int E||eps - eps_hat||_i^2 da``, the model's own error in that dimension
  integrated (the Gaussian enters only left of the range, and the right-tail bound, the same for
  every coordinate, is split evenly);
- continuous data: ``sum_j U_ij^2 h_j + 1/2 Int (E err_i - sum_j U_ij^2 mmse_g,j(a)) da``, the
  Gaussian reference's entropy assigned as above plus the model's excess error in dimension ``i``.

For a product law with its exact denoiser both are the exact ``-log p(x_i)`` of each coordinate.
"""

from __future__ import annotations

import math

import torch

from .grid import DiscreteGrid, right_tail_bound
from .spectrum import GaussianSpectrum, _softplus_minus_sigmoid


def to_dimensions(spectrum: GaussianSpectrum, per_coordinate: torch.Tensor) -> torch.Tensor:
    """Eigen-coordinate terms ``(B, d)`` assigned to the data's dimensions, ``(B, d)`` (same row sums)."""
    if spectrum.eigvecs is None:
        return per_coordinate
    return per_coordinate @ (spectrum.eigvecs**2).T.to(per_coordinate.device)


def neg_log_gauss(spectrum: GaussianSpectrum, x: torch.Tensor) -> torch.Tensor:
    """``-log N(x)`` per eigen-coordinate, ``(B, d)`` float64 (sums to ``-spectrum.log_prob(x)``)."""
    y = spectrum.to_eigenbasis(x)
    return 0.5 * (y * y * torch.exp(-spectrum.log_eigs) + spectrum.log_eigs + math.log(2 * math.pi))


def error_integral(spectrum: GaussianSpectrum, x: torch.Tensor, logsnr: float) -> torch.Tensor:
    """:meth:`GaussianSpectrum.error_integral` per eigen-coordinate, ``(B, d)`` float64."""
    y = spectrum.to_eigenbasis(x)
    u = float(logsnr) + spectrum.log_eigs
    return _softplus_minus_sigmoid(u) + y * y * torch.exp(-spectrum.log_eigs) * torch.sigmoid(u)


def continuous_offset(spectrum: GaussianSpectrum, x: torch.Tensor) -> torch.Tensor:
    """The continuous estimate's offset ``-log N(x)`` per dimension, ``(B, d)``."""
    return to_dimensions(spectrum, neg_log_gauss(spectrum, x))


def discrete_offset(spectrum: GaussianSpectrum, grid: DiscreteGrid, x: torch.Tensor, split: float,
                    logsnr_hi: float) -> torch.Tensor:
    """The discrete bound's offset ``1/2 G(x, a_s) + R(a_hi)`` per dimension, ``(B, d)``."""
    gauss = to_dimensions(spectrum, 0.5 * error_integral(spectrum, x, split))
    return gauss + right_tail_bound(logsnr_hi, grid, spectrum.d).item() / spectrum.d


def integrate(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i values_i`` over the points: weights ``(m,)`` or ``(B, m)``, values ``(B, m, d) -> (B, d)``."""
    w = weights.to(values.device)
    return (w.unsqueeze(-1) * values).sum(-2)
