"""Per-example random streams.

Every example gets its own ``torch.Generator`` seeded from ``(seed, example index)``, so
its noise does not depend on the batch size, on how points are chunked or on how many
processes share the work.  An example's stream is always read in the same order:

1. ``m`` uniform fractions (float64) that stratify its ``m`` log-SNR points;
2. ``k`` noise draws ``eps`` of the example's shape (``k = m``; with antithetic pairs the
   ``2m`` network calls use ``+eps`` and ``-eps`` of the same ``m`` draws);
3. one uniform dequantization offset of the example's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_MASK = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def example_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for example ``index`` under the run seed ``seed``."""
    return _splitmix64(_splitmix64(int(seed) & _MASK) ^ int(index)) >> 1


def seed_from(generator: torch.Generator | None) -> int:
    """A run seed drawn from ``generator`` (a fresh random one when ``generator`` is None)."""
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


@dataclass
class ExampleNoise:
    """Random draws for a group of ``B`` examples with ``m`` points each."""

    fractions: torch.Tensor  # (B, m) float64 in [0, 1)
    eps: torch.Tensor  # (B, m, *shape)
    dequant: torch.Tensor | None  # (B, *shape) uniform in [-1/2, 1/2), or None


def draw_example_noise(
    seed: int,
    indices: Sequence[int],
    n_strata: int,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    dequantize: bool = False,
) -> ExampleNoise:
    """Draw each example's stream (see module docstring) on ``device``."""
    device = torch.device(device)
    fractions, eps, dequant = [], [], []
    for index in indices:
        gen = torch.Generator(device=device)
        gen.manual_seed(example_seed(seed, index))
        fractions.append(torch.rand(n_strata, generator=gen, dtype=torch.float64, device=device))
        eps.append(torch.randn((n_strata, *shape), generator=gen, dtype=dtype, device=device))
        if dequantize:
            dequant.append(torch.rand(shape, generator=gen, dtype=dtype, device=device) - 0.5)
    return ExampleNoise(
        fractions=torch.stack(fractions),
        eps=torch.stack(eps),
        dequant=torch.stack(dequant) if dequantize else None,
    )


@dataclass(frozen=True)
class CallLayout:
    """How ``n_calls`` network calls per example map onto ``n_strata`` log-SNR points.

    With antithetic pairs, calls ``2j`` and ``2j + 1`` share point ``j`` and noise draw ``j``
    with signs ``+1`` and ``-1`` (an odd last call stands alone): the part of the error
    that is odd in ``eps`` cancels within each pair.
    """

    n_calls: int
    antithetic: bool

    @property
    def n_strata(self) -> int:
        return (self.n_calls + 1) // 2 if self.antithetic else self.n_calls

    def stratum(self, device=None) -> torch.Tensor:
        """Point (and noise) index of each call, ``(n_calls,)`` long."""
        calls = torch.arange(self.n_calls, device=device)
        return calls // 2 if self.antithetic else calls

    def sign(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """``+1``/``-1`` noise sign of each call, ``(n_calls,)``."""
        calls = torch.arange(self.n_calls, device=device)
        odd = (calls % 2 == 1) if self.antithetic else torch.zeros_like(calls, dtype=torch.bool)
        return 1.0 - 2.0 * odd.to(dtype)

    def mean_per_stratum(self, values: torch.Tensor) -> torch.Tensor:
        """Average ``(B, n_calls)`` per-call values over the calls of each point: ``(B, n_strata)``."""
        idx = self.stratum(values.device)
        sums = torch.zeros(len(values), self.n_strata, dtype=values.dtype, device=values.device)
        counts = torch.zeros(self.n_strata, dtype=values.dtype, device=values.device)
        counts.index_add_(0, idx, torch.ones_like(idx, dtype=values.dtype))
        return sums.index_add_(1, idx, values) / counts
