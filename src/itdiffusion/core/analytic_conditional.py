"""Class-conditional laws with exact conditional and unconditional denoisers (closed-form truth).

Each is an ``nn.Module`` denoiser ``f(z, logsnr, y=None) -> eps_hat``: with ``y=None`` the
exact ``E[eps | z]`` of the marginal law, with labels ``y`` ``(B,)`` the exact ``E[eps | z, y]``.
``log_prob(x, y=None)`` is ``log p(x)`` or ``log p(x | y)``, ``log_likelihoods(x)`` the
``(B, K)`` table ``log p(x | k)``, ``pointwise_mi(x, y) = log p(x | y) - log p(x)`` and
``posterior(x)`` the exact Bayes ``p(k | x)`` under the law's class weights.
"""

from __future__ import annotations

import math

import torch

from .analytic import GaussianMixture, _flat64
from .channel import alpha_sigma


def _mask(logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Logits ``(B, K)`` kept only at each row's class ``y`` (``None``: all kept)."""
    if y is None:
        return logits
    keep = torch.nn.functional.one_hot(y.long().reshape(-1).to(logits.device), logits.shape[1]).bool()
    return logits.masked_fill(~keep, -math.inf)


class ClassMixture(GaussianMixture):
    """A Gaussian mixture whose component ``k`` is class ``k``: ``p(x | k) = N(m_k, s_k^2 I)``,
    ``P(k) = w_k`` (arguments as :class:`~itdiffusion.core.analytic.GaussianMixture`)."""

    conditional = True

    @property
    def n_classes(self) -> int:
        return self.means.shape[0]

    def _check_labels(self, y: torch.Tensor) -> torch.Tensor:
        y = torch.as_tensor(y).long().reshape(-1)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
            raise ValueError(f"labels must lie in [0, {self.n_classes}), got {y.min().item()}..{y.max().item()}")
        return y

    def log_likelihoods(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x | k)`` for every class, ``(B, *shape) -> (B, K)`` float64."""
        flat = _flat64(x)
        one = torch.ones(len(flat), 1, dtype=torch.float64, device=flat.device)
        return self._component_logits(flat, one, torch.exp(self.log_vars).expand(len(flat), -1)) - self.log_weights

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``log p(x)`` or ``log p(x | y)``, ``(B,)`` float64."""
        table = self.log_likelihoods(x)
        if y is None:
            return torch.logsumexp(table + self.log_weights, 1)
        return table.gather(1, self._check_labels(y).to(table.device)[:, None])[:, 0]

    def pointwise_mi(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Exact ``i(x; y) = log p(x | y) - log p(x)`` in nats, ``(B,)``."""
        return self.log_prob(x, y) - self.log_prob(x)

    def posterior(self, x: torch.Tensor, uniform: bool = False) -> torch.Tensor:
        """Exact ``p(k | x)`` ``(B, K)`` (``uniform``: under a uniform prior over classes)."""
        table = self.log_likelihoods(x)
        return torch.softmax(table if uniform else table + self.log_weights, 1)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``E[eps | z]`` (``y=None``) or ``E[eps | z, y]`` (component ``y`` alone)."""
        flat = _flat64(z)
        alpha, sigma = alpha_sigma(logsnr.to(torch.float64).reshape(-1, 1))
        var = alpha**2 * torch.exp(self.log_vars) + sigma**2  # (B, K)
        labels = None if y is None else self._check_labels(y)
        resp = torch.softmax(_mask(self._component_logits(flat, alpha, var), labels), 1) / var
        eps_hat = sigma * (flat * resp.sum(1, keepdim=True) - alpha * resp @ self.means)
        return eps_hat.to(z.dtype).reshape(z.shape)

    def sample_labelled(self, n: int, generator: torch.Generator | None = None):
        """``(x (n, *shape) float64, labels (n,) int64)`` from the joint law."""
        dev = self.means.device
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.d, dtype=torch.float64, generator=generator, device=dev)
        x = self.means[comp] + torch.exp(0.5 * self.log_vars[comp]).unsqueeze(1) * noise
        return x.reshape(n, *self.shape), comp


class JointFinite(torch.nn.Module):
    """A joint law ``P(x_n, k)`` of finitely many points ``x_n`` and ``K`` classes.

    Args:
        support: ``(N, *shape)`` distinct points; joint: ``(N, K)`` non-negative (normalised here),
            every class with positive mass.
    """

    conditional = True

    def __init__(self, support, joint):
        super().__init__()
        support = torch.as_tensor(support, dtype=torch.float64)
        joint = torch.as_tensor(joint, dtype=torch.float64)
        if joint.dim() != 2 or joint.shape[0] != len(support) or (joint < 0).any() or (joint.sum(0) <= 0).any():
            raise ValueError("joint must be (N, K) non-negative, one row per support point, every class with mass")
        joint = joint / joint.sum()
        self.shape = tuple(support.shape[1:])
        self.register_buffer("support", support.reshape(len(support), -1))
        self.register_buffer("log_joint", joint.log())

    @classmethod
    def discretized(cls, grid, means, stds, weights=None) -> "JointFinite":
        """Class ``k``: ``N(m_k, s_k^2 I)`` restricted to the grid points of ``d = means.shape[1]`` dims."""
        means = torch.as_tensor(means, dtype=torch.float64)
        k, d = means.shape
        axis = grid.value(torch.arange(grid.levels, dtype=torch.float64))
        support = torch.cartesian_prod(*([axis] * d)).reshape(-1, d)
        table = ClassMixture(means, stds, torch.ones(k)).log_likelihoods(support)  # (N, K)
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        joint = torch.softmax(table, 0) * (w / w.sum())  # P(x | k) on the grid times P(k)
        return cls(support, joint)

    @property
    def d(self) -> int:
        return self.support.shape[1]

    @property
    def n_classes(self) -> int:
        return self.log_joint.shape[1]

    def _index(self, x: torch.Tensor, atol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        nearest, idx = torch.cdist(_flat64(x), self.support).min(1)
        return idx, nearest <= atol

    def log_likelihoods(self, x: torch.Tensor) -> torch.Tensor:
        """``log P(x | k)`` ``(B, K)`` (``-inf`` off the support)."""
        idx, on = self._index(x)
        table = (self.log_joint - torch.logsumexp(self.log_joint, 0))[idx]
        return torch.where(on[:, None], table, torch.full_like(table, -math.inf))

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``log P(x)`` or ``log P(x | y)``, ``(B,)`` float64."""
        if y is None:
            idx, on = self._index(x)
            out = torch.logsumexp(self.log_joint, 1)[idx]
            return torch.where(on, out, torch.full_like(out, -math.inf))
        return self.log_likelihoods(x).gather(1, torch.as_tensor(y).long().reshape(-1, 1))[:, 0]

    def pointwise_mi(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``i(x; y) = log P(x | y) - log P(x)`` in nats, ``(B,)``."""
        return self.log_prob(x, y) - self.log_prob(x)

    def posterior(self, x: torch.Tensor, uniform: bool = False) -> torch.Tensor:
        """``P(k | x)`` ``(B, K)`` (``uniform``: under a uniform prior over classes)."""
        idx, _ = self._index(x)
        table = self.log_likelihoods(x) if uniform else self.log_joint[idx]
        return torch.softmax(table, 1)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``E[eps | z]`` or ``E[eps | z, y] = (z - alpha E[x | z, y]) / sigma``."""
        flat = _flat64(z)
        alpha, sigma = alpha_sigma(logsnr.to(torch.float64).reshape(-1, 1))
        if y is None:
            prior = torch.logsumexp(self.log_joint, 1).expand(len(flat), -1)
        else:
            cond = self.log_joint - torch.logsumexp(self.log_joint, 0)
            prior = cond[:, torch.as_tensor(y, device=cond.device).long().reshape(-1)].T  # (B, N)
        logits = prior - (alpha**2 * (self.support**2).sum(1) - 2 * alpha * flat @ self.support.T) / (2 * sigma**2)
        x_hat = torch.softmax(logits, 1) @ self.support
        return ((flat - alpha * x_hat) / sigma).to(z.dtype).reshape(z.shape)

    def sample_labelled(self, n: int, generator: torch.Generator | None = None):
        """``(x (n, *shape) float64, labels (n,) int64)`` from the joint law."""
        flat = torch.multinomial(self.log_joint.exp().reshape(-1), n, replacement=True, generator=generator)
        k = self.n_classes
        return self.support[flat // k].reshape(n, *self.shape), flat % k
