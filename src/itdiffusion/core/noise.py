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
NOISE_BUDGET = 2**20  # noise elements (of calls x dimensions) handled at once: groups of examples and chunks of points


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


def point_chunk(n_points: int, d: int, budget: int = NOISE_BUDGET) -> int:
    """Points of one example whose noise is drawn at once: about ``budget`` elements.

    Depends only on ``(n_points, d)``, never on how examples are grouped, so the draws (and
    every result) do not depend on batching.  Chunks hold a multiple of 16 elements: torch's
    CPU normal sampler fills blocks of 16, so a stream drawn in such chunks equals the same
    stream drawn at once (``tests/test_noise.py`` checks it).
    """
    step = 16 // math.gcd(int(d), 16)  # points per 16-element block
    k = max(step, (budget // max(1, int(d))) // step * step)
    return min(int(n_points), k)


def _chunk_bounds(n_points: int, d: int, budget: int) -> list[tuple[int, int]]:
    k = point_chunk(n_points, d, budget)
    bounds = [(s, min(s + k, n_points)) for s in range(0, n_points, k)]
    if len(bounds) > 1 and (bounds[-1][1] - bounds[-1][0]) * d < 16:  # a tail under 16 elements: merge it
        bounds[-2:] = [(bounds[-2][0], n_points)]
    return bounds


class NoiseStreams:
    """The streams of a group of examples, read chunk by chunk in the order of the module docstring.

    Args:
        seed: run seed; example ``i`` uses ``example_seed(seed, i)``.
        indices: the examples' indices.
        n_strata: ``m``, log-SNR points per example.
        shape: shape of one example.
        budget: about this many noise elements per example are drawn at once (see :func:`point_chunk`).

    ``fractions`` ``(B, m)`` are drawn at once; :meth:`chunks` then yields the noise of
    consecutive chunks of points; :meth:`dequant` reads the offsets that follow all the noise
    (from copies of the generators, skipping the noise in bounded steps).
    """

    def __init__(self, seed: int, indices: Sequence[int], n_strata: int, shape: tuple[int, ...], *,
                 dtype: torch.dtype = torch.float32, device="cpu", budget: int = NOISE_BUDGET):
        self.n_strata, self.shape, self.dtype = int(n_strata), tuple(shape), dtype
        self.device = torch.device(device)
        self.d = math.prod(self.shape)
        self.bounds = _chunk_bounds(self.n_strata, self.d, budget)
        self._gens = []
        for index in indices:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(example_seed(seed, index))
            self._gens.append(gen)
        self.fractions = torch.stack([torch.rand(self.n_strata, generator=g, dtype=torch.float64, device=self.device)
                                      for g in self._gens])
        self._after_fractions = [g.get_state() for g in self._gens]

    def _draw(self, gen: torch.Generator, n: int) -> torch.Tensor:
        return torch.randn((n, *self.shape), generator=gen, dtype=self.dtype, device=self.device)

    def chunks(self):
        """``(start, stop, eps (B, stop - start, *shape))`` for consecutive chunks of points (one pass)."""
        for gen, state in zip(self._gens, self._after_fractions):
            gen.set_state(state)
        for start, stop in self.bounds:
            yield start, stop, torch.stack([self._draw(g, stop - start) for g in self._gens])

    def dequant(self) -> torch.Tensor:
        """``(B, *shape)`` uniform offsets in ``[-1/2, 1/2)`` that follow the noise in each stream."""
        out = []
        for state in self._after_fractions:
            gen = torch.Generator(device=self.device)
            gen.set_state(state)
            for start, stop in self.bounds:
                self._draw(gen, stop - start)
            out.append(torch.rand(self.shape, generator=gen, dtype=self.dtype, device=self.device) - 0.5)
        return torch.stack(out)


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
    """Every example's whole stream at once (see module docstring) on ``device``; the pipeline
    reads the same streams in bounded chunks through :class:`NoiseStreams`."""
    streams = NoiseStreams(seed, indices, n_strata, shape, dtype=dtype, device=device)
    eps = torch.cat([chunk for _, _, chunk in streams.chunks()], 1)
    return ExampleNoise(streams.fractions, eps, streams.dequant() if dequantize else None)


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

    def stratum(self, device=None, first: int = 0, stop: int | None = None) -> torch.Tensor:
        """Point (and noise draw) index of each call of points ``[first, stop)``, ``(calls,)`` long."""
        return self.calls(first, stop, device) // self.group

    def calls(self, first: int = 0, stop: int | None = None, device=None) -> torch.Tensor:
        """Indices of the calls at points ``[first, stop)`` (default: all points)."""
        stop = self.n_strata if stop is None else stop
        return torch.arange(first * self.group, min(stop * self.group, self.n_calls), device=device)

    def call_noise(self, eps: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Noise of every call at points ``first, first + 1, ...``: ``(B, k, *shape) -> (B, calls, *shape)``."""
        if not self.antithetic:
            return eps  # one call per draw: the noise itself (no copy)
        calls = self.calls(first, first + eps.shape[1], eps.device)
        flat = eps.flatten(2).double()
        r2 = (flat * flat).sum(-1)
        # A zero draw (possible for tiny d) has no direction to mirror along: keep it.
        ratio = torch.where(r2 > 0, torch.sqrt(chi2_antithetic(r2, flat.shape[-1]) / r2), 1.0).to(eps.dtype)
        mirrored = eps * ratio.reshape(*ratio.shape, *([1] * (eps.dim() - 2)))
        variants = torch.stack([eps, -eps, mirrored, -mirrored], 2)  # (B, k, 4, *shape)
        return variants[:, calls // self.group - first, calls % 4]

    def mean_per_stratum(self, values: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Average per-call values ``(B, calls, ...)`` of points ``first, ...`` over each point's calls: ``(B, k, ...)``."""
        k = -(-values.shape[1] // self.group)
        idx = self.stratum(values.device, first, first + k) - first
        sums = torch.zeros(len(values), k, *values.shape[2:], dtype=values.dtype, device=values.device)
        counts = torch.zeros(k, dtype=values.dtype, device=values.device)
        counts.index_add_(0, idx, torch.ones_like(idx, dtype=values.dtype))
        return sums.index_add_(1, idx, values) / counts.reshape(k, *([1] * (values.dim() - 2)))
