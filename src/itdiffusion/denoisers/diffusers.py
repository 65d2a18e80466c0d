"""Adapter from Hugging Face diffusers UNets to the denoiser contract ``f(z, logsnr) -> eps_hat``.

diffusers itself is imported only inside `DiffusersDenoiser.from_pretrained`; the
adapter works with any module called as ``unet(sample, timestep)`` that returns an
object with a ``.sample`` tensor (or a tuple, or a tensor).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .schedule import LogSNRTimestepMap, _config_dict, diffusers_alphas_cumprod

__all__ = ["DiffusersDenoiser", "eps_from_prediction", "load_unet"]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_SCHEDULER_FILE = "scheduler_config.json"
_UNSAID = object()


def eps_from_prediction(
    prediction: torch.Tensor, z: torch.Tensor, logsnr: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Convert a network prediction to an epsilon prediction, exactly.

    With ``alpha = sqrt(sigmoid(logsnr))``, ``sigma = sqrt(sigmoid(-logsnr))`` and
    ``z = alpha x + sigma eps``:

    * "epsilon": the prediction is eps_hat.
    * "v_prediction": ``v = alpha eps - sigma x``; since ``alpha^2 + sigma^2 = 1``,
      ``sigma z + alpha v = (sigma^2 + alpha^2) eps = eps``.
    * "sample": the prediction is x_hat, and ``eps = (z - alpha x) / sigma``.

    Args:
        prediction, z: (B, C, H, W).
        logsnr: (B,) log-SNR of the channel that produced z (not the clamped one
            the network was told), so the conversion is that of the true channel.
    """
    if prediction_type == "epsilon":
        return prediction
    a = logsnr.to(torch.float64 if logsnr.device.type != "mps" else torch.float32)
    alpha = torch.sigmoid(a).sqrt().to(prediction.dtype).view(-1, 1, 1, 1)
    sigma = torch.sigmoid(-a).sqrt().to(prediction.dtype).view(-1, 1, 1, 1)
    if prediction_type == "v_prediction":
        return sigma * z + alpha * prediction
    if prediction_type == "sample":
        return (z - alpha * prediction) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(_PREDICTION_TYPES)}")


def _output_tensor(out: Any) -> torch.Tensor:
    """The tensor in a diffusers model output (``.sample``), a tuple, or a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


class DiffusersDenoiser(nn.Module):
    """Epsilon denoiser around a diffusers ``UNet2DModel`` (or same call signature).

    The log-SNR ``a`` of ``z = sqrt(sigmoid(a)) x + sqrt(sigmoid(-a)) eps`` is mapped
    to a continuous timestep in [0, T-1] by linear interpolation of the scheduler's
    table ``log(alpha_bar_t / (1 - alpha_bar_t))``, t = 0..T-1 (differentiable,
    vectorised).  Policy outside the trained range `logsnr_range`: the timestep is
    clamped to [0, T-1], i.e. the network extrapolates from the end of its schedule;
    the epsilon conversion still uses the true ``a``.  A network with twice the input
    channels (learned variance) has its second half dropped.

    Args:
        unet: ``unet(sample (B, C, H, W), timestep (B,) float) -> .sample``.
        scheduler_config: dict, diffusers config or scheduler with num_train_timesteps,
            beta_schedule, beta_start, beta_end, trained_betas, prediction_type.
    """

    def __init__(self, unet: nn.Module, scheduler_config: Any):
        super().__init__()
        self.unet = unet
        self.scheduler_config = _config_dict(scheduler_config)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {self.prediction_type!r}; known: {', '.join(_PREDICTION_TYPES)}"
            )
        self.timesteps = LogSNRTimestepMap(diffusers_alphas_cumprod(self.scheduler_config))

    @property
    def logsnr_range(self) -> tuple[float, float]:
        """(min, max) log-SNR covered by the training timesteps; clamped outside."""
        return self.timesteps.logsnr_range

    @property
    def conditional(self) -> Optional[bool]:
        """Whether the UNet takes class labels (``None``: it does not say; see :mod:`itdiffusion.core.condition`).

        A diffusers UNet without a class embedding ignores ``class_labels``, so labels are refused."""
        embedding = getattr(self.unet, "class_embedding", _UNSAID)
        return None if embedding is _UNSAID else embedding is not None

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z: (B, C, H, W); logsnr: (B,) or scalar -> eps_hat (B, C, H, W).

        `y` (B,) class labels are passed to class-conditional UNets as ``class_labels``.
        """
        logsnr = torch.as_tensor(logsnr, device=z.device).expand(z.shape[0])
        t = self.timesteps(logsnr).float()
        kwargs = {} if y is None else {"class_labels": y}
        out = _output_tensor(self.unet(z, t, **kwargs))
        if out.shape[1] == 2 * z.shape[1]:
            out = out[:, : z.shape[1]]
        return eps_from_prediction(out, z, logsnr, self.prediction_type)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, subfolder: Optional[str] = None) -> "DiffusersDenoiser":
        """Load a UNet2DModel and its scheduler config saved by diffusers' ``save_pretrained``.

        A local folder may be a pipeline folder (``unet/`` and ``scheduler/``) or a
        model folder (config.json + diffusion_pytorch_model.safetensors) with
        scheduler_config.json beside it or in ``../scheduler``; `subfolder` names the
        model folder inside it.  Only safetensors weights are read.  Anything that is
        not a local folder is handed to diffusers as a Hub repo id (needs network).
        The returned denoiser is in eval mode.
        """
        unet = load_unet(path_or_repo_id, subfolder)
        root = Path(path_or_repo_id)
        if root.is_dir():
            model_dir = _local_model_dir(root, subfolder)
            scheduler_config = _read_json(_local_scheduler_file(root, model_dir))
        else:
            scheduler_config = _remote_scheduler_config(str(path_or_repo_id), subfolder)
        return cls(unet, scheduler_config).eval()


def load_unet(path_or_repo_id: str | os.PathLike, subfolder: Optional[str] = None):
    """A diffusers UNet2DModel (eval mode) from a saved folder or a Hub repo id, safetensors only.

    Local folders are looked up as in `DiffusersDenoiser.from_pretrained`; anything that
    is not a local folder is handed to diffusers as a repo id (needs network).
    """
    from diffusers import UNet2DModel

    root = Path(path_or_repo_id)
    if root.is_dir():
        model_dir = _local_model_dir(root, subfolder)
        return UNet2DModel.from_pretrained(str(model_dir), use_safetensors=True).eval()
    if root.exists() or str(path_or_repo_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path_or_repo_id}: not a diffusers model folder")
    return UNet2DModel.from_pretrained(str(path_or_repo_id), subfolder=subfolder, use_safetensors=True).eval()


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _local_model_dir(root: Path, subfolder: Optional[str]) -> Path:
    """The folder holding the UNet's config.json inside a saved model or pipeline."""
    if subfolder is not None:
        candidates = [root / subfolder]
    else:
        candidates = [root / "unet", root]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"{root}: no config.json in {' or '.join(str(c) for c in candidates)}")


def _local_scheduler_file(root: Path, model_dir: Path) -> Path:
    """scheduler_config.json beside the model, in ../scheduler, or in the root's scheduler/."""
    candidates = [
        model_dir / _SCHEDULER_FILE,
        model_dir.parent / "scheduler" / _SCHEDULER_FILE,
        root / "scheduler" / _SCHEDULER_FILE,
        root / _SCHEDULER_FILE,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{root}: no {_SCHEDULER_FILE} beside the model or in a scheduler/ folder")


def _remote_scheduler_config(repo_id: str, subfolder: Optional[str]) -> dict:
    """Scheduler config of a Hub repo: from its scheduler/ folder, else beside the model."""
    from diffusers import DDPMScheduler

    errors = []
    for folder in ("scheduler", subfolder):
        try:
            return dict(DDPMScheduler.load_config(repo_id, subfolder=folder))
        except (OSError, ValueError) as err:  # EnvironmentError is OSError
            errors.append(f"{folder or '.'}: {err}")
    raise FileNotFoundError(f"{repo_id}: no scheduler config found ({'; '.join(errors)})")
