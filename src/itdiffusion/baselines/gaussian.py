"""Gaussian pieces of the baselines: per-example random streams, Gaussian and discretized-Gaussian NLLs, the prior KL.

All NLLs are per example, float64 nats.  Randomness is one CPU generator per example
(see :mod:`itdiffusion.core.noise`), so results do not depend on the batch or the device.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..core.grid import DiscreteGrid
from ..core.noise import example_seed

def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1)


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` values reshaped to broadcast against ``(B, *shape)``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def example_generators(seed: int, indices: Sequence[int], salt: int = 0) -> list[torch.Generator]:
    """One CPU generator per example, seeded from ``(seed + salt, index)`` (see :mod:`itdiffusion.core.noise`).

    Draws are made on the CPU and moved to the data's device, so results do not depend
    on the device either.
    """
    gens = []
    for index in indices:
        gen = torch.Generator()
        gen.manual_seed(example_seed(int(seed) + int(salt), int(index)))
        gens.append(gen)
    return gens


def _randn_per_example(gens: Sequence[torch.Generator], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``(B, *shape)`` standard normal draws in ``like``'s dtype and device, row ``i`` from ``gens[i]``."""
    rows = [torch.randn(shape, generator=g, dtype=like.dtype) for g in gens]
    return torch.stack(rows).to(like.device)


def _rand_per_example(gens: Sequence[torch.Generator], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.rand(shape, generator=g, dtype=like.dtype) for g in gens]).to(like.device)


def _rademacher_per_example(gens, shape, like: torch.Tensor) -> torch.Tensor:
    bits = torch.stack([torch.randint(0, 2, shape, generator=g) for g in gens])
    return (2 * bits - 1).to(dtype=like.dtype, device=like.device)


def prior_kl(x: torch.Tensor, logsnr: float) -> torch.Tensor:
    """``KL(N(alpha x, sigma^2 I) || N(0, I))`` per example in nats, ``(B, *shape) -> (B,)`` float64.

    ``1/2 sum_i [sigma^2 - 1 - log sigma^2 + alpha^2 x_i^2]``, with ``sigma^2 - 1 - log sigma^2``
    written as ``softplus(a) - sigmoid(a)`` (stable when ``sigma`` is close to 1).
    """
    a = torch.tensor(float(logsnr), dtype=torch.float64)
    per_dim = F.softplus(a) - torch.sigmoid(a)
    y = _flat(x).double()
    return 0.5 * (y.shape[1] * per_dim + torch.sigmoid(a) * (y * y).sum(1))


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``-log N(x; mean, exp(logvar))`` summed over all but the first axis, float64 ``(B,)``."""
    diff = (x.double() - mean.double())
    logvar = logvar.double().expand_as(diff)
    per_dim = 0.5 * (math.log(2 * math.pi) + logvar + diff * diff * torch.exp(-logvar))
    return _flat(per_dim).sum(1)


def _log_diff_ndtr(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """``log(Phi(upper) - Phi(lower))`` for ``upper > lower``, accurate in both tails."""
    flip = (upper + lower) > 0  # work on the side where both CDFs are small
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                             discrete: DiscreteGrid) -> torch.Tensor:
    """``-log P(x)`` of a Gaussian discretised to ``discrete``, summed per example, float64 ``(B,)``.

    Each grid value owns the bin ``x +- delta/2``; the bins of the lowest and highest
    values extend to ``-inf`` and ``+inf``, so the probabilities over the grid sum to one.
    Computed with exact normal CDFs in log space (no ``1e-12`` floor).
    """
    x, mean = x.double(), mean.double()
    inv_std = torch.exp(-0.5 * logvar.double()).expand_as(x)
    half = 0.5 * discrete.delta
    upper = torch.where(x >= discrete.hi - 0.5 * half, torch.full_like(x, math.inf), (x + half - mean) * inv_std)
    lower = torch.where(x <= discrete.lo + 0.5 * half, torch.full_like(x, -math.inf), (x - half - mean) * inv_std)
    return -_flat(_log_diff_ndtr(upper, lower)).sum(1)
