"""Distributions whose optimal denoiser and exact log-probability are known in closed form.

Use them to check an estimator, or as a denoiser in a demo.  Each is an ``nn.Module`` that
is itself a denoiser, ``f(z, logsnr) -> eps_hat`` with the exact posterior mean of the
noise, and has ``log_prob(x)`` and ``sample(n, generator)``.  The Gaussian-optimal
denoiser is :class:`itdiffusion.GaussianSpectrum` itself (``spectrum(z, logsnr)``).
Computation is in float64; outputs take the dtype of ``z``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .channel import alpha_sigma


def _flat64(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1).to(torch.float64)


class GaussianMixture(nn.Module):
    """Mixture of isotropic Gaussians ``sum_k w_k N(m_k, s_k^2 I)`` in ``d`` dimensions.

    Args:
        means: ``(K, d)`` component means.
        stds: ``(K,)`` component standard deviations (or a float for all).
        weights: ``(K,)`` mixture weights (normalised here); uniform when omitted.
        shape: shape of one example (default ``(d,)``).
    """

    def __init__(self, means, stds, weights=None, shape: tuple[int, ...] | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        weights = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if (stds <= 0).any() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("mixture needs positive stds and non-negative weights with a positive sum")
        self.register_buffer("means", means)
        self.register_buffer("log_vars", 2 * stds.log())
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not hold {d} values")

    @property
    def d(self) -> int:
        return self.means.shape[1]

    def _component_logits(self, y: torch.Tensor, scale: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """``log w_k + log N(y; scale * m_k, var_k I)``, shapes ``(B, d), (B, 1), (B, K) -> (B, K)``."""
        sq = (y * y).sum(1, keepdim=True) - 2 * scale * y @ self.means.T + scale**2 * (self.means**2).sum(1)
        return self.log_weights - 0.5 * (sq / var + self.d * torch.log(2 * math.pi * var))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x)`` per example, ``(B, *shape) -> (B,)`` float64."""
        y = _flat64(x)
        one = torch.ones(len(y), 1, dtype=torch.float64, device=y.device)
        return torch.logsumexp(self._component_logits(y, one, torch.exp(self.log_vars).expand(len(y), -1)), 1)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """Exact ``E[eps | z]``: ``sigma * sum_k r_k(z) (z - alpha m_k) / v_k``, ``v_k = alpha^2 s_k^2 + sigma^2``."""
        y = _flat64(z)
        alpha, sigma = alpha_sigma(logsnr.to(torch.float64).reshape(-1, 1))
        var = alpha**2 * torch.exp(self.log_vars) + sigma**2  # (B, K)
        resp = torch.softmax(self._component_logits(y, alpha, var), 1) / var
        eps_hat = sigma * (y * resp.sum(1, keepdim=True) - alpha * resp @ self.means)
        return eps_hat.to(z.dtype).reshape(z.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples ``(n, *shape)`` float64 (on the mixture's device)."""
        dev = self.means.device
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.d, dtype=torch.float64, generator=generator, device=dev)
        return (self.means[comp] + torch.exp(0.5 * self.log_vars[comp]).unsqueeze(1) * noise).reshape(n, *self.shape)


class FiniteDiscrete(nn.Module):
    """A distribution on finitely many points ``v_k`` with probabilities ``p_k``.

    Args:
        support: ``(K, *shape)`` support points (distinct).
        probs: ``(K,)`` probabilities (normalised here).
    """

    def __init__(self, support, probs):
        super().__init__()
        support = torch.as_tensor(support, dtype=torch.float64)
        probs = torch.as_tensor(probs, dtype=torch.float64)
        if probs.shape != support.shape[:1] or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError("probs must be (K,) non-negative with a positive sum, one per support point")
        self.shape = tuple(support.shape[1:])
        keep = probs > 0
        self.register_buffer("support", support.reshape(len(support), -1)[keep])
        self.register_buffer("log_probs", (probs[keep] / probs.sum()).log())

    @property
    def d(self) -> int:
        return self.support.shape[1]

    def log_prob(self, x: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
        """``log P(x)`` per example (``-inf`` off the support), ``(B, *shape) -> (B,)`` float64."""
        y = _flat64(x)
        dist = torch.cdist(y, self.support)
        nearest, idx = dist.min(1)
        out = self.log_probs[idx]
        return torch.where(nearest <= atol, out, torch.full_like(out, -math.inf))

    def posterior_mean(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """Exact ``E[x | z]`` as ``(B, d)`` float64."""
        y = _flat64(z)
        alpha, sigma = alpha_sigma(logsnr.to(torch.float64).reshape(-1, 1))
        # ||z - alpha v||^2 up to the term ||z||^2, which is the same for every k.
        logits = self.log_probs - (alpha**2 * (self.support**2).sum(1) - 2 * alpha * y @ self.support.T) / (
            2 * sigma**2
        )
        return torch.softmax(logits, 1) @ self.support

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """Exact ``E[eps | z] = (z - alpha E[x|z]) / sigma``."""
        y = _flat64(z)
        alpha, sigma = alpha_sigma(logsnr.to(torch.float64).reshape(-1, 1))
        eps_hat = (y - alpha * self.posterior_mean(z, logsnr)) / sigma
        return eps_hat.to(z.dtype).reshape(z.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples ``(n, *shape)`` float64."""
        idx = torch.multinomial(self.log_probs.exp(), n, replacement=True, generator=generator)
        return self.support[idx].reshape(n, *self.shape)

    @classmethod
    def discretized_mixture(cls, grid, means, stds, weights=None) -> "FiniteDiscrete":
        """A Gaussian mixture restricted to every point of ``grid`` in ``d = means.shape[1]`` dims.

        ``P(v) ~ sum_k w_k N(v; m_k, s_k^2 I)`` over all ``levels^d`` grid points.
        """
        means = torch.as_tensor(means, dtype=torch.float64)
        d = means.shape[1]
        axis = grid.value(torch.arange(grid.levels, dtype=torch.float64))
        support = torch.cartesian_prod(*([axis] * d)).reshape(-1, d)
        density = GaussianMixture(means, stds, weights).log_prob(support)
        return cls(support, torch.softmax(density, 0))


class FullGaussianMixture(nn.Module):
    """Mixture ``sum_k w_k N(m_k, Sigma_k)`` with full covariances (low-rank subspaces included).

    Args:
        means: ``(K, d)``; covs: ``(K, d, d)`` symmetric positive definite;
        weights: ``(K,)`` (normalised here; uniform when omitted); shape: of one example.

    Each covariance is kept as its eigen-decomposition ``V diag(lambda) V^T``, so the noisy
    marginal ``N(alpha m_k, alpha^2 Sigma_k + sigma^2 I)`` and the posterior mean are exact.
    """

    def __init__(self, means, covs, weights=None, shape: tuple[int, ...] | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        k, d = means.shape
        weights = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if covs.shape != (k, d, d) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("need (K, d, d) covariances and non-negative weights with a positive sum")
        eigs, vecs = torch.linalg.eigh(0.5 * (covs + covs.transpose(1, 2)))
        if (eigs <= 0).any():
            raise ValueError("covariances must be positive definite")
        self.register_buffer("means", means)
        self.register_buffer("eigs", eigs)
        self.register_buffer("vecs", vecs)
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not hold {d} values")

    @property
    def d(self) -> int:
        return self.means.shape[1]

    def _coords(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``V_k^T (y - scale m_k)`` for every component: ``(B, d), (B, 1) -> (B, K, d)``."""
        centred = y[:, None, :] - scale[:, :, None] * self.means[None]
        return torch.einsum("bkd,kde->bke", centred, self.vecs)

    def _logits(self, coords: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """``log w_k + log N`` from coordinates ``(B, K, d)`` and variances ``(B, K, d)``."""
        return self.log_weights - 0.5 * (coords**2 / var + torch.log(2 * math.pi * var)).sum(-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x)`` per example, ``(B, *shape) -> (B,)`` float64."""
        y = _flat64(x)
        coords = self._coords(y, torch.ones(len(y), 1, dtype=torch.float64, device=y.device))
        return torch.logsumexp(self._logits(coords, self.eigs.expand_as(coords)), 1)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """Exact ``E[eps | z] = (z - alpha E[x | z]) / sigma``."""
        y = _flat64(z)
        alpha, sigma = alpha_sigma(logsnr.to(torch.float64).reshape(-1, 1))
        coords = self._coords(y, alpha)
        var = alpha[:, :, None] ** 2 * self.eigs + sigma[:, :, None] ** 2  # (B, K, d)
        resp = torch.softmax(self._logits(coords, var), 1)  # (B, K)
        shrunk = alpha[:, :, None] * self.eigs / var * coords  # posterior mean minus m_k, in V_k's basis
        x_hat = (resp[:, :, None] * (self.means[None] + torch.einsum("bke,kde->bkd", shrunk, self.vecs))).sum(1)
        return ((y - alpha * x_hat) / sigma).to(z.dtype).reshape(z.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples ``(n, *shape)`` float64."""
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.d, dtype=torch.float64, generator=generator, device=self.means.device)
        scaled = noise * self.eigs[comp].sqrt()
        return (self.means[comp] + torch.einsum("nd,ned->ne", scaled, self.vecs[comp])).reshape(n, *self.shape)


class ProductDiscrete(nn.Module):
    """Independent coordinates, each on the values ``grid`` with its own probabilities.

    Args:
        grid: the :class:`~itdiffusion.core.grid.DiscreteGrid` of every coordinate.
        probs: ``(levels,)`` (the same law in every coordinate, needs ``d``) or ``(d, levels)``.
        d: number of coordinates when ``probs`` is one law.

    The posterior of the noisy channel factorises over coordinates, so the exact denoiser
    costs ``levels`` per coordinate whatever ``d`` is (where :class:`FiniteDiscrete` would
    need ``levels^d`` support points).
    """

    def __init__(self, grid, probs, d: int | None = None, shape: tuple[int, ...] | None = None):
        super().__init__()
        probs = torch.as_tensor(probs, dtype=torch.float64)
        if probs.dim() == 1:
            if d is None:
                raise ValueError("one law for every coordinate needs d")
            probs = probs.expand(int(d), -1)
        if probs.shape[1] != grid.levels or (probs < 0).any() or (probs.sum(1) <= 0).any():
            raise ValueError(f"probs must be (d, {grid.levels}) non-negative with positive row sums")
        self.grid = grid
        self.register_buffer("values", grid.value(torch.arange(grid.levels, dtype=torch.float64)))
        self.register_buffer("log_probs", (probs / probs.sum(1, keepdim=True)).log().clone())
        self.shape = tuple(shape) if shape is not None else (probs.shape[0],)

    @property
    def d(self) -> int:
        return self.log_probs.shape[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log P(x)`` per example (``-inf`` off the grid), ``(B, *shape) -> (B,)`` float64."""
        y = _flat64(x)
        k = self.grid.round_index(y).long()
        on = (self.grid.value(k.double()) - y).abs() <= 1e-6 * self.grid.delta
        lp = self.log_probs.gather(1, k.T).T  # (B, d)
        return torch.where(on, lp, torch.full_like(lp, -math.inf)).sum(1)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """Exact ``E[eps | z]`` from each coordinate's posterior over the grid values."""
        y = _flat64(z)
        alpha, sigma = alpha_sigma(logsnr.to(torch.float64).reshape(-1, 1))
        v = self.values
        logits = self.log_probs[None] - (alpha[:, :, None] * v - y[:, :, None]) ** 2 / (2 * sigma[:, :, None] ** 2)
        x_hat = (torch.softmax(logits, -1) * v).sum(-1)
        return ((y - alpha * x_hat) / sigma).to(z.dtype).reshape(z.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples ``(n, *shape)`` float64."""
        k = torch.multinomial(self.log_probs.exp(), n, replacement=True, generator=generator).T  # (n, d)
        return self.values[k].reshape(n, *self.shape)
