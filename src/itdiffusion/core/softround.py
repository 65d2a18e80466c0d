"""Soft rounding to a grid without the ``(levels x batch x d)`` tensor.

Soft rounding replaces ``x_hat`` by the posterior mean of the grid value when ``x_hat``
is the grid value seen through Gaussian noise of standard deviation ``e^(-a/2)`` (the
channel's noise in data units) under a uniform prior on the ``L`` levels.  In index
units (``t = (x_hat - lo) / delta``, ``tau = e^(-a/2) / delta``)::

    E[k] = sum_k k f(k) / sum_k f(k),      f(k) = exp(-(k - t)^2 / (2 tau^2)),  k = 0..L-1.

The published code materialises all ``L`` weights of every element.  Here each row
(one example at one log-SNR) takes one of two exact-to-float routes:

* ``tau < TAU_CLOSED`` (high SNR): a **window** of levels around the nearest one.  Levels
  whose weight is below ``exp(-WINDOW_NATS)`` of the largest are skipped; the window's
  half-width grows with ``tau`` (at most 24 levels, 32 once rounded up to a power of two),
  and rows are grouped by window size, so a batch that mixes log-SNR points does not pay
  the widest window everywhere.
* ``tau >= TAU_CLOSED`` (low SNR, where a window would span the whole grid): a **closed
  form**.  The sums are Gaussian integrals over ``[-1/2, L - 1/2]`` plus the midpoint
  Euler-Maclaurin corrections at the two ends (Hermite polynomials times the Gaussian),
  five terms.  The periodic (aliasing) part of the error is ``~exp(-2 pi^2 tau^2)``,
  below ``1e-77`` here, and the truncated corrections leave less than ``1e-9`` in the
  mean index (checked against the full sum in the tests).  Everything is scaled by the
  Gaussian at the grid point nearest to ``t`` (``erfcx``), so ``x_hat`` far outside the
  grid does not underflow.  Elements far outside the grid (see ``OUTSIDE_MAX``), where the
  expansion converges slowly or loses digits, are summed level by level from that edge.

Memory: besides the input and the result, the temporaries alive at once hold about
``max_elements`` elements (rows and window levels are processed in slices), whatever the
batch or the number of levels; never ``levels * batch * d``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

WINDOW_NATS = 40.0
"""Window levels down to weight ``exp(-40)`` relative to the nearest level (error << 1e-15)."""

TAU_CLOSED = 2.5
"""Noise standard deviation, in grid steps, from which the closed form replaces the window."""

SLOPE_MAX, OUTSIDE_MAX, OUTSIDE_STEPS = 0.5, 4.0, 1e6
"""Closed form only while ``t`` lies within ``min(SLOPE_MAX * tau^2, OUTSIDE_MAX * tau,
OUTSIDE_STEPS)`` steps outside the grid: beyond, the expansion converges slowly or the mean
is a small difference of large numbers (``t - tau * s1 / s0``, rounding ``~1e-16 |t|``).
Such elements (rare: an optimal denoiser's ``x_hat`` never leaves the grid's range) are
summed level by level instead."""

DEFAULT_MAX_ELEMENTS = {"cpu": 2**20}
"""Default bound on the temporaries' elements alive at once, per device type (float64:
8 MiB on a CPU); ``FALLBACK_MAX_ELEMENTS`` on other devices (fewer, larger kernels)."""
FALLBACK_MAX_ELEMENTS = 2**26

_CLOSED_TEMPORARIES = 25  # tensors of the slice's size alive at once in closed_form_mean
_WINDOW_TEMPORARIES = 6  # ... in window_mean, besides 4 per visited level of a chunk

# Midpoint Euler-Maclaurin coefficients B_2j(1/2) / (2j)!, j = 1..5.
_EM_COEFFS = (-1.0 / 24.0, 7.0 / 5760.0, -31.0 / 967680.0, 127.0 / 154828800.0, -2555.0 / 122624409600.0)
_SQRT_HALF = math.sqrt(0.5)
_SQRT_HALF_PI = math.sqrt(0.5 * math.pi)
_GL_NODES, _GL_WEIGHTS = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(10))


def default_max_elements(device: torch.device | str) -> int:
    """The default temporary budget of :func:`soft_round_index` on ``device``."""
    return DEFAULT_MAX_ELEMENTS.get(torch.device(device).type, FALLBACK_MAX_ELEMENTS)


def soft_round_index(
    levels: int, t: torch.Tensor, tau: torch.Tensor, *, max_elements: int | None = None
) -> torch.Tensor:
    """Posterior-mean grid index for fractional indices ``t`` ``(B, *shape)`` (float64).

    Args:
        levels: number of grid levels ``L`` (indices ``0..L-1``).
        t: ``(B, *shape)`` fractional grid coordinates of ``x_hat``.
        tau: ``(B,)`` noise standard deviation of each row, in grid steps (> 0).
        max_elements: approximate bound on the elements of all temporaries alive at once
            (besides ``t`` and the result); default :func:`default_max_elements`.

    Returns:
        ``E[k]``, float64, ``t``'s shape.
    """
    t = t.double()
    shape = t.shape
    t = t.reshape(len(t), -1) if t.dim() != 1 else t.reshape(-1, 1)
    tau = tau.double().reshape(-1).to(t.device)
    if len(tau) != len(t):
        raise ValueError(f"need one tau per row: {len(tau)} for {len(t)} rows")
    out = torch.empty_like(t)
    if t.numel() == 0:
        return out.reshape(shape)
    budget = max(1, int(default_max_elements(t.device) if max_elements is None else max_elements))
    closed = tau >= TAU_CLOSED
    n_closed = int(closed.sum())
    if n_closed:
        rows = None if n_closed == len(t) else closed.nonzero().squeeze(1)
        _closed_rows(levels, t, tau, rows, out, budget)
    if n_closed < len(t):
        half = torch.ceil(1.0 + math.sqrt(2.0 * WINDOW_NATS) * tau).clamp(1, levels - 1)
        # window sizes rounded up to powers of two; any window covering the grid is one group
        bucket = torch.pow(2.0, torch.ceil(torch.log2(half))).clamp(max=levels // 2)
        bucket = torch.where(closed, 0.0, bucket)
        for h in sorted(int(v) for v in torch.unique(bucket).tolist() if v > 0):
            rows = (bucket == h).nonzero().squeeze(1)
            _window_rows(levels, t, tau, rows, h, out, budget)
    return out.reshape(shape)


def _row_slices(rows: torch.Tensor | None, n_rows: int, per_row: int, budget: int):
    """Row index tensors (or slices) holding at most ``budget // per_row`` rows each."""
    step = max(1, budget // max(1, per_row))
    total = n_rows if rows is None else len(rows)
    for start in range(0, total, step):
        yield slice(start, start + step) if rows is None else rows[start : start + step]


def _window_rows(levels, t, tau, rows, half, out, budget) -> None:
    d = t.shape[1]
    for sel in _row_slices(rows, len(t), d * (_WINDOW_TEMPORARIES + 4), budget):
        tt = t[sel]
        c = (0.5 / tau[sel] ** 2).unsqueeze(1)
        out[sel] = window_mean(levels, tt, c, half, budget)


def window_mean(levels: int, t: torch.Tensor, c: torch.Tensor, half: int, budget: int) -> torch.Tensor:
    """Posterior-mean index from the levels within ``half`` of the nearest one.

    ``c = 1 / (2 tau^2)`` broadcasts against ``t``.  With ``2 half + 1 >= levels`` every
    level is visited once.  The weight of level ``k0 + j`` relative to the nearest level
    ``k0`` is ``exp(c j (2 e - j))``, ``e = t - k0``: never above 1, so nothing overflows.
    Levels are visited in chunks of ``(budget / t.numel() - 6) / 4`` (at least one).
    """
    n = max(1, t.numel())
    chunk_max = max(1, (budget - _WINDOW_TEMPORARIES * n) // (4 * n))
    k0 = t.round().clamp(0, levels - 1)
    e2 = 2.0 * (t - k0)
    total = torch.zeros_like(t)
    first = torch.zeros_like(t)
    view = (-1,) + (1,) * t.dim()
    if 2 * half + 1 >= levels:  # every level, once: j = k - k0 per element
        chunk = min(levels, chunk_max)
        for start in range(0, levels, chunk):
            k = torch.arange(start, min(levels, start + chunk), dtype=t.dtype, device=t.device).reshape(view)
            j = k - k0
            p = torch.exp(c * j * (e2 - j))
            total += p.sum(0)
            first += (p * j).sum(0)
    else:
        lo, hi = -k0, (levels - 1) - k0  # valid offsets of each element
        steps = torch.arange(-half, half + 1, dtype=t.dtype, device=t.device)
        chunk = min(len(steps), chunk_max)
        for start in range(0, len(steps), chunk):
            j = steps[start : start + chunk].reshape(view)
            p = torch.exp((c * j) * (e2 - j))
            p = torch.where((j >= lo) & (j <= hi), p, 0.0)
            total += p.sum(0)
            first += (p * j).sum(0)
    return k0 + first / total


def _closed_rows(levels, t, tau, rows, out, budget) -> None:
    d = t.shape[1]
    for sel in _row_slices(rows, len(t), d * _CLOSED_TEMPORARIES, budget):
        tt, tr = t[sel], tau[sel].unsqueeze(1)
        mean, steep = closed_form_mean(levels, tt, tr)
        if bool(steep.any()):
            idx = steep.nonzero(as_tuple=True)
            t_out, tau_out = tt[idx], tr.expand_as(tt)[idx]
            # the weights fall at least as exp(-slope) per level away from the nearest end
            outside = torch.clamp(torch.maximum(-0.5 - t_out, t_out - (levels - 0.5)), min=0.0)
            slope = (outside / tau_out**2).min().item()
            half = levels - 1 if slope <= 0 else min(levels - 1, math.ceil(1.0 + WINDOW_NATS / slope))
            mean[idx] = window_mean(levels, t_out, 0.5 / tau_out**2, half, budget)
        out[sel] = mean


def closed_form_mean(levels: int, t: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior-mean index by Euler-Maclaurin (see module docstring), for ``tau >= TAU_CLOSED``.

    ``t`` ``(R, D)``, ``tau`` ``(R, 1)``.  Returns the mean and a mask of the elements too far
    outside the grid for the expansion (their mean is not valid; use :func:`window_mean`).
    """
    a, b = -0.5, levels - 0.5
    ua, ub = (a - t) / tau, (b - t) / tau  # grid ends in standard units, ua < ub
    width = levels / tau  # ub - ua, exactly
    below, above = ua >= 0, ub <= 0  # t below / above the whole grid
    # Everything is scaled by exp(+m/2), m = min u^2 over [ua, ub] (the Gaussian at the
    # grid point nearest to t), so nothing underflows however far outside t lies.
    m = torch.where(below, ua * ua, torch.where(above, ub * ub, torch.zeros_like(t)))
    pa, pb = torch.exp(0.5 * (m - ua * ua)), torch.exp(0.5 * (m - ub * ub))
    s0 = _scaled_gauss_integral(ua, ub, pa, pb, width, below, above)  # Int_{ua}^{ub} exp((m - u^2)/2) du
    # pb - pa without cancellation: pb / pa = exp(-half_diff)
    half_diff = 0.5 * width * (ua + ub)  # (ub^2 - ua^2) / 2
    s1 = torch.where(half_diff <= 0, -pb * torch.expm1(half_diff), pa * torch.expm1(-half_diff))
    # Euler-Maclaurin corrections: sum_j c_j tau^-2j He_{2j-1}(u) (for s0) and He_{2j}(u)
    # (for s1) at both ends, as polynomials in u with per-row coefficients (Horner in u^2).
    weights = _EM.to(t.device) * tau.pow(-2.0 * _EM_ORDERS.to(t.device))  # (R, 5)
    odd, even = weights @ _HE_ODD.to(t.device), weights @ _HE_EVEN.to(t.device)  # (R, 5), (R, 6)
    s0 = s0 - (_poly_odd(odd, ub) * pb - _poly_odd(odd, ua) * pa)
    s1 = s1 + (_poly_even(even, ub) * pb - _poly_even(even, ua) * pa)
    # sum f(k) = tau e^{-m/2} s0;  sum (k - t) f(k) = -tau^2 e^{-m/2} s1
    mean = t - tau * s1 / s0
    outside = torch.clamp(torch.maximum(a - t, t - b), min=0.0)
    steep = outside > torch.minimum(SLOPE_MAX * tau * tau, OUTSIDE_MAX * tau).clamp(max=OUTSIDE_STEPS)
    return mean, steep


def _horner(coeffs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sum_m coeffs[:, m] v^m`` with per-row coefficients ``(R, M)`` and ``v`` ``(R, D)``."""
    acc = torch.addcmul(coeffs[:, -2:-1], coeffs[:, -1:], v)
    for m in range(coeffs.shape[1] - 3, -1, -1):
        acc = torch.addcmul(coeffs[:, m : m + 1], acc, v)
    return acc


def _poly_odd(coeffs, u):
    return u * _horner(coeffs, u * u)


def _poly_even(coeffs, u):
    return _horner(coeffs, u * u)


def _hermite_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of He_{2j-1} in odd powers and He_{2j} in even powers, j = 1..5."""
    he = [[1.0] + [0.0] * 10, [0.0, 1.0] + [0.0] * 9]
    for n in range(1, 10):  # He_{n+1} = u He_n - n He_{n-1}
        he.append([(he[n][k - 1] if k else 0.0) - n * he[n - 1][k] for k in range(11)])
    odd = torch.tensor([[he[2 * j - 1][2 * m + 1] for m in range(5)] for j in range(1, 6)], dtype=torch.float64)
    even = torch.tensor([[he[2 * j][2 * m] for m in range(6)] for j in range(1, 6)], dtype=torch.float64)
    return odd, even


_HE_ODD, _HE_EVEN = _hermite_tables()
_EM = torch.tensor(_EM_COEFFS, dtype=torch.float64)
_EM_ORDERS = torch.arange(1, 6, dtype=torch.float64)


def _scaled_gauss_integral(ua, ub, pa, pb, width, below, above) -> torch.Tensor:
    """``Int_{ua}^{ub} exp((m - u^2) / 2) du`` with ``m`` the smallest ``u^2`` on the interval.

    ``pa``, ``pb``: ``exp((m - u^2) / 2)`` at the two ends.  From ``erfcx`` at both ends: a
    difference on one side of zero, ``2 -`` a sum across it.  Both lose about
    ``-log10(kappa)`` digits when ``kappa = width * (|u_near| + width)`` is small (a grid
    narrow against the noise); there a 10-point Gauss-Legendre rule is exact to rounding.
    """
    lower = torch.special.erfcx(ua.abs() * _SQRT_HALF) * pa
    upper = torch.special.erfcx(ub.abs() * _SQRT_HALF) * pb
    result = _SQRT_HALF_PI * torch.where(below, lower - upper, torch.where(above, upper - lower, 2.0 - lower - upper))
    near = torch.where(above, -ub, ua)  # integrate from this end (from ub downwards above the grid)
    width = width.expand_as(ua)
    fix = width * (near.abs() + width) < 1.0
    if bool(fix.any()):
        idx = fix.nonzero(as_tuple=True)
        w, u0 = width[idx].unsqueeze(-1), near[idx].unsqueeze(-1)
        s = 0.5 * w * (1.0 + _GL_NODES.to(w.device))
        scale = torch.where(above, pb, pa)[idx]
        quad = (_GL_WEIGHTS.to(w.device) * torch.exp(-0.5 * s * (2.0 * u0 + s))).sum(-1)
        result[idx] = scale * 0.5 * w.squeeze(-1) * quad
    return result


def soft_round_index_dense(levels: int, t: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The published method: a softmax over all ``levels`` for every element (reference only).

    Allocates several ``(levels, *t.shape)`` float64 tensors.
    """
    t = t.double()
    tau = tau.double().reshape(-1, *([1] * (t.dim() - 1)))
    k = torch.arange(levels, dtype=torch.float64, device=t.device).reshape(-1, *([1] * t.dim()))
    p = torch.softmax(-0.5 * ((t.unsqueeze(0) - k) / tau) ** 2, dim=0)
    return (p * k).sum(0)
