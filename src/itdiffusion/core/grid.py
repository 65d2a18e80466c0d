"""Discrete data on an evenly spaced grid: rounding, soft rounding and the right-tail bound.

Rounding is done in *index space* (``k = (x - lo) / delta``): the error of a rounded
estimate is then an exact multiple of ``delta`` and stays exact at very high log-SNR,
where ``e^a`` multiplies it by up to ``1e8``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import softround


@dataclass(frozen=True)
class DiscreteGrid:
    """``levels`` evenly spaced values from ``lo`` to ``hi`` in every coordinate.

    8-bit images scaled to [-1, 1] are ``DiscreteGrid(-1.0, 1.0, 256)`` (``delta = 2/255``).
    """

    lo: float = -1.0
    hi: float = 1.0
    levels: int = 256

    def __post_init__(self):
        if int(self.levels) != self.levels or self.levels < 2:
            raise ValueError(f"a grid needs at least 2 levels, got {self.levels!r}")
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.hi > self.lo):
            raise ValueError(f"grid bounds must be finite with lo < hi, got ({self.lo}, {self.hi})")

    @property
    def delta(self) -> float:
        """Spacing between neighbouring grid values."""
        return (self.hi - self.lo) / (self.levels - 1)

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous grid coordinate ``(x - lo) / delta`` (same shape and dtype as ``x``)."""
        return (x - self.lo) / self.delta

    def value(self, k: torch.Tensor) -> torch.Tensor:
        """Grid value of (possibly fractional) index ``k``."""
        return self.lo + self.delta * k

    def round_index(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest grid value, clamped to ``[0, levels - 1]`` (float tensor)."""
        return self.index(x).round().clamp(0, self.levels - 1)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest grid value of every element (hard rounding)."""
        return self.value(self.round_index(x))

    def check(self, x: torch.Tensor, name: str = "data") -> None:
        """Raise ``ValueError`` unless every element of ``x`` lies on the grid (to 1e-3 delta)."""
        k = self.index(x.detach().double())
        off = (k - k.round()).abs().max().item() if k.numel() else 0.0
        below, above = (k.min().item(), k.max().item()) if k.numel() else (0.0, 0.0)
        if below < -1e-3 or above > self.levels - 1 + 1e-3:
            raise ValueError(
                f"{name} lies outside the grid [{self.lo}, {self.hi}] "
                f"(values from {self.value(torch.tensor(below)).item():.4g} "
                f"to {self.value(torch.tensor(above)).item():.4g})"
            )
        if off > 1e-3:
            raise ValueError(
                f"{name} is off the declared grid of {self.levels} levels on [{self.lo}, {self.hi}] "
                f"(largest distance {off * self.delta:.3g}); pass the right DiscreteGrid or dequantize"
            )

    def soft_round_index(
        self,
        x_hat: torch.Tensor,
        logsnr: torch.Tensor,
        *,
        noise_var: torch.Tensor | None = None,
        max_elements: int | None = None,
    ) -> torch.Tensor:
        """Posterior-mean grid index of each element of ``x_hat`` (float64, ``x_hat``'s shape).

        Treats ``x_hat`` as the grid value observed with Gaussian noise of variance
        ``noise_var`` (default ``e^-a``, the channel's noise level in data units) under a
        uniform prior on the levels: ``E[k] = sum_k k p_k``,
        ``p_k ~ exp(-(x_hat - v_k)^2 / (2 noise_var))``.  Computed without the
        ``(levels, *x_hat.shape)`` weights: a window of levels at high SNR, a closed form at
        low SNR (see :mod:`itdiffusion.core.softround`); equal to the full sum to float64
        tolerance, with temporaries of about ``max_elements`` elements in all (default:
        :func:`itdiffusion.core.softround.default_max_elements` of the device).

        Args:
            x_hat: ``(B, *shape)`` estimates in data units.
            logsnr: ``(B,)`` log-SNR of each example.
            noise_var: ``(B,)`` variance of ``x_hat``'s error per element, data units.
            max_elements: bound on the elements of the temporaries alive at once.
        """
        var = torch.exp(-logsnr.double().reshape(-1)) if noise_var is None else noise_var.double().reshape(-1)
        tau = var.sqrt() / self.delta  # noise std in grid steps
        return softround.soft_round_index(self.levels, self.index(x_hat.double()), tau, max_elements=max_elements)

    def soft_round(self, x_hat: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """Posterior mean over grid values (see :meth:`soft_round_index`), in ``x_hat``'s dtype."""
        return self.value(self.soft_round_index(x_hat, logsnr)).to(x_hat.dtype)


def soft_round_index_dense(
    grid: DiscreteGrid, x_hat: torch.Tensor, logsnr: torch.Tensor, noise_var: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference soft rounding that materialises all ``levels`` weights (for tests and benchmarks).

    Memory ``O(levels * x_hat.numel())``, as in the published code.
    """
    t = grid.index(x_hat.double()).unsqueeze(0)
    var = torch.exp(-logsnr.double()) if noise_var is None else noise_var.double()
    a = -torch.log(var).reshape(1, -1, *([1] * (x_hat.dim() - 1)))
    k = torch.arange(grid.levels, dtype=torch.float64, device=x_hat.device)
    k = k.reshape(-1, *([1] * x_hat.dim()))
    p = torch.softmax(-0.5 * (t - k) ** 2 * torch.exp(a) * grid.delta**2, dim=0)
    return (p * k).sum(0)


def right_tail_bound(logsnr_hi: float | torch.Tensor, grid: DiscreteGrid, d: int) -> torch.Tensor:
    """Upper bound, in nats, on ``1/2 Int_{a_hi}^inf mmse_eps(a) da`` for data on ``grid``.

    Uses the error of a denoiser that needs no network: round ``z / alpha`` to the grid.
    Per coordinate its rounding index error ``K`` satisfies ``P(|K| >= j) <= 2 Q(t_j(a))``
    with ``t_j(a) = (j - 1/2) delta e^(a/2)`` (clamping to the grid only shrinks errors), so
    ``E[K^2] <= sum_j (2j - 1) 2 Q(t_j)``.  Integrating ``e^a delta^2 E[K^2] / 2`` over
    ``[a_hi, inf)`` in closed form (``Int_t0^inf t Q(t) dt = ((1 - t0^2) Q(t0) + t0 phi(t0))/2``)
    gives, in total over ``d`` coordinates,

        d * sum_{j=1}^{levels-1} 2 / (j - 1/2) * [(1 - t_j^2) Q(t_j) + t_j phi(t_j)],

    with ``t_j = t_j(a_hi)``.  Returns a float64 tensor with ``logsnr_hi``'s shape.
    """
    a = torch.as_tensor(logsnr_hi, dtype=torch.float64)
    j_half = torch.arange(1, grid.levels, dtype=torch.float64) - 0.5
    t = j_half * grid.delta * torch.exp(0.5 * a.unsqueeze(-1))
    # (1 - t^2) Q(t) + t phi(t) = e^(-t^2/2) [(1 - t^2) erfcx(t/sqrt2)/2 + t/sqrt(2 pi)]
    bracket = (1.0 - t**2) * 0.5 * torch.special.erfcx(t / math.sqrt(2.0)) + t / math.sqrt(2.0 * math.pi)
    terms = 2.0 / j_half * torch.exp(-0.5 * t**2) * bracket
    return d * terms.sum(-1)
