"""The variance-preserving Gaussian channel, parameterised by log-SNR ``a``.

    z = sqrt(sigmoid(a)) * x + sqrt(sigmoid(-a)) * eps,      eps ~ N(0, I)

so that ``snr = e^a``.  All functions broadcast a per-example ``logsnr`` of shape ``(B,)``
against tensors of shape ``(B, *shape)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand(logsnr: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape ``(B,)`` log-SNR to broadcast against ``like`` of shape ``(B, *shape)``."""
    return logsnr.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal and noise scales ``(sqrt(sigmoid(a)), sqrt(sigmoid(-a)))``, stable for large |a|."""
    return torch.exp(0.5 * F.logsigmoid(logsnr)), torch.exp(0.5 * F.logsigmoid(-logsnr))


def add_noise(x: torch.Tensor, logsnr: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The channel output ``z`` (shape of ``x``) for data ``x``, log-SNR ``(B,)`` and noise ``eps``."""
    alpha, sigma = alpha_sigma(_expand(logsnr, x))
    return alpha * x + sigma * eps


def x_from_eps(z: torch.Tensor, eps_hat: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """Denoised estimate ``x_hat = (z - sigma * eps_hat) / alpha``.

    Written as ``sqrt(1 + e^-a) z - e^(-a/2) eps_hat`` to avoid dividing by a vanishing alpha.
    """
    a = _expand(logsnr, z)
    return torch.exp(0.5 * F.softplus(-a)) * z - torch.exp(-0.5 * a) * eps_hat


def eps_from_x(z: torch.Tensor, x_hat: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """Noise estimate ``eps_hat = (z - alpha * x_hat) / sigma`` (inverse of :func:`x_from_eps`)."""
    a = _expand(logsnr, z)
    return torch.exp(0.5 * F.softplus(a)) * z - torch.exp(0.5 * a) * x_hat
