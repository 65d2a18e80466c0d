"""Training checkpoints as single safetensors files (no pickle), written atomically.

A checkpoint holds the model's ``state_dict`` (network weights and the spectrum
buffers), the optimizer's tensors, the epoch and JSON metadata
(training config, model description, history), and the SHA-256 of its tensors, checked
when it is loaded.  A run trained with an EMA of its weights also holds the averaged
parameters (``ema/`` tensors); :meth:`Checkpoint.weights` is the state a model is
evaluated with (the EMA's where there is one).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import fileio as _io

FORMAT = "itdiffusion.checkpoint"
VERSION = 1
DIGEST = "tensors_sha256"


@dataclass
class Checkpoint:
    """Everything needed to continue training or to rebuild the model."""

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None
    epoch: int
    meta: dict = field(default_factory=dict)  # JSON-able: config, model description, history
    ema_state: dict[str, torch.Tensor] | None = None  # averaged trainable parameters (float32), by name

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """The model state to evaluate: ``model_state`` with the EMA parameters over it when ``ema`` and present."""
        if not ema or not self.ema_state:
            return dict(self.model_state)
        state = dict(self.model_state)
        for name, value in self.ema_state.items():  # in the dtype of the weights they stand for
            state[name] = value.to(state[name].dtype) if name in state else value
        return state


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = value
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        _, pid, key = name.split("/", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in info.get("scalars", {}).items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes (stored in a checkpoint, checked on loading:
    safetensors itself has no checksum, so a damaged byte in the data would otherwise load silently)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_checkpoint(path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` (safetensors) atomically."""
    from safetensors.torch import save

    tensors = {f"model/{k}": v.detach().contiguous().cpu() for k, v in ckpt.model_state.items()}
    bad = [k for k, v in ckpt.model_state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"not saving {path}: the weights hold NaN or Inf ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); training diverged (lower --lr or use --grad-clip)")
    meta = {"format": FORMAT, "version": VERSION, "epoch": ckpt.epoch, **ckpt.meta}
    if ckpt.optimizer_state is not None:
        opt_tensors, opt_info = _flatten_optimizer(ckpt.optimizer_state)
        tensors.update({k: v.detach().contiguous().cpu() for k, v in opt_tensors.items()})
        meta["optimizer"] = opt_info
    if ckpt.ema_state is not None:
        tensors.update({f"ema/{k}": v.detach().contiguous().cpu() for k, v in ckpt.ema_state.items()})
        meta["has_ema"] = True
    meta[DIGEST] = tensors_digest(tensors)
    data = save(tensors, metadata={"itdiffusion": json.dumps(_io._json_safe(meta))})
    _io.write_atomic(path, lambda fh: fh.write(data))


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint; a truncated, forged or foreign file raises ``ValueError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file" if not path.exists() else f"{path} is not a file")
    try:
        data = path.read_bytes()
        # safetensors checks the header (size, JSON, dtypes, offsets covering the data exactly)
        # before it allocates anything.
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        text = (header.get("__metadata__") or {}).get("itdiffusion")
        meta = None if text is None else json.loads(text)
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError) as err:
        raise ValueError(f"{path}: truncated or invalid checkpoint ({type(err).__name__}: {err})") from None
    if text is None:
        raise ValueError(f"{path}: a safetensors file without itdiffusion metadata, not an itdiffusion checkpoint")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an itdiffusion checkpoint")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {meta.get('version')!r} is not supported (this is {VERSION})")
    expected = meta.pop(DIGEST, None)  # absent in checkpoints written before it was added
    if expected is not None and expected != tensors_digest(tensors):
        raise ValueError(f"{path}: corrupt checkpoint (its tensors do not match their SHA-256)")
    try:
        model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optim/")}
        ema_state = {k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")}
        ema_state = ema_state if meta.pop("has_ema", False) else None
        info = meta.pop("optimizer", None)
        optimizer_state = None if info is None else _unflatten_optimizer(opt_tensors, info)
        epoch = meta.pop("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: invalid checkpoint metadata ({type(err).__name__}: {err})") from None
    meta.pop("format"), meta.pop("version")
    return Checkpoint(model_state=model_state, optimizer_state=optimizer_state, epoch=epoch, meta=meta,
                      ema_state=ema_state)
