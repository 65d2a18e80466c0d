"""Strict loading of a diffusers ``UNet2DModel`` folder: checked before anything large is allocated.

diffusers' own ``from_pretrained`` fills a weight missing from the file with uninitialised
memory and accepts a config that asks for more memory than the machine has.  Here the
network is first built on the meta device from ``config.json`` (no memory), its size is
compared with the memory available, its parameter names and shapes with the safetensors
header (read without the tensors), and only then is it built for real and loaded with
every key required.  Any problem is a one-line ``ValueError`` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_unet_folder", "available_memory_bytes", "WEIGHTS_FILE"]

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_INDEX_FILE = WEIGHTS_FILE + ".index.json"


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), else physical memory, else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors file(s) of the folder: one file, or the shards its index names."""
    single = model_dir / WEIGHTS_FILE
    if single.is_file():
        return [single]
    index = model_dir / _INDEX_FILE
    if index.is_file():
        from .diffusers import read_json

        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map naming its shards")
        names = sorted({str(v) for v in weight_map.values()})
        if any(Path(n).name != n for n in names):
            raise ValueError(f"{index}: a shard name is a path ({names[0]}); expected file names in {model_dir}")
        return [model_dir / n for n in names]
    raise ValueError(f"{model_dir}: no {WEIGHTS_FILE} (only safetensors weights are read; convert .bin weights "
                     "with diffusers' save_pretrained(safe_serialization=True))")


def _header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """name -> shape from the safetensors headers, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        if not path.is_file():
            raise ValueError(f"{path}: a weights shard named by the index is missing")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path}: truncated, corrupt or forged safetensors file ({err})") from None
    return shapes


def _build(diffusers, config: dict, config_path: Path, device) -> nn.Module:
    try:
        with torch.device(device):
            return diffusers.UNet2DModel.from_config(config)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError, ZeroDivisionError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{config_path}: not a valid UNet2DModel configuration ({type(err).__name__}: "
                         f"{detail})") from None


def _check_size(meta: nn.Module, config_path: Path) -> None:
    numel = sum(p.numel() for p in meta.parameters()) + sum(b.numel() for b in meta.buffers())
    need = 2 * 4 * numel  # the float32 network and the tensors read from the file
    have = available_memory_bytes()
    if have is not None and need > have:
        raise ValueError(f"{config_path}: this configuration is a network of {numel:,} parameters, which needs "
                         f"about {need / 2**30:.1f} GiB to load; only {have / 2**30:.1f} GiB are available")


def _mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    """As :func:`~itdiffusion.denoisers.loading._mismatch_report`, from shapes alone (no tensors read)."""
    from .loading import _listing

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: file {list(found[k])} vs config {list(v)}" for k, v in expected.items()
              if k in found and found[k] != v]
    parts = [f"{len(items)} {label}: {_listing(items)}"
             for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
             if items]
    return "; ".join(parts) or None


def load_unet_folder(model_dir: Path) -> nn.Module:
    """The ``UNet2DModel`` saved in ``model_dir`` (config.json + safetensors), strictly, in eval mode."""
    from safetensors.torch import load_file

    from .diffusers import read_json
    from .hub import require_diffusers

    diffusers = require_diffusers()
    config_path = model_dir / "config.json"
    config = read_json(config_path)
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(f"{model_dir}: a {name}; only UNet2DModel networks (unconditional or class-conditional) "
                         "are supported")
    meta = _build(diffusers, config, config_path, "meta")
    _check_size(meta, config_path)
    files = _weight_files(model_dir)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    problem = _mismatch(expected, _header_shapes(files))
    if problem:
        raise ValueError(f"{model_dir}: the weights do not fit its config.json: {problem}")
    unet = _build(diffusers, config, config_path, "cpu")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path), device="cpu"))
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{model_dir}: {len(bad)} weight tensors hold inf or NaN (first: {bad[0]})")
    unet.load_state_dict(state, strict=True)
    return unet.eval()

