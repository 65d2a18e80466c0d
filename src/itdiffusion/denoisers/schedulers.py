"""diffusers schedulers by what they mean: which channel a network was trained on.

A scheduler configuration (``scheduler_config.json``, a dict or a scheduler object) names
its class in ``_class_name``; the class, not the name of a file, says how the network's
inputs and outputs relate to the data:

* **variance preserving** (:data:`VP_CLASSES`: DDPM, DDIM, PNDM, the DPM-Solver family,
  Euler, Heun, LMS, UniPC, DEIS, ...): the training schedule is the betas table
  (``trained_betas`` or ``beta_schedule``, ``num_train_timesteps``,
  ``rescale_betas_zero_snr``); the network is wrapped by
  :class:`~itdiffusion.denoisers.diffusers.DiffusersDenoiser`.
* **EDM** (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``): the network ``F``
  is preconditioned as in Karras et al. (2022), ``D(x, sigma) = c_skip x + c_out
  F(c_in x, c_noise)``; wrapped by :class:`~itdiffusion.denoisers.adapters.KarrasDenoiser`.
* **variance exploding** (``ScoreSdeVeScheduler``): the network is the score
  ``s(x, sigma) ~ -eps / sigma`` called with ``sigma``; ``D = x + sigma^2 s``.
* **flow matching** (``FlowMatchEulerDiscreteScheduler``): ``x_t = (1 - t) x + t eps``,
  velocity ``eps - x``, network timestep ``t * num_train_timesteps``;
  :class:`~itdiffusion.denoisers.adapters.FlowDenoiser`.  ``shift`` changes which ``t``
  were trained (``t -> shift t / (1 + (shift - 1) t)``), not the interpolation: it
  sets ``logsnr_range``.

Any other class is refused with one line naming it and the supported ones.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .adapters import FlowDenoiser, KarrasDenoiser
from .diffusers import DiffusersDenoiser, _output_tensor
from .schedule import _config_dict

__all__ = ["VP_CLASSES", "EDM_CLASSES", "VE_CLASSES", "FLOW_CLASSES", "scheduler_family", "full_config",
           "denoiser_for_scheduler"]

VP_CLASSES = frozenset({
    "DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler",
    "PNDMScheduler", "DPMSolverMultistepScheduler", "DPMSolverMultistepInverseScheduler",
    "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
    "SASolverScheduler", "LCMScheduler", "TCDScheduler", "RePaintScheduler", "UnCLIPScheduler",
})
EDM_CLASSES = frozenset({"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"})
VE_CLASSES = frozenset({"ScoreSdeVeScheduler"})
FLOW_CLASSES = frozenset({"FlowMatchEulerDiscreteScheduler"})


def _supported() -> str:
    return (f"variance-preserving ({', '.join(sorted(VP_CLASSES))}), EDM ({', '.join(sorted(EDM_CLASSES))}), "
            f"variance-exploding ({', '.join(sorted(VE_CLASSES))}), flow matching ({', '.join(sorted(FLOW_CLASSES))})")


def _class_name(config: Any) -> str | None:
    if hasattr(config, "config") and not isinstance(config, Mapping):
        return type(config).__name__
    return dict(config).get("_class_name") if isinstance(config, Mapping) else None


def scheduler_family(config: Any) -> str:
    """``"vp"``, ``"edm"``, ``"ve"`` or ``"flow"`` for a scheduler config or object.

    A plain dict without ``_class_name`` describes a DDPM-style betas schedule (``"vp"``).
    ValueError for any other class, or a VP class configured for another channel
    (``use_flow_sigmas``, continuous EDM-style timesteps).
    """
    name = _class_name(config)
    cfg = _config_dict(config)
    if name is None or name in VP_CLASSES:
        if cfg.get("use_flow_sigmas"):
            raise ValueError(f"{name} with use_flow_sigmas=True is a flow-matching schedule; use "
                             "FlowMatchEulerDiscreteScheduler or itdiffusion.denoisers.FlowDenoiser")
        if cfg.get("timestep_type", "discrete") != "discrete":
            raise ValueError(f"{name} with timestep_type={cfg['timestep_type']!r} takes EDM-style noise levels; "
                             "wrap the network with itdiffusion.denoisers.KarrasDenoiser")
        return "vp"
    for family, classes in (("edm", EDM_CLASSES), ("ve", VE_CLASSES), ("flow", FLOW_CLASSES)):
        if name in classes:
            return family
    raise ValueError(f"scheduler class {name!r} is not supported; supported: {_supported()}")


def full_config(config: Any) -> dict:
    """The config with the class's defaults filled in (through diffusers when it is installed).

    A hand-written ``scheduler_config.json`` may leave out keys whose defaults differ between
    classes (``LCMScheduler``'s betas are not ``DDPMScheduler``'s); diffusers knows them.
    """
    if hasattr(config, "config") and not isinstance(config, Mapping):
        return {"_class_name": type(config).__name__, **dict(config.config)}
    cfg = _config_dict(config)
    name = cfg.get("_class_name")
    if name is None:
        return cfg
    try:
        import diffusers
    except ImportError:
        return cfg
    cls = getattr(diffusers, name, None)
    if cls is None:
        return cfg
    return {"_class_name": name, **dict(cls.from_config(cfg).config)}


class EDMPreconditioned(nn.Module):
    """``D(x_noisy, sigma) -> x0_hat`` of an EDM network ``F`` as diffusers' EDM schedulers precondition it.

    ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)``, ``c_noise = log(sigma) / 4``,
    ``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)``, ``c_out = +-sigma sigma_data /
    sqrt(sigma^2 + sigma_data^2)`` (``-`` for ``v_prediction``);
    ``D = c_skip x + c_out F(c_in x, c_noise)``.
    """

    def __init__(self, unet: nn.Module, sigma_data: float = 0.5, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"EDM prediction_type {prediction_type!r} is not supported; known: epsilon, v_prediction")
        self.unet, self.sigma_data, self.sign = unet, float(sigma_data), 1.0 if prediction_type == "epsilon" else -1.0

    def forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.view(-1, *([1] * (x_noisy.ndim - 1)))
        norm = torch.sqrt(s**2 + self.sigma_data**2)
        out = _output_tensor(self.unet(x_noisy / norm, 0.25 * torch.log(sigma)), x_noisy.shape[1])
        return (self.sigma_data**2 / norm**2) * x_noisy + self.sign * (s * self.sigma_data / norm) * out


class ScoreToDenoiser(nn.Module):
    """``D(x_noisy, sigma) = x_noisy + sigma^2 s(x_noisy, sigma)`` of a score network (Tweedie's formula)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        score = _output_tensor(self.unet(x_noisy, sigma), x_noisy.shape[1])
        return x_noisy + sigma.view(-1, *([1] * (x_noisy.ndim - 1))) ** 2 * score


class VelocityNet(nn.Module):
    """``v(x_t, timestep)``: a diffusers network's ``.sample`` (first half if it predicts a variance too)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return _output_tensor(self.unet(x_t, timestep), x_t.shape[1])


def _flow_t_range(cfg: dict) -> tuple[float, float]:
    """(t_min, t_max) of a FlowMatch scheduler's training table, ``shift`` applied."""
    if cfg.get("use_dynamic_shifting") or cfg.get("invert_sigmas") or cfg.get("shift_terminal"):
        raise ValueError("FlowMatchEulerDiscreteScheduler with use_dynamic_shifting, invert_sigmas or shift_terminal "
                         "is not supported (its trained times depend on the image); wrap the network with "
                         "itdiffusion.denoisers.FlowDenoiser and give t_range")
    n, shift = int(cfg.get("num_train_timesteps", 1000)), float(cfg.get("shift", 1.0))
    ends = [1.0 / n, 1.0]
    return tuple(shift * t / (1 + (shift - 1) * t) for t in ends)


def denoiser_for_scheduler(unet: nn.Module, scheduler_config: Any) -> nn.Module:
    """The exact ``f(z, logsnr) -> eps_hat`` of a diffusers network trained under ``scheduler_config``."""
    family = scheduler_family(scheduler_config)
    cfg = full_config(scheduler_config)
    if family == "vp":
        return DiffusersDenoiser(unet, cfg)
    if family == "edm":
        D = EDMPreconditioned(unet, cfg.get("sigma_data", 0.5), cfg.get("prediction_type", "epsilon"))
        den = KarrasDenoiser(D, (cfg.get("sigma_min", 0.002), cfg.get("sigma_max", 80.0)))
    elif family == "ve":
        den = KarrasDenoiser(ScoreToDenoiser(unet), (cfg.get("sigma_min", 0.01), cfg.get("sigma_max", 1348.0)))
    else:
        den = FlowDenoiser(VelocityNet(unet), data_at=0, t_range=_flow_t_range(cfg),
                           time_scale=float(cfg.get("num_train_timesteps", 1000)))
    den.scheduler_config = cfg
    return den
