"""Data parallelism on ``torch.distributed``: rank and world size from the environment.

``torchrun --nproc_per_node=N`` (or ``accelerate launch``) sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; :func:`init` then joins the process group (``nccl`` on CUDA,
``gloo`` on CPU).  With one process every helper is a no-op.  Arrays travel as tensors
(``all_gather``), never as pickled Python objects.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """The :class:`World` described by ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (one process if unset)."""
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"bad process layout: RANK={rank}, WORLD_SIZE={size}")
    return World(rank=rank, size=size, local_rank=local)


def device_for(world: World, requested: str | None = None) -> torch.device:
    """The device this process computes on: ``requested``, else CUDA when available, else CPU.

    With several processes on CUDA each takes ``cuda:LOCAL_RANK``.
    """
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if requested is None else requested
    device = check_device(kind)
    if device.type == "cuda" and device.index is None and world.distributed:
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def check_device(name: str) -> torch.device:
    """``torch.device(name)`` if this machine can compute on it; ``ValueError`` naming ``--device`` otherwise."""
    try:
        device = torch.device(str(name).strip())
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:0 or mps)") from None
    if device.type == "cpu" and device.index not in (None, 0):
        raise ValueError(f"--device {name}: the CPU has no device index {device.index} (use --device cpu)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this PyTorch build or machine has no CUDA GPU (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {name}: {device.type} devices cannot run an evaluation (use cpu or cuda)")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ValueError(f"--device {name}: no XPU device here (use --device cpu)")
    return device


def init(world: World, device: torch.device) -> None:
    """Join the process group when there are several processes (``nccl`` on CUDA, else ``gloo``)."""
    import torch.distributed as dist

    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)


def shutdown(world: World) -> None:
    """Leave the process group (no-op on one process)."""
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    import torch.distributed as dist

    if world.distributed:
        dist.barrier()


def shard(n: int, world: World) -> range:
    """The contiguous block of ``range(n)`` this process handles (sizes differ by at most one)."""
    return range(world.rank * n // world.size, (world.rank + 1) * n // world.size)


def all_sum(values: list[float], world: World, device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64)."""
    if not world.distributed:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def gather_rows(
    arrays: dict[str, np.ndarray], world: World, device: torch.device | str = "cpu"
) -> dict[str, np.ndarray]:
    """Concatenate every process's per-example arrays in rank order, on every process.

    Each array is ``(n_rank, ...)``; ``n_rank`` may differ between processes, the other
    dimensions, the keys and the dtypes must not.
    """
    if not world.distributed:
        return dict(arrays)
    import torch.distributed as dist

    keys = sorted(arrays)
    signature = zlib.crc32(repr([(k, arrays[k].shape[1:], str(arrays[k].dtype)) for k in keys]).encode())
    sigs = _all_gather(torch.tensor([signature], dtype=torch.int64, device=device), world)
    if len({int(s) for s in sigs}) != 1:
        raise RuntimeError("processes hold different per-example arrays; cannot gather them")
    out = {}
    for key in keys:
        local = torch.from_numpy(np.ascontiguousarray(arrays[key])).to(device)
        sizes = [int(s) for s in _all_gather(torch.tensor([len(local)], dtype=torch.int64, device=device), world)]
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
        padded[: len(local)] = local
        pieces = _all_gather(padded, world)
        out[key] = torch.cat([p[:n] for p, n in zip(pieces, sizes)]).cpu().numpy()
    dist.barrier()
    return out


def _all_gather(t: torch.Tensor, world: World) -> list[torch.Tensor]:
    import torch.distributed as dist

    pieces = [torch.empty_like(t) for _ in range(world.size)]
    dist.all_gather(pieces, t.contiguous())
    return pieces
