"""The discrete-time diffusion schedule of the variational bound (``DiscreteSchedule``) and the default one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_STEPS = 1000  # discrete-time steps when the denoiser has no schedule of its own
VARIANCES = ("fixed_small", "fixed_large", "fixed_large_beta1", "learned")


@dataclass(frozen=True)
class DiscreteSchedule:
    """The coefficients of a discrete-time diffusion with ``T`` steps (float64 ``(T,)`` each).

    Step ``i = 0..T-1`` is the paper's ``t = i + 1``.  ``alphas_cumprod[i]`` is
    ``alpha_bar_t``; ``alphas_cumprod_prev[0] = 1`` is the data.
    """

    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    betas: torch.Tensor
    posterior_variance: torch.Tensor  # beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t, 0 at t = 1
    posterior_log_variance_clipped: torch.Tensor  # log beta_tilde_t, with t = 1 taking t = 2's value
    posterior_mean_coef_x: torch.Tensor  # coefficient of x_0 in the posterior mean
    logsnr: torch.Tensor  # log(abar_t / (1 - abar_t)), decreasing

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "DiscreteSchedule":
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().flatten()
        if len(abar) < 2 or not bool(((abar > 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError("alphas_cumprod must be a strictly decreasing sequence in (0, 1) of length >= 2")
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        betas = 1.0 - abar / prev
        post_var = (1.0 - prev) / (1.0 - abar) * betas
        clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        return cls(
            alphas_cumprod=abar,
            alphas_cumprod_prev=prev,
            betas=betas,
            posterior_variance=post_var,
            posterior_log_variance_clipped=clipped,
            posterior_mean_coef_x=prev.sqrt() * betas / (1.0 - abar),
            logsnr=torch.log(abar) - torch.log1p(-abar),
        )

    @property
    def steps(self) -> int:
        return len(self.alphas_cumprod)

    def model_log_variance(self, index: torch.Tensor, variance: str, frac: torch.Tensor | None = None) -> torch.Tensor:
        """Log-variance of ``p(x_{t-1} | x_t)`` at steps ``index`` (IDDPM conventions).

        ``fixed_small``: ``beta_tilde_t`` (``beta_tilde_2`` at t = 1, where ``beta_tilde_1 = 0``);
        ``fixed_large``: ``beta_t`` for t >= 2 and ``beta_tilde_2`` at t = 1, the definition of
        DDPM's code and OpenAI's improved-diffusion (``log(append(posterior_variance[1], betas[1:]))``);
        ``fixed_large_beta1``: ``beta_t`` at every step, ``beta_1`` at t = 1 (diffusers' sampler;
        ``beta_1 = 1 - abar_1`` is about the variance of ``x_0`` given ``x_1`` when the data vary much
        more than the noise, so this decoder is the better calibrated one for continuous data);
        ``learned``: ``frac * log beta_t + (1 - frac) * log beta_tilde_t`` (clipped) with
        ``frac = (v + 1) / 2`` from the network's second output half (``frac`` must broadcast
        against the result), IDDPM's interpolation (so its ``v = 1`` end is ``fixed_large_beta1``).
        """
        clipped = self.posterior_log_variance_clipped.to(index.device)[index]
        if variance == "fixed_small":
            return clipped
        log_beta = torch.log(self.betas).to(index.device)[index]
        if variance == "fixed_large":
            return torch.where(index == 0, clipped, log_beta)
        if variance == "fixed_large_beta1":
            return log_beta
        if variance == "learned":
            return frac * log_beta + (1.0 - frac) * clipped
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")


def logsnr_linear_alphas_cumprod(logsnr_lo: float, logsnr_hi: float, steps: int = DEFAULT_STEPS) -> torch.Tensor:
    """``alpha_bar_t`` ``(T,)`` of a schedule whose log-SNR falls linearly from ``logsnr_hi`` to ``logsnr_lo``.

    The default discrete-time schedule for a denoiser without one: with the model's
    integration range it spans the same log-SNRs as the IT estimator.
    """
    if int(steps) != steps or steps < 2 or not logsnr_hi > logsnr_lo:
        raise ValueError(f"need steps >= 2 and logsnr_hi > logsnr_lo, got {steps}, ({logsnr_lo}, {logsnr_hi})")
    return torch.sigmoid(torch.linspace(logsnr_hi, logsnr_lo, int(steps), dtype=torch.float64))
