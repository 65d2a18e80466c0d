"""Adapter from Hugging Face diffusers UNets to the denoiser contract ``f(z, logsnr) -> eps_hat``.

diffusers itself is imported only inside `DiffusersDenoiser.from_pretrained`; the
adapter works with any module called as ``unet(sample, timestep)`` that returns an
object with a ``.sample`` tensor (or a tuple, or a tensor).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .schedule import LogSNRTimestepMap, _config_dict, diffusers_alphas_cumprod

__all__ = ["DiffusersDenoiser", "FixedClassLabel", "eps_from_prediction", "load_unet"]

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
        prediction, z: (B, *shape).
        logsnr: (B,) log-SNR of the channel that produced z (not the clamped one
            the network was told), so the conversion is that of the true channel.
    """
    if prediction_type == "epsilon":
        return prediction
    a = logsnr.to(torch.float64 if logsnr.device.type != "mps" else torch.float32)
    per_example = (-1, *([1] * (prediction.ndim - 1)))
    alpha = torch.sigmoid(a).sqrt().to(prediction.dtype).view(per_example)
    sigma = torch.sigmoid(-a).sqrt().to(prediction.dtype).view(per_example)
    if prediction_type == "v_prediction":
        return sigma * z + alpha * prediction
    if prediction_type == "sample":
        return (z - alpha * prediction) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(_PREDICTION_TYPES)}")


def _output_tensor(out: Any, channels: int | None = None) -> torch.Tensor:
    """The tensor in a diffusers model output (``.sample``), a tuple, or a tensor.

    With ``channels``, an output of twice that many channels (a learned variance after the
    mean's parametrisation) has its second half dropped.
    """
    if not isinstance(out, torch.Tensor):
        out = out.sample if hasattr(out, "sample") else out[0]
    if channels is not None and out.ndim > 1 and out.shape[1] == 2 * channels:
        out = out[:, :channels]
    return out


class FixedClassLabel(nn.Module):
    """A class-conditional diffusers network with its label fixed: ``net(x, t) = unet(x, t, class_labels=y)``."""

    def __init__(self, unet: nn.Module, class_label: int):
        super().__init__()
        classes = getattr(getattr(unet, "config", None), "num_class_embeds", None)
        if classes is not None and not 0 <= int(class_label) < int(classes):
            raise ValueError(f"class label {class_label} is outside the network's {classes} classes (0..{classes - 1})")
        self.unet, self.class_label = unet, int(class_label)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, **kwargs):
        labels = torch.full((sample.shape[0],), self.class_label, device=sample.device, dtype=torch.long)
        return self.unet(sample, timestep, class_labels=labels)


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
        from .schedulers import scheduler_family

        if scheduler_family(scheduler_config) != "vp":
            raise ValueError(f"{_scheduler_name(scheduler_config)} is not a variance-preserving (betas) schedule; "
                             "build the denoiser with itdiffusion.denoisers.denoiser_for_scheduler(unet, scheduler) "
                             "or DiffusersDenoiser.from_pretrained(folder)")
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
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float64 alpha_bar_t of the scheduler (the `Denoiser` protocol's optional schedule)."""
        return self.timesteps.alphas_cumprod

    @property
    def variance_type(self) -> Optional[str]:
        """The scheduler's ``variance_type`` in this package's names, or ``None``.

        ``fixed_small(_log)`` -> ``"fixed_small"``, ``fixed_large(_log)`` -> ``"fixed_large"``,
        ``learned_range`` (IDDPM's interpolation) -> ``"learned"`` when the UNet has twice the
        input channels; anything else is unknown.
        """
        kind = self.scheduler_config.get("variance_type")
        if kind in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"):
            return kind.removesuffix("_log")
        config = getattr(self.unet, "config", None)
        doubled = config is not None and getattr(config, "out_channels", None) == 2 * getattr(config, "in_channels", -1)
        return "learned" if kind == "learned_range" and doubled else None

    def eps_and_variance(self, z: torch.Tensor, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One UNet call: ``(eps_hat, v)``, ``v`` in [-1, 1] the ``learned_range`` variance output."""
        if self.variance_type != "learned":
            raise ValueError("this UNet has no learned_range variance output (needs out_channels = 2C)")
        logsnr = torch.as_tensor(logsnr, device=z.device).expand(z.shape[0])
        out = _output_tensor(self.unet(z, self.timesteps(logsnr).float()))
        c = z.shape[1]
        return eps_from_prediction(out[:, :c], z, logsnr, self.prediction_type), out[:, c:]

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
        if y is None and self.conditional:
            raise ValueError("this UNet is class-conditional and has no unconditional mode (y=None): give labels, "
                             "or the null label it was trained with (itd: --null-label K)")
        if y is not None:
            self._check_labels(y)
        kwargs = {} if y is None else {"class_labels": y}
        out = _output_tensor(self.unet(z, t, **kwargs), z.shape[1])
        return eps_from_prediction(out, z, logsnr, self.prediction_type)

    def _check_labels(self, y: torch.Tensor) -> None:
        """ValueError unless every label indexes the UNet's class embedding (``num_class_embeds``)."""
        classes = getattr(getattr(self.unet, "config", None), "num_class_embeds", None)
        if classes is None or y.numel() == 0 or y.is_floating_point():
            return
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= int(classes):
            raise ValueError(f"class label {lo if lo < 0 else hi} is outside this UNet's {classes} classes "
                             f"(0..{int(classes) - 1}; num_class_embeds={classes})")

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, subfolder: Optional[str] = None, *,
                        scheduler_config: Any = None) -> nn.Module:
        """The exact denoiser of a UNet2DModel saved by diffusers' ``save_pretrained``, with its own schedule.

        A local folder may be a pipeline folder (``unet/`` and ``scheduler/``) or a model
        folder (config.json + diffusion_pytorch_model.safetensors) with
        scheduler_config.json beside it or in ``../scheduler``; `subfolder` names the model
        folder inside it.  Anything else of the form ``owner/name`` is a Hub repo id, read
        from the local cache or downloaded (:func:`itdiffusion.denoisers.hub.local_snapshot`).
        Only safetensors weights are read.

        The scheduler config is the source of truth for the schedule and the
        parametrisation: a variance-preserving class gives a :class:`DiffusersDenoiser`, EDM
        and variance-exploding classes a :class:`~itdiffusion.denoisers.adapters.KarrasDenoiser`,
        flow matching a :class:`~itdiffusion.denoisers.adapters.FlowDenoiser`
        (:func:`itdiffusion.denoisers.schedulers.denoiser_for_scheduler`); other classes are
        refused.  A folder without one is refused unless ``scheduler_config`` (a dict or a
        scheduler) is given.  The returned denoiser is in eval mode.
        """
        from .schedulers import denoiser_for_scheduler

        root = local_root(path_or_repo_id, subfolder)
        model_dir = _local_model_dir(root, subfolder)
        if scheduler_config is None:
            scheduler_config = read_json(local_scheduler_file(root, model_dir))
        unet = _load_local_unet(model_dir)
        return denoiser_for_scheduler(unet, scheduler_config).eval()


def _scheduler_name(config: Any) -> str:
    if hasattr(config, "config") and not isinstance(config, Mapping):
        return type(config).__name__
    return str(dict(config).get("_class_name", "the scheduler"))


def local_root(path_or_repo_id: str | os.PathLike, subfolder: Optional[str] = None) -> Path:
    """A local folder, or the cached snapshot of a Hub repo id; FileNotFoundError for neither."""
    from .hub import local_snapshot, looks_like_repo_id

    root = Path(path_or_repo_id).expanduser()
    if root.is_dir():
        return root
    if root.exists() or not looks_like_repo_id(str(path_or_repo_id)):
        raise FileNotFoundError(f"{path_or_repo_id}: not a diffusers model folder or a Hub repo id (owner/name)")
    return Path(local_snapshot(str(path_or_repo_id), subfolder))


def load_unet(path_or_repo_id: str | os.PathLike, subfolder: Optional[str] = None):
    """A diffusers UNet2DModel (eval mode) from a saved folder or a Hub repo id, safetensors only.

    Folders and repo ids are looked up as in `DiffusersDenoiser.from_pretrained`.
    """
    root = local_root(path_or_repo_id, subfolder)
    return _load_local_unet(_local_model_dir(root, subfolder))


def _load_local_unet(model_dir: Path):
    """The folder's UNet2DModel, strictly (:func:`itdiffusion.denoisers.unet_files.load_unet_folder`)."""
    from .unet_files import load_unet_folder

    return load_unet_folder(model_dir)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ValueError naming the file if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


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


def scheduler_file_candidates(root: Path, model_dir: Path) -> list[Path]:
    """Where a model's scheduler_config.json may lie: beside it, in ../scheduler, in the root's scheduler/."""
    return [model_dir / _SCHEDULER_FILE, model_dir.parent / "scheduler" / _SCHEDULER_FILE,
            root / "scheduler" / _SCHEDULER_FILE, root / _SCHEDULER_FILE]


def local_scheduler_file(root: Path, model_dir: Path) -> Path:
    """The model's scheduler_config.json; FileNotFoundError saying what to add if there is none."""
    for path in scheduler_file_candidates(root, model_dir):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{root}: no {_SCHEDULER_FILE} beside the model or in a scheduler/ folder, so its noise schedule and "
        f"prediction type are unknown; save the scheduler it was trained with there (e.g. "
        f"DDPMScheduler(...).save_pretrained('{model_dir}')), or name a registry model whose schedule it uses "
        f"(--model NAME --weights {root})")
