"""The training objective: a differentiable, unbiased estimate of the mean ``-log p(x)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .core.channel import add_noise
from .core.proposal import LogisticProposal

TRAIN_PROPOSALS = ("uniform", "logistic")


@dataclass(frozen=True)
class ITLoss:
    """``loss(model, x, generator, share=None)``: the information-theoretic objective in nats.

    One log-SNR per example, stratified across the batch over ``loc +- clip * scale`` of the
    model's proposal, uniformly (``proposal="uniform"``: every log-SNR weighs the same, no
    importance weights to blow up gradients) or from the truncated logistic
    (``"logistic"``, as in the published code, there with ``clip=4``); one noise draw per
    example.  The Gaussian control variate makes it an unbiased estimate of the truncated
    continuous NLL; gradients flow only through the denoiser.

    ``share=(rank, size, n)`` (data-parallel training): ``x`` holds rows ``rank::size`` of a
    batch of ``n`` examples.  The strata and the noise are drawn for the whole batch, exactly
    as one process would draw them, and this share's rows are taken; the value is
    ``size / n`` times the sum of this share's per-example losses, so that its average over
    the ``size`` processes (what ``DistributedDataParallel`` does to gradients) is the batch
    mean, however unevenly the batch is split.
    """

    proposal: str = "uniform"
    clip: float = 10.0

    def __post_init__(self):
        if self.proposal not in TRAIN_PROPOSALS:
            raise ValueError(f"unknown train_proposal {self.proposal!r}; choose one of {TRAIN_PROPOSALS}")

    def __call__(self, model, x: torch.Tensor, generator: torch.Generator | None = None, *,
                 share: tuple[int, int, int] | None = None) -> torch.Tensor:
        model.check_data(x, None)
        rank, size, n = (0, 1, len(x)) if share is None else (int(v) for v in share)
        rows = slice(rank, None, size)
        if not (0 <= rank < size and len(range(n)[rows]) == len(x)):
            raise ValueError(f"share {share} does not match a batch of {len(x)} examples")
        if generator is None:
            generator = torch.Generator(device=x.device)
            generator.seed()
        logsnr, weights = self._points(model, n, generator)
        logsnr, weights = logsnr[rows].to(x.device), weights[rows].to(x.device)
        eps = torch.randn((n, *x.shape[1:]), generator=generator, device=generator.device, dtype=x.dtype)
        eps = eps[rows].to(x.device)
        eps_hat = model(add_noise(x, logsnr, eps), logsnr)
        err = ((eps - eps_hat) ** 2).flatten(1).sum(1)
        per_example = _gaussian_terms(model.spectrum, x, logsnr, eps, weights, err)
        return per_example.mean() if share is None else per_example.sum() * (size / n)

    def _points(self, model, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` log-SNR values stratified over the range, and their inverse densities (CPU, float64)."""
        order = torch.randperm(n, generator=generator, device=generator.device).cpu().double()
        u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).cpu()
        frac = (order + u) / n
        proposal = LogisticProposal(model.loc, model.scale, self.clip)
        if self.proposal == "logistic":
            return proposal.quantile(frac)
        lo, hi = proposal.lo, proposal.hi
        return lo + (hi - lo) * frac, torch.full_like(frac, hi - lo)


def _gaussian_terms(spec, x, logsnr, eps, weights, err) -> torch.Tensor:
    """Per-example ``-log N(x) + w/2 (err - err_gauss)``, the Gaussian parts without gradients."""
    with torch.no_grad():
        # x and eps rotated in one product: a full basis is read from memory once per step
        rows_xe = torch.cat([x.detach().flatten(1).double() - spec.mean, eps.flatten(1).double()])
        y_x, y_e = spec.to_eigenbasis(rows_xe, shift=0.0).split(len(x))
        err_g = spec.denoise_error(x, logsnr, eps, x_eig=y_x, eps_eig=y_e)
        neg_log_gauss = -spec.log_prob(x, x_eig=y_x)
    return neg_log_gauss + 0.5 * weights * (err.double() - err_g)
