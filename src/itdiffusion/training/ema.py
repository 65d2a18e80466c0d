"""An exponential moving average (EMA) of a model's trainable weights, kept in float32.

After every optimizer step ``ema <- decay * ema + (1 - decay) * w`` for each trainable
parameter ``w`` (no bias correction: the average starts at the weights training starts
from, as the published DDPM/IDDPM EMA weights did).  The average is what a run validates
and what ``itd eval --model RUN`` evaluates; the raw weights stay in the checkpoint for
resuming.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


def check_decay(decay) -> float:
    """``decay`` as a float if ``0 < decay < 1``; ``ValueError`` otherwise."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0.0 < decay < 1.0) \
            or not math.isfinite(decay):
        raise ValueError(f"ema decay must lie strictly between 0 and 1, got {decay!r}")
    return float(decay)


class EMA:
    """The moving average of ``model``'s trainable parameters (by name), in float32."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = check_decay(decay)
        self.shadow = {name: p.detach().to(torch.float32).clone()
                       for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].mul_(self.decay).add_(p.detach().to(torch.float32), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged parameters by name (float32)."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take the average saved by :meth:`state_dict` (the same names and shapes)."""
        if set(state) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise ValueError(f"the saved EMA weights do not match the model (missing {missing[:3]}, extra {extra[:3]})")
        for name, value in state.items():
            if tuple(value.shape) != tuple(self.shadow[name].shape):
                raise ValueError(f"the saved EMA weight {name} has shape {tuple(value.shape)}, "
                                 f"the model's {tuple(self.shadow[name].shape)}")
            self.shadow[name] = value.detach().to(device=self.shadow[name].device, dtype=torch.float32).clone()

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Inside the block ``model`` holds the averaged weights; its own are put back after (exactly)."""
        params = dict(model.named_parameters())
        raw = {name: params[name].detach().clone() for name in self.shadow}
        try:
            with torch.no_grad():
                for name, value in self.shadow.items():
                    params[name].copy_(value)
            yield model
        finally:
            with torch.no_grad():
                for name, value in raw.items():
                    params[name].copy_(value)
