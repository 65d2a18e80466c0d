"""What ``--model`` names: a registry model, ``small-unet``, a weights file, a run directory, a
diffusers model or pipeline folder, or a Hub repo id.

:func:`resolve_model` turns the argument into a denoiser ``f(z, logsnr) -> eps_hat``:

* a name of :func:`itdiffusion.denoisers.list_models` (the pretrained CIFAR-10 networks;
  their weights from ``--weights``: a file, a diffusers folder or a Hub repo id);
* ``small-unet``: a freshly initialised :class:`itdiffusion.denoisers.nets.SmallUNet` sized to the
  data, correcting the data's Gaussian-optimal denoiser (:class:`itdiffusion.denoisers.nets.GaussianResidual`);
* a weights file of a registry network (``.safetensors``, or a tensors-only ``.pt``):
  the architecture is recognised from its tensor names and shapes;
* a diffusers model or pipeline folder (a ``UNet2DModel``, class-conditional ones with
  ``class_label``), or a Hub repo id ``owner/name`` (from the local cache, else downloaded):
  its own ``scheduler_config.json`` is the source of truth for the schedule and the
  parametrisation (:func:`itdiffusion.denoisers.denoiser_for_scheduler`); a folder without
  one is refused, unless a registry name is given with it (``--model NAME --weights FOLDER``,
  the registry's schedule then; a folder whose own schedule disagrees with it is refused);
* a run directory written by ``itd finetune`` (its last ``checkpoint.safetensors``; the EMA
  weights of a run trained with ``--ema``), or such a checkpoint file.

A run's checkpoint carries, in ``meta["model"]``, a *model description*: JSON from which
the architecture is rebuilt before its weights are loaded (:func:`describe_registry`,
:func:`describe_small_unet`, :func:`build_architecture`)::

    {"format": "itdiffusion.model", "version": 1, "kind": "registry", "name": "ddpm-cifar10",
     "label": "ddpm-cifar10", "shape": [3, 32, 32], "grid": {"lo": -1, "hi": 1, "levels": 256}}
    {"format": "itdiffusion.model", "version": 1, "kind": "small-unet", "label": "small-unet",
     "shape": [1, 8, 8], "config": {"channels": 1, "base": 32, "channel_mult": [1, 2], ...},
     "grid": {...}}
    {"format": "itdiffusion.model", "version": 1, "kind": "diffusers", "label": "my-ddpm",
     "shape": [3, 32, 32], "unet": {UNet2DModel config}, "scheduler": {scheduler config},
     "class_label": null, "source": "path/or/repo-id", "grid": null}

The weights of a run live under the ``denoiser.`` prefix of the checkpoint's model state.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import fileio as _io
from .core.grid import DiscreteGrid
from .core.spectrum import GaussianSpectrum

FORMAT = "itdiffusion.model"
VERSION = 1
SMALL_UNET = "small-unet"
DIFFUSERS = "diffusers"
RUN_CHECKPOINT = "checkpoint.safetensors"
_DENOISER_PREFIX = "denoiser."


@dataclass
class LoadedModel:
    """A resolved ``--model``.

    Attributes:
        denoiser: ``f(z (B, *shape), logsnr (B,)) -> eps_hat`` (an ``nn.Module``).
        description: JSON-able model description (see the module docstring).
        label: a short name for tables and figures.
        shape: the image shape the model is made for, ``(C, H, W)``.
        grid: the data grid the model is made for, if known.
        epoch: the training epoch of a run's checkpoint, else ``None``.
        run: the run directory it came from, else ``None``.
    """

    denoiser: nn.Module
    description: dict
    label: str
    shape: tuple[int, ...]
    grid: DiscreteGrid | None
    epoch: int | None = None
    run: Path | None = None


def list_names() -> list[str]:
    """The names ``--model`` accepts besides paths."""
    from .denoisers import list_models

    return [*list_models(), SMALL_UNET]


# ----------------------------------------------------------------------------- descriptions
def _grid_json(grid: DiscreteGrid | None) -> dict | None:
    return None if grid is None else {"lo": grid.lo, "hi": grid.hi, "levels": grid.levels}


def _grid_from_json(value) -> DiscreteGrid | None:
    return None if not value else DiscreteGrid(float(value["lo"]), float(value["hi"]), int(value["levels"]))


def registry_shape(spec: str) -> tuple[int, ...] | None:
    """The image shape a registry model is made for, without building it (``None`` for other specs)."""
    from .denoisers import list_models, model_spec

    return tuple(model_spec(spec).data_shape) if spec in list_models() else None


def describe_registry(name: str) -> dict:
    """Description of registry model ``name`` (its shape and grid from the registry's spec)."""
    from .denoisers import model_spec

    spec = model_spec(name)
    grid = DiscreteGrid(float(spec.data_range[0]), float(spec.data_range[1]), int(spec.data_levels))
    return {"format": FORMAT, "version": VERSION, "kind": "registry", "name": name, "label": name,
            "shape": list(spec.data_shape), "grid": _grid_json(grid)}


def small_unet_config(shape: tuple[int, ...]) -> dict:
    """:class:`~itdiffusion.denoisers.nets.SmallUNet` arguments for images of ``shape`` ``(C, H, W)``.

    Down-samples while both sides stay even and at least 8 (at most three times); width 32
    for images up to 1,024 dimensions, else 64.
    """
    if len(shape) != 3:
        raise ValueError(f"small-unet needs images (C, H, W), got examples of shape {tuple(shape)}")
    c, h, w = shape
    n_down = 0
    while n_down < 3 and h % 2 == 0 and w % 2 == 0 and min(h, w) >= 8:
        h, w, n_down = h // 2, w // 2, n_down + 1
    base = 32 if math.prod(shape) <= 1024 else 64
    return {"channels": int(c), "base": base, "channel_mult": [1] + [2] * n_down, "num_res_blocks": 1,
            "dropout": 0.0}


def describe_small_unet(shape: tuple[int, ...], grid: DiscreteGrid | None = None) -> dict:
    """Description of a fresh ``small-unet`` for images of ``shape``."""
    return {"format": FORMAT, "version": VERSION, "kind": SMALL_UNET, "label": SMALL_UNET, "shape": list(shape),
            "config": small_unet_config(shape), "grid": _grid_json(grid)}


def build_architecture(description: dict, spectrum: GaussianSpectrum | None = None) -> nn.Module:
    """The (randomly initialised) network a description names; load weights into it afterwards.

    ``spectrum`` is the Gaussian a ``small-unet`` corrects (default: a placeholder that
    the checkpoint's weights replace).
    """
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise ValueError("the checkpoint has no model description; was it written by itd finetune?")
    if description.get("version") != VERSION:
        raise ValueError(f"model description version {description.get('version')!r} is not supported")
    kind = description.get("kind")
    if kind == "registry":
        from .denoisers import build_denoiser

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*randomly initialised")
            return build_denoiser(description["name"])
    if kind == SMALL_UNET:
        from .denoisers.nets import GaussianResidual, SmallUNet

        shape = tuple(int(s) for s in description["shape"])
        config = dict(description["config"])
        config["channel_mult"] = tuple(config["channel_mult"])
        spectrum = spectrum if spectrum is not None else GaussianSpectrum.isotropic(shape)
        if tuple(spectrum.shape) != shape:
            raise ValueError(f"the spectrum is for examples of shape {tuple(spectrum.shape)}, the model for {shape}")
        return GaussianResidual(SmallUNet(**config, skip=False), spectrum)
    if kind == DIFFUSERS:
        from .denoisers.hub import require_diffusers

        unet = require_diffusers().UNet2DModel.from_config(description["unet"])
        return _diffusers_denoiser(unet, description["scheduler"], description.get("class_label"))
    raise ValueError(f"unknown model kind {kind!r} in the model description")


def _diffusers_denoiser(unet: nn.Module, scheduler_config: dict, class_label: int | None) -> nn.Module:
    """The exact adapter of a diffusers UNet under its scheduler, its class label fixed if it has one."""
    from .denoisers import denoiser_for_scheduler
    from .denoisers.diffusers import FixedClassLabel

    net = unet if class_label is None else FixedClassLabel(unet, class_label)
    return denoiser_for_scheduler(net, scheduler_config).eval()


def describe_diffusers(unet_config: dict, scheduler_config: dict, *, label: str, source: str,
                       class_label: int | None = None) -> dict:
    """Description of a diffusers UNet2DModel under its own scheduler (both configs JSON-able)."""
    size = unet_config.get("sample_size")
    hw = [int(size), int(size)] if isinstance(size, int) else [int(v) for v in size]
    return {"format": FORMAT, "version": VERSION, "kind": DIFFUSERS, "label": label,
            "shape": [int(unet_config["in_channels"]), *hw], "unet": _plain(unet_config),
            "scheduler": _plain(scheduler_config), "class_label": class_label, "source": source, "grid": None}


def _plain(config) -> dict:
    """A JSON-able copy of a diffusers config (tuples as lists)."""
    import json

    return json.loads(json.dumps(dict(config), default=list))


# ----------------------------------------------------------------------------- resolution
def resolve_model(
    spec: str,
    *,
    weights: str | None = None,
    spectrum: GaussianSpectrum | None = None,
    grid: DiscreteGrid | None = None,
    seed: int = 0,
    class_label: int | None = None,
    conditional: bool = False,
) -> LoadedModel:
    """Turn a ``--model`` argument into a :class:`LoadedModel` (see the module docstring).

    Args:
        spec: a registry name, ``small-unet``, a weights file, a diffusers folder, a run
            directory or checkpoint file, or a Hub repo id (``owner/name``).
        weights: weights of a registry model (a file, diffusers folder or Hub repo id).
        spectrum: the data's Gaussian (needed by ``small-unet``, which is sized by it).
        grid: the data's grid (recorded in a fresh ``small-unet``'s description).
        seed: initialisation seed of a fresh ``small-unet`` (the global RNG is untouched).
        class_label: the class a class-conditional diffusers UNet is evaluated at
            (``-log p(x | y)``); required by such a UNet (unless ``conditional``), refused by other models.
        conditional: leave a class-conditional model's label to the caller: the denoiser is
            called ``f(z, logsnr, y=labels)`` (``itd infomap``, ``mi``, ``classify``).
    """
    from .denoisers import list_models
    from .denoisers.hub import looks_like_repo_id

    if weights is not None and spec not in list_models():
        raise ValueError(f"--weights goes with a registry model name ({', '.join(list_models())}), not {spec!r}")
    path = Path(spec).expanduser()
    is_diffusers = spec not in list_names() and (
        (path.is_dir() and not (path / RUN_CHECKPOINT).is_file()) or (not path.exists() and looks_like_repo_id(spec)))
    if class_label is not None and (conditional or not is_diffusers):
        raise ValueError(f"--class-label goes with a class-conditional diffusers model in itd eval, compare or "
                         f"finetune, not {spec!r}" + (" (here, labels come from --y or a labelled folder)"
                                                      if conditional else ""))
    if spec == SMALL_UNET:
        return _fresh_small_unet(spectrum, grid, seed)
    if spec in list_models():
        return _registry(spec, weights, label=spec if weights is None else f"{spec} ({Path(str(weights)).name})")
    if is_diffusers:
        return load_diffusers(spec, class_label=class_label, conditional=conditional)
    if path.is_dir():
        return load_run(path / RUN_CHECKPOINT)
    if path.is_file():
        return _from_file(path)
    raise ValueError(f"--model {spec!r}: not a model name ({', '.join(list_names())}), no such file or folder, "
                     "and not a Hub repo id (owner/name)")


def _fresh_small_unet(spectrum, grid, seed) -> LoadedModel:
    if spectrum is None:
        raise ValueError("small-unet is sized to the data: give the data's spectrum (--spectrum)")
    description = describe_small_unet(tuple(spectrum.shape), grid)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        denoiser = build_architecture(description, spectrum.to("cpu"))
    return LoadedModel(denoiser, description, SMALL_UNET, tuple(spectrum.shape), grid)


def _registry(name: str, weights, label: str) -> LoadedModel:
    from .denoisers import build_denoiser

    description = describe_registry(name)
    denoiser = build_denoiser(name, weights)
    return LoadedModel(denoiser, description, label, tuple(description["shape"]),
                       _grid_from_json(description["grid"]))


def load_diffusers(source: str, *, class_label: int | None = None, conditional: bool = False) -> LoadedModel:
    """A diffusers model or pipeline folder, or a Hub repo id, under its own scheduler config.

    A class-conditional UNet needs ``class_label`` (its label fixed), unless ``conditional``
    (the denoiser then takes ``y``).
    """
    from .denoisers.diffusers import (_load_local_unet, _local_model_dir, local_root, local_scheduler_file,
                                      read_json)

    root = local_root(source)
    if not ((root / "config.json").is_file() or (root / "unet" / "config.json").is_file()):
        raise ValueError(f"{source}: neither a run directory (no {RUN_CHECKPOINT}) nor a diffusers model folder "
                         "(no config.json)")
    model_dir = _local_model_dir(root, None)
    scheduler = read_json(local_scheduler_file(root, model_dir))
    unet = _load_local_unet(model_dir)
    is_conditional = (unet.config.get("num_class_embeds") is not None
                      or unet.config.get("class_embed_type") is not None)
    label = Path(source).name if root == Path(source).expanduser() else source
    if is_conditional and class_label is None and not conditional:
        raise ValueError(f"{label} is class-conditional (num_class_embeds={unet.config.get('num_class_embeds')}): "
                         "give --class-label K to evaluate -log p(x | y=K)")
    if not is_conditional and class_label is not None:
        raise ValueError(f"{label} is not class-conditional; drop --class-label")
    if class_label is not None:
        label = f"{label} (class {class_label})"
    denoiser = _diffusers_denoiser(unet, scheduler, class_label)
    description = describe_diffusers(unet.config, denoiser.scheduler_config, label=label, source=str(source),
                                     class_label=class_label)
    return LoadedModel(denoiser, description, label, tuple(description["shape"]), None)


def _from_file(path: Path) -> LoadedModel:
    if path.suffix == ".safetensors" and _is_itd_checkpoint(path):
        return load_run(path)
    from .denoisers import load_state_dict

    state = load_state_dict(path)
    name = match_registry({k: tuple(v.shape) for k, v in state.items()})
    if name is None:
        raise ValueError(f"{path}: its tensors match no registry model ({', '.join(list_names()[:-1])}); "
                         "weights of other networks need a model description (write them with itd finetune)")
    return _registry(name, str(path), label=f"{name} ({path.name})")


def _is_itd_checkpoint(path: Path) -> bool:
    import json

    try:
        with open(path, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        return "itdiffusion" in header.get("__metadata__", {})
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return False


def match_registry(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The registry model whose network has exactly these tensor names and shapes, if any."""
    from .denoisers import list_models

    for name in list_models():
        if _registry_shapes(name) == {k: tuple(v) for k, v in shapes.items()}:
            return name
    return None


def _registry_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a registry network, built on the meta device (no memory)."""
    from .denoisers import IDDPMUNet, model_spec

    spec = model_spec(name)
    with torch.device("meta"):
        if spec.architecture == "diffusers.UNet2DModel":
            from diffusers import UNet2DModel

            net = UNet2DModel(**spec.config)
        else:
            net = IDDPMUNet(**spec.config)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def load_run(path) -> LoadedModel:
    """The model of a run directory's ``checkpoint.safetensors`` (or of that file itself)."""
    from .training.checkpoint import load_checkpoint
    from .denoisers import load_into

    path = Path(path)
    if path.is_dir():
        path = path / RUN_CHECKPOINT
    ckpt = load_checkpoint(path)
    description = ckpt.meta.get("model")
    # a run trained with --ema is evaluated with its averaged weights
    state = {k[len(_DENOISER_PREFIX):]: v for k, v in ckpt.weights().items() if k.startswith(_DENOISER_PREFIX)}
    denoiser = build_architecture(description, _residual_spectrum(state, description))
    load_into(denoiser, state, source=str(path))
    ema = ", EMA" if ckpt.ema_state else ""
    label = f"{description.get('label', description['kind'])} ({path.parent.name}, epoch {ckpt.epoch}{ema})"
    return LoadedModel(denoiser, description, label, tuple(description["shape"]),
                       _grid_from_json(description.get("grid")), epoch=ckpt.epoch, run=path.parent)


def _residual_spectrum(state: dict, description) -> GaussianSpectrum | None:
    """The Gaussian a saved ``small-unet`` corrects, from its weights (``None`` for other kinds)."""
    if not isinstance(description, dict) or description.get("kind") != SMALL_UNET:
        return None
    try:
        eigvecs = state["eigvecs"] if state["eigvecs"].numel() else None
        return GaussianSpectrum(state["mean"].double(), None if eigvecs is None else eigvecs.double(),
                                state["log_eigs"].double(), tuple(int(s) for s in description["shape"]))
    except KeyError as err:
        raise ValueError(f"the checkpoint lacks the small-unet's Gaussian ({err})") from None


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's ``state_dict`` (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


DIFFUSERS_OUT = "diffusers"  # the tuned model of a run of a diffusers model, as a diffusers folder


def save_diffusers_folder(denoiser: nn.Module, description: dict, folder) -> Path:
    """Write the UNet inside ``denoiser`` (a diffusers model's adapter) as a diffusers model folder.

    ``folder`` gets what ``UNet2DModel.save_pretrained`` writes (``config.json``,
    ``diffusion_pytorch_model.safetensors``) and, beside it, the model's original
    ``scheduler_config.json``: ``diffusers.UNet2DModel.from_pretrained(folder)`` loads it, and
    ``itd eval --model folder`` reads it under the same schedule.  The folder is replaced whole.
    """
    import shutil
    import tempfile

    from . import fileio as _io
    from .denoisers.hub import require_diffusers

    if description.get("kind") != DIFFUSERS:
        raise ValueError(f"only diffusers models are written as diffusers folders, not {description.get('kind')!r}")
    unets = [m for m in denoiser.modules() if isinstance(m, require_diffusers().UNet2DModel)]
    if len(unets) != 1:
        raise ValueError(f"expected one UNet2DModel inside the denoiser, found {len(unets)}")
    folder = Path(folder)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        unets[0].save_pretrained(str(temp), safe_serialization=True)
        _io.save_json_atomic(temp / "scheduler_config.json", description["scheduler"])
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        temp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return folder
