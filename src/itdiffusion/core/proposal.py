"""Integration over log-SNR by truncated-logistic importance sampling.

The integrals of I-MMSE run over the whole real line of log-SNR ``a``.  We draw points
from a logistic distribution with location ``loc`` and scale ``scale``, truncated to
``loc +- clip * scale``, and weight each point by the inverse of that density, so that

    Int_{loc - clip*scale}^{loc + clip*scale} f(a) da  ~=  sum_i weights[i] * f(logsnr[i]).

The weights already contain the ``1/n`` of the average.  Three ways to place the points:

- ``"iid"``: independent draws (what the published code does);
- ``"stratified"``: one draw in each of ``n`` equal-probability strata (unbiased, much
  lower variance for smooth integrands);
- ``"grid"``: the midpoints of the strata, a deterministic quantile rule.
"""

from __future__ import annotations

import math

import torch

MODES = ("iid", "stratified", "grid")


def _check(n_points: int, scale: float, clip: float, mode: str) -> None:
    if int(n_points) != n_points or n_points < 1:
        raise ValueError(f"n_points must be a positive integer, got {n_points!r}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite, got {scale!r}")
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be positive and finite, got {clip!r}")
    if mode not in MODES:
        raise ValueError(f"unknown integration mode {mode!r}; choose one of {MODES}")


def logistic_weights(logsnr: torch.Tensor, loc: float, scale: float, clip: float) -> torch.Tensor:
    """Inverse density of the truncated logistic at ``logsnr`` (any shape), in log-SNR units.

    ``w(a) = scale * tanh(clip / 2) / (sigmoid(v) * sigmoid(-v))`` with ``v = (a - loc) / scale``;
    ``tanh(clip/2)`` is the probability mass kept by the truncation.
    """
    v = (logsnr - loc) / scale
    # 1 / (sigmoid(v) sigmoid(-v)) = exp(softplus(v) + softplus(-v)), stable for large |v|.
    inv_density = torch.exp(torch.nn.functional.softplus(v) + torch.nn.functional.softplus(-v))
    return scale * math.tanh(clip / 2.0) * inv_density


def logistic_points(
    n_points: int,
    loc: float,
    scale: float,
    clip: float = 4.0,
    *,
    mode: str = "stratified",
    batch_shape: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-SNR points and their integration weights.

    Args:
        n_points: number of points ``n`` per integral.
        loc, scale, clip: the truncated logistic proposal, support ``loc +- clip * scale``.
        mode: ``"iid"``, ``"stratified"`` or ``"grid"`` (see module docstring).
        batch_shape: leading shape for independent sets of points (ignored by ``"grid"``,
            whose points are broadcast).
        generator: the only source of randomness; required for ``"iid"`` and
            ``"stratified"``.  Its device decides where the uniform draws are made.

    Returns:
        ``(logsnr, weights)``, each of shape ``(*batch_shape, n)`` (``(n,)`` for ``"grid"``
        broadcast to ``batch_shape``), sorted ascending along the last axis except for
        ``"iid"``.  ``sum(weights * f(logsnr), -1)`` estimates the truncated integral.
    """
    _check(n_points, scale, clip, mode)
    n = int(n_points)
    if mode == "grid":
        frac = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        frac = frac.expand((*batch_shape, n))
    else:
        if generator is None:
            raise ValueError(f"mode {mode!r} needs a torch.Generator (generator=...)")
        draws = torch.rand(
            (*batch_shape, n), generator=generator, dtype=torch.float64, device=generator.device
        ).cpu()
        frac = draws if mode == "iid" else (torch.arange(n, dtype=torch.float64) + draws) / n
    logsnr, weights = logistic_quantile(frac, loc, scale, clip)
    return logsnr.to(dtype=dtype, device=device), (weights / n).to(dtype=dtype, device=device)


def logistic_quantile(
    frac: torch.Tensor, loc: float, scale: float, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map fractions in [0, 1] to log-SNR through the truncated logistic quantile function.

    Returns ``(logsnr, inverse_density)`` with ``frac``'s shape (float64); divide the second
    by the number of points to get averaging weights.
    """
    frac = frac.to(torch.float64)
    lo, hi = 1.0 / (1.0 + math.exp(clip)), 1.0 / (1.0 + math.exp(-clip))
    logsnr = loc + scale * torch.logit(lo + (hi - lo) * frac)
    return logsnr, logistic_weights(logsnr, loc, scale, clip)


def default_loc_scale(log_eigs: torch.Tensor) -> tuple[float, float]:
    """Moment-matched logistic proposal for a Gaussian with log-eigenvalues ``log_eigs``.

    The Gaussian's mmse curve ``sum_i sigmoid(a + log lambda_i)`` is a sum of logistic CDFs;
    matching the mean and variance of the mixture of their densities gives
    ``loc = -mean(log lambda)`` and ``scale = sqrt(1 + 3/pi^2 * var(log lambda))``
    (a logistic of scale ``s`` has variance ``s^2 pi^2 / 3``).
    """
    log_eigs = log_eigs.double()
    loc = -log_eigs.mean().item()
    var = log_eigs.var(unbiased=False).item() if log_eigs.numel() > 1 else 0.0
    return loc, math.sqrt(1.0 + 3.0 / math.pi**2 * var)
