"""An independent float64 restatement of the published test protocol's arithmetic
(Kong et al.'s ``test_nll``), written from its definitions for tests of ``protocol="paper"``.

It shares nothing with the package but the inputs: the data, the network (called as
``denoiser(z, logsnr)``), the Gaussian reference's ``log_eigs`` and entropy inputs, the points
and the noise.  Everything else -- the channel, ``x_hat``, clamping, hard and soft rounding
(a softmax over every grid value), tails, weights, mean curves and the three published
estimates -- is computed here, in float64.
"""

from __future__ import annotations

import math

import torch


def published_points_reference(n: int, loc: float, scale: float, clip: float = 4.0):
    """The published construction verbatim in spirit: global seed 0, ``rand`` in float32.

    Returns ``(logsnr, weights)`` float32, unsorted, weights in the *mean* form (the published
    integral is ``mean(w f)``).  The global RNG state is restored afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ps = torch.rand(n)
    loc, scale, clip = (torch.tensor(float(v)) for v in (loc, scale, clip))
    ps = torch.sigmoid(-clip) + (torch.sigmoid(clip) - torch.sigmoid(-clip)) * ps
    logsnr = loc + scale * torch.logit(ps)
    v = (logsnr - loc) / scale
    weights = scale * torch.tanh(clip / 2) / (torch.sigmoid(v) * torch.sigmoid(-v))
    return logsnr, weights


def _x_hat(denoiser, z: torch.Tensor, a: float) -> torch.Tensor:
    logsnr = torch.full((len(z),), a, dtype=torch.float32)
    eps_hat = denoiser(z.float(), logsnr).double()
    return math.sqrt(1 + math.exp(-a)) * z - math.exp(-a / 2) * eps_hat


def _soft(x_hat: torch.Tensor, a: float, lo: float, hi: float, delta: float) -> torch.Tensor:
    bins = torch.linspace(lo, hi, 1 + round((hi - lo) / delta), dtype=torch.float64)
    bins = bins.reshape(-1, *([1] * x_hat.dim()))
    p = torch.softmax(-0.5 * (x_hat.unsqueeze(0) - bins) ** 2 * (1 + math.exp(a)), dim=0)
    return (bins * p).sum(0)


def _mse(x: torch.Tensor, x_hat: torch.Tensor, a: float) -> torch.Tensor:
    return math.exp(a) * ((x - x_hat) ** 2).flatten(1).sum(1)


@torch.no_grad()
def per_point_errors(denoiser, x, logsnr, eps, dequant, lo, hi, delta):
    """``(B, m)`` float64 errors: raw (clamped), hard, soft (both then clamped) and dequantized (unclamped).

    ``eps`` ``(B, m, *shape)``: the noise of each image at each point; ``dequant`` ``(B, *shape)``
    uniform offsets in ``[-1/2, 1/2)``.
    """
    x = x.double()
    xd = x + delta * dequant.double()
    out = {k: torch.zeros(len(x), len(logsnr), dtype=torch.float64) for k in ("raw", "hard", "soft", "deq")}
    for j, a in enumerate(logsnr.tolist()):
        e = eps[:, j].double()
        alpha, sigma = math.sqrt(1 / (1 + math.exp(-a))), math.sqrt(1 / (1 + math.exp(a)))
        x_hat = _x_hat(denoiser, alpha * x + sigma * e, a)
        out["raw"][:, j] = _mse(x, x_hat.clamp(lo, hi), a)
        out["hard"][:, j] = _mse(x, (delta * torch.round((x_hat - lo) / delta) + lo).clamp(lo, hi), a)
        out["soft"][:, j] = _mse(x, _soft(x_hat, a, lo, hi, delta).clamp(lo, hi), a)
        out["deq"][:, j] = _mse(xd, _x_hat(denoiser, alpha * xd + sigma * e, a), a)
    return out


def published_estimates(errors, logsnr, weights, log_eigs, lo_a, hi_a, lo, hi, delta, rounding="soft"):
    """The published figures in nats from :func:`per_point_errors`: ``continuous`` and
    ``dequantized`` (data-set mean curve, min with the Gaussian's), ``discrete`` (min of the
    mean raw and mean rounded curves, plus tails), and per-image ``continuous_per_image``,
    ``discrete_per_image`` (rounded curve only)."""
    log_eigs = log_eigs.double()
    d = log_eigs.numel()
    a = logsnr.double()
    w = weights.double()
    mmse_g = torch.sigmoid(a[:, None] + log_eigs[None, :]).sum(1)
    h_g = 0.5 * d * math.log(2 * math.pi * math.e) + 0.5 * log_eigs.sum().item()
    mean = {k: v.mean(0) for k, v in errors.items()}
    left = 0.5 * torch.log1p(torch.exp(lo_a + log_eigs)).sum().item()
    right = 4 * d * sum(math.exp(-((j - 0.5) ** 2) * delta**2 * math.exp(hi_a)) for j in range(1, int((hi - lo) / delta) + 1))
    return {
        "continuous_gauss_min": (h_g - 0.5 * w * (mmse_g - mean["raw"]).clamp_min(0)).mean().item(),
        "dequantized_gauss_min": (h_g - 0.5 * w * (mmse_g - mean["deq"]).clamp_min(0)).mean().item(),
        "discrete_published_min": (0.5 * w * torch.minimum(mean["raw"], mean[rounding])).mean().item() + left + right,
        "continuous_per_image": h_g + 0.5 * (w * (errors["raw"] - mmse_g)).mean(1),
        "discrete_per_image": left + right + 0.5 * (w * errors[rounding]).mean(1),
    }
