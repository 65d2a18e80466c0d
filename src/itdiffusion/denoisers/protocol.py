"""The `Denoiser` protocol: what the package calls on a denoiser, and the optional facts an adapter may expose.

Required: ``denoiser(z, logsnr) -> eps_hat``, with ``z`` ``(B, *shape)`` noisy data of the
channel ``z = sqrt(sigmoid(a)) x + sqrt(sigmoid(-a)) eps``, ``logsnr`` ``(B,)`` (its ``a``)
and ``eps_hat`` ``(B, *shape)`` in ``z``'s dtype and device.  Row ``i`` of the output
depends only on row ``i`` of the input.

Optional, read only through the functions below (never through an adapter's internals):

- ``logsnr_range``: ``(lo, hi)`` log-SNRs the network was trained on (a property);
- ``alphas_cumprod``: ``(T,)`` float64 ``alpha_bar_t`` of the network's own discrete schedule;
- ``variance_type``: ``"fixed_small"``, ``"fixed_large"`` or ``"learned"`` (the reverse-step
  variances it was trained with), or ``None`` when unknown;
- ``eps_and_variance(z, logsnr) -> (eps_hat, v)``: one network call giving ``eps_hat`` and
  IDDPM's variance output ``v`` in [-1, 1] (``variance_type == "learned"`` only).
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

import torch

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned")


@runtime_checkable
class Denoiser(Protocol):
    """``f(z, logsnr) -> eps_hat``: ``(B, *shape), (B,) -> (B, *shape)`` (see the module docstring)."""

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor: ...


def logsnr_range_of(denoiser) -> Optional[tuple[float, float]]:
    """The denoiser's trained ``(lo, hi)`` log-SNR range, or ``None`` when it does not say."""
    value = getattr(denoiser, "logsnr_range", None)
    return None if value is None or callable(value) else (float(value[0]), float(value[1]))


def alphas_cumprod_of(denoiser) -> Optional[torch.Tensor]:
    """The denoiser's own ``alpha_bar_t`` ``(T,)`` float64, or ``None`` when it has no schedule."""
    abar = getattr(denoiser, "alphas_cumprod", None)
    return None if abar is None else torch.as_tensor(abar, dtype=torch.float64)


def variance_type_of(denoiser) -> Optional[str]:
    """The denoiser's reverse-step variance type (one of :data:`VARIANCE_TYPES`), or ``None``."""
    kind = getattr(denoiser, "variance_type", None)
    return kind if kind in VARIANCE_TYPES else None


def eps_and_variance_of(denoiser) -> Optional[Callable]:
    """``f(z, logsnr) -> (eps_hat, v)`` when the denoiser has a learned variance output, else ``None``."""
    method = getattr(denoiser, "eps_and_variance", None)
    return method if callable(method) and variance_type_of(denoiser) == "learned" else None
