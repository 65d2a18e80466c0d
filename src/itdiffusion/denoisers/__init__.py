"""Pretrained denoisers as ``f(z, logsnr) -> eps_hat``.

* `IDDPMUNet` / `IDDPMDenoiser`: OpenAI improved-diffusion networks (checkpoint-compatible).
* `DiffusersDenoiser`: a diffusers ``UNet2DModel`` with its variance-preserving schedule;
  `DiffusersDenoiser.from_pretrained` reads any saved folder or Hub repo by its scheduler class.
* `KarrasDenoiser` / `FlowDenoiser`: exact adapters from EDM-style ``D(x, sigma)`` and
  flow-matching velocities; `denoiser_for_scheduler` picks the one a diffusers scheduler means.
* `build_denoiser` / `list_models`: named pretrained models (architecture, schedule, data format).
* `load_state_dict` / `load_into`: weights loading that never runs code from a file.
* `Denoiser`: the protocol every adapter follows (:mod:`.protocol`: required call, optional facts).

Importing this package does not import diffusers.
"""

from .adapters import FlowDenoiser, KarrasDenoiser
from .diffusers import DiffusersDenoiser, eps_from_prediction, load_unet
from .iddpm import IDDPMDenoiser, IDDPMUNet
from .loading import load_into, load_state_dict
from .protocol import Denoiser
from .registry import ModelSpec, build_denoiser, list_models, model_spec
from .schedule import LogSNRTimestepMap, diffusers_alphas_cumprod, iddpm_alphas_cumprod
from .schedulers import denoiser_for_scheduler, scheduler_family

__all__ = [
    "Denoiser",
    "DiffusersDenoiser",
    "FlowDenoiser",
    "KarrasDenoiser",
    "denoiser_for_scheduler",
    "scheduler_family",
    "IDDPMDenoiser",
    "IDDPMUNet",
    "LogSNRTimestepMap",
    "ModelSpec",
    "build_denoiser",
    "diffusers_alphas_cumprod",
    "eps_from_prediction",
    "iddpm_alphas_cumprod",
    "list_models",
    "load_into",
    "load_state_dict",
    "load_unet",
    "model_spec",
]
