"""Named pretrained denoisers: architecture, noise schedule and data format of each.

``build_denoiser(name, weights)`` builds the network, loads the weights safely and
wraps it as ``f(z, logsnr) -> eps_hat``.  No weights are downloaded unless a Hub repo
id is passed as `weights` (which needs network access).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

from torch import nn

from .diffusers import DiffusersDenoiser, load_unet, local_root
from .iddpm import IDDPMDenoiser, IDDPMUNet
from .loading import load_into, load_state_dict

__all__ = ["ModelSpec", "build_denoiser", "list_models", "model_spec"]


@dataclass(frozen=True)
class ModelSpec:
    """What a named model is and what data it models.

    Attributes:
        name: registry name.
        architecture: "diffusers.UNet2DModel" or "itdiffusion.IDDPMUNet".
        config: the network's constructor arguments.
        schedule: the noise schedule (a diffusers scheduler config, or the
            IDDPMDenoiser arguments).
        weights: where the published weights come from (file name or Hub repo id).
        data_shape: (C, H, W) of one image.
        data_levels: number of grid values per dimension (8-bit images: 256).
        data_range: (lo, hi) that the grid spans; spacing (hi - lo) / (levels - 1).
        description: one line for humans.
    """

    name: str
    architecture: str
    config: Mapping[str, Any]
    schedule: Mapping[str, Any]
    weights: str
    data_shape: tuple[int, int, int] = (3, 32, 32)
    data_levels: int = 256
    data_range: tuple[float, float] = (-1.0, 1.0)
    description: str = field(default="", compare=False)

    @property
    def data_delta(self) -> float:
        """Grid spacing of the data (2/255 for 8-bit images in [-1, 1])."""
        lo, hi = self.data_range
        return (hi - lo) / (self.data_levels - 1)


def _frozen(d: dict) -> Mapping[str, Any]:
    return MappingProxyType(d)


# google/ddpm-cifar10-32: diffusers UNet2DModel (35,746,307 parameters) + DDPMScheduler.
_DDPM_CIFAR10_UNET = {
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
_DDPM_CIFAR10_SCHEDULER = {
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
    "prediction_type": "epsilon",
}

# OpenAI improved-diffusion cifar10_uncond_vlb_50M_500K.pt (52,546,438 parameters).
_IDDPM_CIFAR10_VLB_UNET = {
    "in_channels": 3,
    "model_channels": 128,
    "out_channels": 6,
    "num_res_blocks": 3,
    "attention_resolutions": [2, 4],
    "dropout": 0.3,
    "channel_mult": [1, 2, 2, 2],
    "num_classes": None,
    "use_checkpoint": False,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": True,
}
_IDDPM_CIFAR10_VLB_SCHEDULE = {"diffusion_steps": 4000, "noise_schedule": "cosine", "rescale_timesteps": True}

_DIFFUSERS_UNET = "diffusers.UNet2DModel"
_IDDPM_UNET = "itdiffusion.IDDPMUNet"

_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="ddpm-cifar10",
            architecture=_DIFFUSERS_UNET,
            config=_frozen(_DDPM_CIFAR10_UNET),
            schedule=_frozen(_DDPM_CIFAR10_SCHEDULER),
            weights="google/ddpm-cifar10-32",
            description="DDPM (Ho et al. 2020) on CIFAR-10, linear betas 1e-4..0.02 over 1000 steps",
        ),
        ModelSpec(
            name="iddpm-cifar10-vlb",
            architecture=_IDDPM_UNET,
            config=_frozen(_IDDPM_CIFAR10_VLB_UNET),
            schedule=_frozen(_IDDPM_CIFAR10_VLB_SCHEDULE),
            weights="cifar10_uncond_vlb_50M_500K.pt",
            description="Improved DDPM (Nichol & Dhariwal 2021) on CIFAR-10, L_vlb, cosine schedule, 4000 steps",
        ),
    )
}


def list_models() -> list[str]:
    """Names accepted by `build_denoiser`, sorted."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The `ModelSpec` registered under `name`; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None


def _apply_overrides(spec: ModelSpec, overrides: dict) -> ModelSpec:
    """A copy of `spec` with each override replacing a config or schedule entry."""
    config, schedule = dict(spec.config), dict(spec.schedule)
    for key, value in overrides.items():
        if key in config:
            config[key] = value
        elif key in schedule:
            schedule[key] = value
        else:
            known = ", ".join(sorted(set(config) | set(schedule)))
            raise ValueError(f"{spec.name}: unknown override {key!r}; known: {known}")
    return dataclasses.replace(spec, config=_frozen(config), schedule=_frozen(schedule))


def _warn_random(spec: ModelSpec) -> None:
    warnings.warn(
        f"{spec.name}: no weights given, the network is randomly initialised "
        f"(published weights: {spec.weights})",
        stacklevel=4,  # the caller of build_denoiser
    )


def _looks_like_repo_id(weights: str) -> bool:
    parts = weights.split("/")
    return len(parts) == 2 and all(parts) and not weights.startswith((".", "~"))


def _build_diffusers(spec: ModelSpec, weights: Optional[str | os.PathLike]) -> nn.Module:
    """UNet2DModel with weights from a file, a saved folder or a Hub repo; spec's schedule."""
    from .hub import require_diffusers

    UNet2DModel = require_diffusers().UNet2DModel

    path = None if weights is None else Path(weights)
    if path is not None and (path.is_dir() or (not path.exists() and _looks_like_repo_id(str(weights)))):
        root = local_root(weights)
        unet = load_unet(root)
        _check_config(spec, unet.config, source=str(weights))
        _check_schedule(spec, root, source=str(weights))
    else:
        unet = UNet2DModel(**spec.config)
        if path is None:
            _warn_random(spec)
        else:
            load_into(unet, load_state_dict(path), source=str(path))
    return DiffusersDenoiser(unet, dict(spec.schedule))


def _check_config(spec: ModelSpec, config: Mapping[str, Any], source: str) -> None:
    """ValueError if a saved model's architecture differs from the spec's."""
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    differ = [k for k, v in spec.config.items() if plain(config.get(k)) != plain(v)]
    if differ:
        shown = ", ".join(f"{k}={config.get(k)!r} (expected {spec.config[k]!r})" for k in differ[:3])
        raise ValueError(f"{source} is not a {spec.name} network: {shown}")


def _schedule_text(config: Mapping[str, Any]) -> str:
    cfg = dict(config)
    kind = "trained_betas" if cfg.get("trained_betas") is not None else f"{cfg.get('beta_schedule', 'linear')} betas"
    zero = ", zero terminal SNR" if cfg.get("rescale_betas_zero_snr") else ""
    return (f"{cfg.get('_class_name', 'DDPMScheduler')} {kind} over {cfg.get('num_train_timesteps', 1000)} steps"
            f"{zero}, {cfg.get('prediction_type', 'epsilon')} prediction")


def _check_schedule(spec: ModelSpec, root: Path, source: str) -> None:
    """ValueError if a saved model's own scheduler config means another schedule or parametrisation than the spec's.

    A folder without a scheduler config takes the spec's (the user named the registry model).
    """
    import torch

    from .diffusers import _local_model_dir, read_json, scheduler_file_candidates
    from .schedule import diffusers_alphas_cumprod
    from .schedulers import full_config, scheduler_family

    files = [f for f in scheduler_file_candidates(root, _local_model_dir(root, None)) if f.is_file()]
    if not files:
        return
    own = full_config(read_json(files[0]))
    same = scheduler_family(own) == "vp" and own.get("prediction_type", "epsilon") == spec.schedule.get(
        "prediction_type", "epsilon")
    if same:
        a, b = diffusers_alphas_cumprod(own), diffusers_alphas_cumprod(dict(spec.schedule))
        same = a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-6, atol=0))
    if not same:
        raise ValueError(f"{source} was trained with its own schedule ({_schedule_text(own)}, {files[0].name}) but "
                         f"{spec.name} uses {_schedule_text(spec.schedule)}; evaluate the folder under its own "
                         f"schedule with --model {source} (no registry name)")


def _build_iddpm(spec: ModelSpec, weights: Optional[str | os.PathLike]) -> nn.Module:
    net = IDDPMUNet(**spec.config)
    if weights is None:
        _warn_random(spec)
    else:
        load_into(net, load_state_dict(weights), source=str(weights))
    return IDDPMDenoiser(net, **spec.schedule)


def build_denoiser(name: str, weights: Optional[str | os.PathLike] = None, **overrides: Any) -> nn.Module:
    """Build the named denoiser ``f(z, logsnr) -> eps_hat`` in eval mode.

    Args:
        name: one of `list_models()`.
        weights: a weights file (.safetensors, or a tensors-only .pt/.pth/.bin), a
            folder written by diffusers' ``save_pretrained`` (diffusers models; its
            architecture must match the spec's), or a Hub repo id such as
            "google/ddpm-cifar10-32" (needs network).  None gives a randomly
            initialised network, with a warning.  The noise schedule is always the
            spec's.
        **overrides: replace entries of the spec's config (e.g. ``dropout=0.0``) or
            schedule (e.g. ``diffusion_steps``, ``prediction_type``).

    Returns:
        An nn.Module denoiser with attribute ``model_spec`` (the spec, overrides applied).
    """
    spec = _apply_overrides(model_spec(name), overrides)
    if spec.architecture == _DIFFUSERS_UNET:
        denoiser = _build_diffusers(spec, weights)
    else:
        denoiser = _build_iddpm(spec, weights)
    denoiser.model_spec = spec
    return denoiser.eval()
