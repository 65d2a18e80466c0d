"""The rows of each training batch, read from a tensor or from a source decoded on demand.

A source (:class:`~itdiffusion.data.stream.ImageSource`) is checked as its rows arrive (NaN or
Inf refused) and, with ``workers > 0``, decoded ahead of use by ``DataLoader`` processes; the
rows, and so the weights, do not depend on ``workers``.
"""

from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["batch_reads", "read_batch"]


def checked(x: torch.Tensor) -> torch.Tensor:
    """``x``, or ``ValueError`` if it holds NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("training data contain NaN or Inf")
    return x


def read_batch(x_train, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of the training data; rows read on demand are checked as they arrive."""
    x = x_train[indices]
    return x if isinstance(x_train, torch.Tensor) else checked(x)


def batch_reads(x_train, batches: list[torch.Tensor], world, device: torch.device,
                workers: int = 0) -> Iterator[torch.Tensor]:
    """This process's rows (``rank::size``) of every batch, in order."""
    rows = slice(world.rank, None, world.size)
    if workers <= 0 or isinstance(x_train, torch.Tensor):
        return (read_batch(x_train, batch[rows]) for batch in batches)
    from ..data.stream import read_ahead

    reads = read_ahead(x_train, [batch[rows].numpy() for batch in batches], workers=workers,
                       pin_memory=device.type == "cuda")
    return (checked(x) for x in reads)
