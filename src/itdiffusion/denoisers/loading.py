"""Safe loading of network weights.

Checkpoints are read without running code: safetensors files directly, pickled
PyTorch files only through ``torch.load(..., weights_only=True)``, which refuses any
pickle that would import something other than tensors and plain containers.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

__all__ = ["load_state_dict", "load_into", "unwrap_state_dict"]

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 3  # how many offending keys of each kind an error message names


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict (name -> tensor, on CPU) without executing code.

    ``.safetensors`` is read with safetensors; ``.pt/.pth/.bin/.ckpt`` with
    ``torch.load(map_location="cpu", weights_only=True)``.  Common containers
    ({"state_dict": ...}, {"model": ...}, "module." prefixes) are unwrapped.

    Raises:
        ValueError: the file is a pickle that would run code or import objects
            other than tensors, is truncated, corrupt or forged (a safetensors header
            whose offsets or shapes do not fit the file), or does not hold a state dict.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a weights file (.safetensors or {', '.join(_PICKLE_SUFFIXES)})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        raw = _load_safetensors(path)
    elif suffix in _PICKLE_SUFFIXES:
        raw = _load_pickle_weights_only(path)
    else:
        raise ValueError(f"{path}: unknown weights format {suffix!r}; expected .safetensors or {', '.join(_PICKLE_SUFFIXES)}")
    return unwrap_state_dict(raw, source=str(path))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, which validates the header before allocating; its errors become ValueErrors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: truncated, corrupt or forged safetensors file ({err})") from None


# torch's weights_only unpickler could be made to run code before 2.6 (CVE-2025-32434) and to
# corrupt memory before 2.10 (CVE-2026-24747): pickled weights are read only with a fixed torch.
SAFE_WEIGHTS_ONLY_TORCH = (2, 10)


def _load_pickle_weights_only(path: Path):
    """torch.load restricted to tensors and plain containers; refusals become one-line ValueErrors."""
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.__version__) < SAFE_WEIGHTS_ONLY_TORCH:
        raise ValueError(
            f"refusing to read the pickled weights {path} with torch {torch.__version__}: its weights_only loader "
            f"can be made to run code (CVE-2025-32434, CVE-2026-24747); upgrade to torch >= "
            f"{'.'.join(map(str, SAFE_WEIGHTS_ONLY_TORCH))} or convert the file to .safetensors where you trust it"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"would import {found.group(1)!r}, which could run code" if found else "uses unsupported pickle features"
        raise ValueError(
            f"refusing to load {path}: the pickle {what}; only tensors and plain containers are "
            "accepted (convert it to .safetensors where you trust it)"
        ) from None
    except Exception as err:  # a truncated or corrupt file: EOFError, RuntimeError (zip reader), OSError, ...
        raise ValueError(f"{path}: truncated or corrupt PyTorch file ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else "no details"


def unwrap_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Peel containers ({"state_dict": ...}, {"model": ...}) and wrapper prefixes off a state dict."""
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        keys = list(obj)[:_SHOW] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{source}: no state dict (name -> tensor) found; top level: {keys}")
    state = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _mismatch_report(module: nn.Module, state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """A compact description of how `state` fails to fit `module`, or None if it fits."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = [
        f"{len(items)} {label}: {_listing(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
        if items
    ]
    return "; ".join(parts) if parts else None


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> nn.Module:
    """Strictly load `state_dict` into `module` (in place); returns `module`.

    Raises:
        ValueError: one error naming the counts and first few missing keys,
            unexpected keys and shape mismatches.
    """
    problem = _mismatch_report(module, state_dict)
    if problem:
        raise ValueError(f"cannot load {source} into {type(module).__name__}: {problem}")
    module.load_state_dict(state_dict, strict=True)
    return module
