"""Discrete noise schedules and the log-SNR <-> continuous-timestep map.

A discrete diffusion schedule is a table ``alpha_bar_t`` (t = 0..T-1, the cumulative
product of ``1 - beta``), the signal fraction of the variance-preserving channel at
training step t.  Its log signal-to-noise ratio is ``logsnr_t = log(alpha_bar_t /
(1 - alpha_bar_t))``, so that ``sigmoid(logsnr_t) = alpha_bar_t``.  Everything here is
computed in float64.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

__all__ = [
    "betas_for_alpha_bar",
    "diffusers_alphas_cumprod",
    "iddpm_alphas_cumprod",
    "LogSNRTimestepMap",
]


def betas_for_alpha_bar(alpha_bar: Callable[[float], float], steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of a schedule defined by a continuous alpha_bar on [0, 1].

    ``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)``; returns (T,) float64.
    """
    betas = [min(1.0 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)]
    return torch.tensor(betas, dtype=torch.float64)


def _cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    """Unnormalised cosine schedule ``cos((t + s) / (1 + s) * pi / 2)^2`` for t in [0, 1]."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def _cumprod(betas: torch.Tensor) -> torch.Tensor:
    if betas.ndim != 1 or len(betas) < 2:
        raise ValueError(f"need a 1-D schedule of at least 2 steps, got shape {tuple(betas.shape)}")
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("every beta must lie in (0, 1)")
    return torch.cumprod(1.0 - betas, dim=0)


def iddpm_alphas_cumprod(noise_schedule: str, steps: int) -> torch.Tensor:
    """alpha_bar_t (T,) float64 of improved-diffusion's named schedules.

    "cosine": betas from ``cos((t + 0.008) / 1.008 * pi / 2)^2``, clipped at 0.999.
    "linear": betas evenly spaced from 1e-4 to 0.02, both scaled by 1000 / T.
    """
    if noise_schedule == "cosine":
        betas = betas_for_alpha_bar(_cosine_alpha_bar, steps)
    elif noise_schedule == "linear":
        scale = 1000.0 / steps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown noise_schedule {noise_schedule!r}; known: 'cosine', 'linear'")
    return _cumprod(betas)


def _config_dict(config: Any) -> dict:
    """A plain dict from a dict, a diffusers config (FrozenDict) or a scheduler object."""
    if hasattr(config, "config") and not isinstance(config, Mapping):
        config = config.config
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a scheduler config mapping or scheduler, got {type(config).__name__}")
    return dict(config)


def diffusers_alphas_cumprod(scheduler_config: Any) -> torch.Tensor:
    """alpha_bar_t (T,) float64 as diffusers' DDPM-family schedulers define it.

    Reads ``num_train_timesteps``, ``beta_schedule`` ("linear", "scaled_linear",
    "squaredcos_cap_v2", "sigmoid"), ``beta_start``, ``beta_end``, ``trained_betas``
    (used when given) and ``rescale_betas_zero_snr`` (the last entry is then 0: log-SNR
    -inf) with DDPMScheduler's defaults; computed in float64 where diffusers uses float32.
    """
    cfg = _config_dict(scheduler_config)
    abar = _betas_alphas_cumprod(cfg)
    if cfg.get("rescale_betas_zero_snr"):
        abar = _zero_terminal_snr(abar)
    return abar


def _zero_terminal_snr(abar: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), Algorithm 1: ``sqrt(alpha_bar)`` shifted to end at 0, rescaled to keep its start."""
    root = abar.sqrt()
    root = (root - root[-1]) * (root[0] / (root[0] - root[-1]))
    return root**2


def _betas_alphas_cumprod(cfg: dict) -> torch.Tensor:
    if cfg.get("trained_betas") is not None:
        return _cumprod(torch.as_tensor(cfg["trained_betas"], dtype=torch.float64).flatten())
    steps = int(cfg.get("num_train_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    kind = cfg.get("beta_schedule", "linear")
    if kind == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(_cosine_alpha_bar, steps)
    elif kind == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (end - start) + start
    else:
        raise ValueError(
            f"unknown beta_schedule {kind!r}; known: 'linear', 'scaled_linear', 'squaredcos_cap_v2', 'sigmoid'"
        )
    return _cumprod(betas)


class LogSNRTimestepMap:
    """Monotone, differentiable map between log-SNR and a continuous timestep.

    The table ``logsnr_t`` (t = 0..T-1) is strictly decreasing; between grid points
    the map is linear in t.  Log-SNRs outside ``logsnr_range`` are clamped to its
    ends (timestep 0 above the range, T-1 below it), where the gradient is zero.
    A zero-terminal-SNR table (last ``alpha_bar`` exactly 0, log-SNR -inf) is mapped on its
    finite steps 0..T-2 (``alphas_cumprod`` then holds those; ``zero_terminal_snr`` is True).

    Args:
        alphas_cumprod: (T,) alpha_bar_t, strictly decreasing in (0, 1) (the last may be 0).
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        self.zero_terminal_snr = bool(abar.ndim == 1 and len(abar) > 2 and abar[-1] == 0)
        if self.zero_terminal_snr:  # log-SNR -inf at the last step: the map covers the finite steps
            abar = abar[:-1]
        table = torch.log(abar) - torch.log1p(-abar)
        if table.ndim != 1 or len(table) < 2 or not bool((table[1:] < table[:-1]).all()):
            raise ValueError("alphas_cumprod must be 1-D, of length >= 2 and strictly decreasing")
        self.alphas_cumprod = abar
        self.logsnr_table = table  # (T,) float64, decreasing
        self._ascending = table.flip(0).contiguous()
        self._cache: dict = {}

    @property
    def num_steps(self) -> int:
        return len(self.logsnr_table)

    @property
    def logsnr_range(self) -> tuple[float, float]:
        """(min, max) log-SNR of the table: at t = T-1 and at t = 0."""
        return float(self.logsnr_table[-1]), float(self.logsnr_table[0])

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(descending, ascending) tables on `device` (float32 where float64 is unsupported)."""
        key = str(device)
        if key not in self._cache:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._cache[key] = (self.logsnr_table.to(device, dtype), self._ascending.to(device, dtype))
        return self._cache[key]

    def __call__(self, logsnr: torch.Tensor) -> torch.Tensor:
        """logsnr (any shape) -> continuous timestep in [0, T-1], same shape, float64."""
        _, asc = self._tables(logsnr.device)
        a = logsnr.to(asc.dtype).clamp(asc[0], asc[-1])
        lo = (torch.searchsorted(asc, a.detach(), right=True) - 1).clamp(0, len(asc) - 2)
        left, right = asc[lo], asc[lo + 1]
        position = lo.to(a.dtype) + (a - left) / (right - left)  # index into the ascending table
        return (len(asc) - 1) - position

    def logsnr_at(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse map: continuous timestep in [0, T-1] -> log-SNR (linear between grid points)."""
        desc, _ = self._tables(t.device)
        t = t.to(desc.dtype).clamp(0, len(desc) - 1)
        lo = t.detach().floor().long().clamp(0, len(desc) - 2)
        frac = t - lo.to(t.dtype)
        return desc[lo] + (desc[lo + 1] - desc[lo]) * frac
