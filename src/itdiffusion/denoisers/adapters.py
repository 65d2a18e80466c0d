"""Exact changes of variables from other parametrisations to ``f(z, logsnr) -> eps_hat``.

The package's channel is variance preserving: ``z = alpha x + s eps`` with
``alpha = sqrt(sigmoid(a))``, ``s = sqrt(sigmoid(-a))`` and log-SNR ``a``.  Other model
families see the same information through another channel; each adapter maps ``(z, a)``
to that channel, calls the model there, and converts its output back to an epsilon
estimate.  No clamping happens inside an adapter: each is continuous in the log-SNR, and
its trained range is reported as ``logsnr_range`` (``(-inf, inf)`` when not given).

* :class:`KarrasDenoiser`: ``D(x_noisy, sigma) -> x0_hat`` on ``x_noisy = x + sigma eps``
  (EDM, k-diffusion, variance-exploding score models).  ``sigma = exp(-a / 2)`` and
  ``x_noisy = z / alpha = z sqrt(1 + sigma^2)``; ``eps_hat = (x_noisy - x0_hat) / sigma``.
* :class:`FlowDenoiser`: velocity ``v(x_t, t)`` of linear-interpolation flow matching.
  ``data_at=0``: ``x_t = (1 - t) x + t eps``, ``v = eps - x``, ``t = sigmoid(-a / 2)``,
  ``x_t = z / (alpha + s)``, ``eps_hat = x_t + (1 - t) v_hat``.
  ``data_at=1``: ``x_t = t x + (1 - t) eps``, ``v = x - eps``, ``t = sigmoid(a / 2)``,
  ``eps_hat = x_t - t v_hat``.

Everything here is torch only; inputs may have any shape ``(B, *shape)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

__all__ = ["KarrasDenoiser", "FlowDenoiser"]


def _coefficient_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) in ``like``'s dtype, broadcastable against ``like`` (B, *shape)."""
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _logsnr(logsnr, z: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(logsnr, device=z.device)
    return a.expand(z.shape[0]) if a.ndim == 0 else a


class _Wrapped(nn.Module):
    """Holds a callable that may or may not be an ``nn.Module`` (so its parameters are registered)."""

    def __init__(self, fn: Callable):
        super().__init__()
        if isinstance(fn, nn.Module):
            self.net = fn
        else:
            self._fn = fn

    def call(self, *args):
        return self.net(*args) if "net" in self._modules else self._fn(*args)


class KarrasDenoiser(_Wrapped):
    """``f(z, logsnr) -> eps_hat`` from a denoiser ``D(x_noisy, sigma) -> x0_hat``, exactly.

    Args:
        D: ``D(x_noisy (B, *shape), sigma (B,)) -> x0_hat (B, *shape)``, with
            ``x_noisy = x + sigma * eps``; an ``nn.Module`` (its parameters are this
            module's) or any callable.
        sigma_range: ``(sigma_min, sigma_max)`` the model was trained on, reported as
            ``logsnr_range = (-2 log sigma_max, -2 log sigma_min)``; ``None``: unbounded.
    """

    def __init__(self, D: Callable, sigma_range: tuple[float, float] | None = None):
        super().__init__(D)
        if sigma_range is not None and not (0 < sigma_range[0] < sigma_range[1]):
            raise ValueError(f"sigma_range must satisfy 0 < sigma_min < sigma_max, got {tuple(sigma_range)}")
        self.sigma_range = None if sigma_range is None else (float(sigma_range[0]), float(sigma_range[1]))

    @property
    def logsnr_range(self) -> tuple[float, float]:
        """(min, max) log-SNR of the trained sigmas."""
        if self.sigma_range is None:
            return -math.inf, math.inf
        return -2 * math.log(self.sigma_range[1]), -2 * math.log(self.sigma_range[0])

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """z: (B, *shape); logsnr: (B,) or scalar -> eps_hat (B, *shape)."""
        a = _logsnr(logsnr, z).to(_coefficient_dtype(z))
        sigma = torch.exp(-a / 2)
        x_noisy = z * _per_example(torch.sqrt(1 + sigma**2), z)
        sigma_z = sigma.to(z.dtype)
        x0_hat = self.call(x_noisy, sigma_z)
        return (x_noisy - x0_hat) / _per_example(sigma, z)


class FlowDenoiser(_Wrapped):
    """``f(z, logsnr) -> eps_hat`` from a flow-matching velocity ``v(x_t, t)``, exactly.

    Args:
        v: ``v(x_t (B, *shape), t (B,)) -> velocity (B, *shape)``; an ``nn.Module`` or any callable.
        data_at: where the data sits on the path. ``0``: ``x_t = (1 - t) x + t eps``, velocity
            ``eps - x`` (diffusers' FlowMatch schedulers, Stable Diffusion 3); ``1``:
            ``x_t = t x + (1 - t) eps``, velocity ``x - eps`` (the ``flow_matching`` library).
        t_range: ``(t_min, t_max)`` the model was trained on, reported as ``logsnr_range``;
            ``None``: ``(0, 1)``, unbounded log-SNR.
        time_scale: the network is called with ``t * time_scale`` (diffusers:
            ``num_train_timesteps``); 1 by default.
    """

    def __init__(self, v: Callable, data_at: int = 0, t_range: tuple[float, float] | None = None,
                 time_scale: float = 1.0):
        super().__init__(v)
        if data_at not in (0, 1):
            raise ValueError(f"data_at must be 0 (x_t = (1 - t) x + t eps) or 1 (x_t = t x + (1 - t) eps), "
                             f"got {data_at!r}")
        if t_range is not None and not (0 <= t_range[0] < t_range[1] <= 1):
            raise ValueError(f"t_range must satisfy 0 <= t_min < t_max <= 1, got {tuple(t_range)}")
        self.data_at = data_at
        self.t_range = None if t_range is None else (float(t_range[0]), float(t_range[1]))
        self.time_scale = float(time_scale)

    def _logsnr_of_t(self, t: float) -> float:
        if t <= 0 or t >= 1:
            return (math.inf if t <= 0 else -math.inf) * (1 if self.data_at == 0 else -1)
        a = 2 * math.log((1 - t) / t)
        return a if self.data_at == 0 else -a

    @property
    def logsnr_range(self) -> tuple[float, float]:
        """(min, max) log-SNR of the trained times: ``a = 2 log((1 - t) / t)`` (``data_at=0``)."""
        if self.t_range is None:
            return -math.inf, math.inf
        ends = sorted(self._logsnr_of_t(t) for t in self.t_range)
        return ends[0], ends[1]

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """z: (B, *shape); logsnr: (B,) or scalar -> eps_hat (B, *shape)."""
        a = _logsnr(logsnr, z).to(_coefficient_dtype(z))
        alpha, s = torch.sigmoid(a).sqrt(), torch.sigmoid(-a).sqrt()
        x_t = z / _per_example(alpha + s, z)
        t = torch.sigmoid(-a / 2) if self.data_at == 0 else torch.sigmoid(a / 2)
        velocity = self.call(x_t, (t * self.time_scale).to(z.dtype))
        if self.data_at == 0:
            return x_t + _per_example(1 - t, z) * velocity
        return x_t - _per_example(t, z) * velocity
