"""Per-example random streams.

Every example gets its own ``torch.Generator`` seeded from ``(seed, example index)``, so
its noise does not depend on the batch size, on how points are chunked or on how many
processes share the work.  An example's stream is always read in the same order:

1. ``m`` uniform fractions (float64) that stratify its ``m`` log-SNR points;
2. ``m`` noise draws ``eps`` of the example's shape (antithetic calls reuse them, see
   :class:`CallLayout`);
3. one uniform dequantization offset of the example's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

_MASK = (1 << 64) - 1
NOISE_BUDGET = 2**24  # elements of noise drawn at once: examples are processed in groups this big


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

    def expand(self, n: int) -> "ExampleNoise":
        """The draws of one example repeated for ``n`` examples (views, no copy)."""
        grow = lambda t: None if t is None else t.expand(n, *t.shape[1:])  # noqa: E731
        return ExampleNoise(grow(self.fractions), grow(self.eps), grow(self.dequant))


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


def _chi2_log_pdf(x: torch.Tensor, d: int) -> torch.Tensor:
    half = 0.5 * d
    return (half - 1) * torch.log(x) - 0.5 * x - half * math.log(2.0) - math.lgamma(half)


def chi2_antithetic(r2: torch.Tensor, d: int, iterations: int = 100) -> torch.Tensor:
    """The chi-square(``d``) quantile mirrored about the median: ``F^-1(1 - F(r2))`` (float64).

    If ``r2 ~ chi2(d)`` so is the result.  Solved by Newton's method on the log of the
    tail probability that is small (accurate far into both tails), from the
    Wilson-Hilferty approximation.  Radii whose tail probability underflows float64 are
    returned unchanged.
    """
    r2 = r2.double()
    if d == 2:  # exponential distribution: F(x) = 1 - exp(-x/2), mirrored: -2 log(1 - exp(-x/2))
        half = 0.5 * r2.clamp_min(1e-300)
        # log(1 - e^-h) without cancellation: expm1 below h = log 2, log1p above.
        log1mexp = torch.where(half < math.log(2.0), torch.log(-torch.expm1(-half)), torch.log1p(-torch.exp(-half)))
        result = -2.0 * log1mexp
        return torch.where(torch.isfinite(result) & (result > 0), result, r2)
    a = torch.tensor(0.5 * d, dtype=torch.float64, device=r2.device)
    lower, upper = torch.special.gammainc(a, 0.5 * r2), torch.special.gammaincc(a, 0.5 * r2)
    use_upper = lower < 0.5  # target: upper tail of the result equals `lower` (small)
    log_target = torch.log(torch.where(use_upper, lower, upper).clamp_min(1e-300))
    k = 2.0 / (9.0 * d)
    z = (torch.pow(r2 / d, 1.0 / 3.0) - (1 - k)) / math.sqrt(k)
    log_x = torch.log((d * (1 - k - z * math.sqrt(k)) ** 3).clamp_min(1e-12))
    # sign * log(tail) increases with x.  Newton steps are kept inside a bracket [lo, hi] of
    # log(x) that shrinks every iteration (bisection when a step would leave it), so far
    # tails, where the tail probability falls like exp(-x/2), converge instead of oscillating.
    sign = torch.where(use_upper, -1.0, 1.0).to(torch.float64)
    lo, hi = torch.full_like(log_x, -math.inf), torch.full_like(log_x, math.inf)
    for _ in range(iterations):
        x = torch.exp(log_x)
        tail = torch.where(use_upper, torch.special.gammaincc(a, 0.5 * x), torch.special.gammainc(a, 0.5 * x))
        log_tail = torch.log(tail.clamp_min(1e-300))
        resid = log_tail - log_target
        above = sign * resid > 0  # the root lies below log_x (also right when `tail` underflows)
        hi, lo = torch.where(above, log_x, hi), torch.where(above, lo, log_x)
        # d log(tail) / d log(x) = -/+ x pdf(x) / tail
        slope = sign * torch.exp(_chi2_log_pdf(x, d) + log_x - log_tail)
        newton = log_x - (resid / slope).clamp(-30.0, 30.0)
        bracketed = torch.isfinite(lo) & torch.isfinite(hi)
        fallback = torch.where(bracketed, 0.5 * (lo + hi), torch.where(above, log_x - 2.0, log_x + 2.0))
        # Strictly inside: a step back onto an end of the bracket (already evaluated) would ping-pong.
        inside = ((newton > lo) & (newton < hi)) | (newton == log_x)
        new = torch.where(torch.isfinite(newton) & inside, newton, fallback)
        step, log_x = new - log_x, new
        if bool((step.abs() < 1e-12).all()):
            break
    # Beyond float64's tail probabilities (p < 1e-300, never met by real draws) keep the radius.
    result = torch.exp(log_x)
    return torch.where(torch.isfinite(result) & (result > 0) & (lower > 1e-290) & (upper > 1e-290), result, r2)


@dataclass(frozen=True)
class CallLayout:
    """How ``n_calls`` network calls per example map onto log-SNR points and noise draws.

    With ``antithetic`` (default), calls come in groups of four at one point: ``+eps``,
    ``-eps``, ``+eps'`` and ``-eps'``, where ``eps' = eps * r'/r`` has the same direction
    and the chi-square radius ``r'`` mirrored about the median (:func:`chi2_antithetic`).
    Each call's noise is exactly ``N(0, I)``; within a group, the part of the error that is
    odd in ``eps`` cancels, and so does the part linear in ``||eps||^2``, which dominates
    the variance at high log-SNR.  A trailing group may be shorter.
    """

    n_calls: int
    antithetic: bool = True

    @property
    def group(self) -> int:
        return 4 if self.antithetic else 1

    @property
    def n_strata(self) -> int:
        return -(-self.n_calls // self.group)

    def stratum(self, device=None) -> torch.Tensor:
        """Point (and noise draw) index of each call, ``(n_calls,)`` long."""
        return torch.arange(self.n_calls, device=device) // self.group

    def call_noise(self, eps: torch.Tensor) -> torch.Tensor:
        """Noise of every call, ``(B, m, *shape) -> (B, n_calls, *shape)``."""
        if not self.antithetic:
            return eps  # one call per draw: the noise itself (no copy)
        idx = self.stratum(eps.device)
        flat = eps.flatten(2).double()
        r2 = (flat * flat).sum(-1)
        # A zero draw (possible for tiny d) has no direction to mirror along: keep it.
        ratio = torch.where(r2 > 0, torch.sqrt(chi2_antithetic(r2, flat.shape[-1]) / r2), 1.0).to(eps.dtype)
        mirrored = eps * ratio.reshape(*ratio.shape, *([1] * (eps.dim() - 2)))
        variants = torch.stack([eps, -eps, mirrored, -mirrored], 2)  # (B, m, 4, *shape)
        calls = torch.arange(self.n_calls, device=eps.device)
        return variants[:, idx, calls % 4]

    def mean_per_stratum(self, values: torch.Tensor) -> torch.Tensor:
        """Average ``(B, n_calls)`` per-call values over the calls of each point: ``(B, m)``."""
        idx = self.stratum(values.device)
        sums = torch.zeros(len(values), self.n_strata, dtype=values.dtype, device=values.device)
        counts = torch.zeros(self.n_strata, dtype=values.dtype, device=values.device)
        counts.index_add_(0, idx, torch.ones_like(idx, dtype=values.dtype))
        return sums.index_add_(1, idx, values) / counts
