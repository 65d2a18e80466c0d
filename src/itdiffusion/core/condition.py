"""Conditions ``y`` of a conditional denoiser ``f(z, logsnr, y=None) -> eps_hat``.

A denoiser is conditional when it takes a keyword ``y`` (class labels, or any tensor its
network takes); ``y=None`` is unconditional (or the null label of a classifier-free-guidance
model).  A denoiser may say so itself with a boolean attribute ``conditional`` (the
diffusers and IDDPM adapters do: a UNet without a class embedding would ignore labels, and a
conditional likelihood equal to the unconditional one would be a silent wrong number).
"""

from __future__ import annotations

import inspect

import torch


def takes_y(denoiser) -> bool:
    """Whether ``denoiser`` can be called as ``denoiser(z, logsnr, y=...)``."""
    flag = getattr(denoiser, "conditional", None)
    if flag is not None:
        return bool(flag)
    unwrap = getattr(denoiser, "unwrap", None)
    if callable(unwrap):  # a wrapper that passes arguments through (e.g. device options)
        return takes_y(unwrap())
    fn = denoiser.forward if isinstance(denoiser, torch.nn.Module) else denoiser
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "y" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def check_takes_y(denoiser) -> None:
    """``ValueError`` (one line) unless ``denoiser`` takes a condition ``y``."""
    if not takes_y(denoiser):
        name = type(denoiser).__name__
        raise ValueError(f"the denoiser ({name}) is not conditional: it takes no y (class labels); "
                         "a conditional likelihood needs a class-conditional network")


def as_condition(y, n: int, device=None) -> torch.Tensor | None:
    """``y`` as a ``(n, ...)`` tensor: an int (the same label for all), a sequence or a tensor.

    Integer labels become ``int64``; other tensors keep their dtype.  ``None`` stays ``None``.
    """
    if y is None:
        return None
    if isinstance(y, bool):
        raise ValueError(f"y must be labels or a tensor, got {y!r}")
    if isinstance(y, int):
        return torch.full((n,), y, dtype=torch.long, device=device)
    t = y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
    if not t.is_floating_point() and not t.is_complex():
        t = t.long()
    if t.dim() == 0:
        t = t.expand(n)
    if len(t) != n:
        raise ValueError(f"y has {len(t)} conditions for {n} examples (give one per example, or one int for all)")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError("y contains NaN or Inf")
    return t.to(device) if device is not None else t


class NullLabel(torch.nn.Module):
    """A conditional denoiser whose ``y=None`` is a fixed null label (classifier-free-guidance models,
    trained with labels dropped to ``null``): ``f(z, logsnr, y=None) -> inner(z, logsnr, y=y or null)``."""

    conditional = True

    def __init__(self, inner, null: int):
        super().__init__()
        check_takes_y(inner)
        self.inner = inner
        self.null = int(null)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            y = torch.full((len(z),), self.null, dtype=torch.long, device=z.device)
        return self.inner(z, logsnr, y=y)
