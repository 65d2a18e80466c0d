"""A re-implementation of the published evaluation loop, for side-by-side timing.

Written from the description of the published code (ITD-NOTES.md, sections 3-4), not
copied from it.  Per batch of images and for each log-SNR point in turn:

1. plain error: draw noise, one network call, ``||eps - eps_hat||^2``;
2. rounded error: draw *fresh* noise, a second call, soft-round ``x_hat`` with a softmax
   over **all** grid levels (a ``(levels, batch, d)`` tensor) whose kernel has the published
   variance ``1 / (1 + e^a) = sigmoid(-a)``, ``e^a ||x - x_soft||^2``;
3. dequantized error: draw fresh noise on ``x + u`` (uniform dequantization), a third call.

Continuous and dequantized integrals use the analytic Gaussian mmse as baseline (no control
variate), the rounded one none; computation is in the network's dtype (float32), as published.
"""

from __future__ import annotations

import math

import torch

from itdiffusion.core.channel import add_noise, x_from_eps


def dense_soft_round(x_hat: torch.Tensor, logsnr: float, grid) -> torch.Tensor:
    """Posterior mean over all levels: softmax over a ``(levels, *x_hat.shape)`` tensor, with the
    published kernel ``exp(-(x_hat - v)^2 (1 + e^a) / 2)`` (variance ``sigmoid(-a)``)."""
    values = grid.lo + grid.delta * torch.arange(grid.levels, dtype=x_hat.dtype, device=x_hat.device)
    values = values.reshape(-1, *([1] * x_hat.dim()))
    logits = -0.5 * (1.0 + math.exp(logsnr)) * (x_hat.unsqueeze(0) - values) ** 2
    return (torch.softmax(logits, dim=0) * values).sum(0)


@torch.no_grad()
def published_evaluation(denoiser, x, logsnr, weights, grid, spectrum, generator) -> dict:
    """Per-image NLLs (nats) of one batch ``x`` at the points ``logsnr`` with ``weights``.

    Three network calls per (image, point).  Returns ``continuous``, ``discrete`` (soft
    rounding) and ``dequantized`` tensors of shape ``(B,)``.
    """
    n = len(x)
    dims = tuple(range(1, x.dim()))
    y = x + grid.delta * (torch.rand(x.shape, generator=generator, dtype=x.dtype) - 0.5)
    mmse_g = spectrum.mmse(logsnr).tolist()
    h_g = spectrum.entropy()
    cont = torch.zeros(n, dtype=x.dtype)
    disc = torch.zeros(n, dtype=x.dtype)
    deq = torch.zeros(n, dtype=x.dtype)
    for j, (a, w) in enumerate(zip(logsnr.tolist(), weights.tolist())):
        a_batch = torch.full((n,), a, dtype=x.dtype)
        # 1. plain
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        err = ((eps - denoiser(add_noise(x, a_batch, eps), a_batch)) ** 2).sum(dims)
        cont += 0.5 * w * (err - mmse_g[j])
        # 2. rounded, with fresh noise and its own call
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        z = add_noise(x, a_batch, eps)
        x_hat = x_from_eps(z, denoiser(z, a_batch), a_batch)
        disc += 0.5 * w * math.exp(a) * ((x - dense_soft_round(x_hat, a, grid)) ** 2).sum(dims)
        # 3. dequantized
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        err = ((eps - denoiser(add_noise(y, a_batch, eps), a_batch)) ** 2).sum(dims)
        deq += 0.5 * w * (err - mmse_g[j])
    d = x[0].numel()
    return {"continuous": h_g + cont, "discrete": disc, "dequantized": h_g + deq - d * math.log(grid.delta)}
