"""A metric over batches, torchmetrics-style: ``update(x)``, ``compute()``, ``reset()``, distributed-aware.

:class:`BitsPerDim` runs the evaluation protocol of :func:`itdiffusion.evaluate` one batch at a
time and keeps only three float64 sums (examples, sum and sum of squares of the per-example
estimate), so it fits inside a training loop for validation.  Example ``i`` is evaluated with the
noise of index ``i`` (``first_index``), exactly as :func:`~itdiffusion.evaluate` would, so
``update`` over the batches of a data set gives what ``evaluate`` gives on it at the same seed.
Under ``torch.distributed`` each process updates with its own examples and ``compute`` sums the
three numbers over all processes.
"""

from __future__ import annotations

import math

import torch

from .evaluation import EvalConfig, Evaluator
from .results import Estimate

ESTIMATES = ("continuous", "discrete", "dequantized_discrete", "dequantized")  # the last: an older name
RANK_STRIDE = 2**40  # default index of a rank's examples: rank * RANK_STRIDE + its running count


class BitsPerDim:
    """Mean ``-log p(x)`` (or the discrete bound, or the dequantized estimate) over every example seen.

    Args:
        model: the :class:`~itdiffusion.ITDiffusion` to evaluate (its device is used).
        n_points: network calls per example (and per pass).
        discrete: the data grid (``DiscreteGrid``) for data on a grid, else ``None``.
        estimate: ``"discrete"`` (the default for data on a grid), ``"continuous"`` (the default
            otherwise) or ``"dequantized_discrete"`` (the dequantized bound on ``-log P(x)``:
            ``-log p(x + u) - d log delta``, the results' ``estimates["dequantized_discrete"]``;
            ``"dequantized"`` is accepted as an older name of the same).
        seed, soft, clip, protocol, batch_size: as in :func:`itdiffusion.evaluate`.

    ``compute()`` returns an :class:`~itdiffusion.Estimate` (``.bpd``, ``.se_bpd``, ``.nats``).
    """

    def __init__(self, model, n_points: int = 256, *, discrete=None, estimate: str | None = None, seed: int = 0,
                 soft: bool = False, clip: float | None = None, protocol: str = "ours",
                 batch_size: int | None = None):
        estimate = estimate or ("discrete" if discrete is not None else "continuous")
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES[:3]}, got {estimate!r}")
        estimate = "dequantized_discrete" if estimate == "dequantized" else estimate  # one name, the results' own
        if estimate != "continuous" and discrete is None:
            raise ValueError(f"the {estimate} estimate needs the data grid (discrete=DiscreteGrid(...))")
        config = EvalConfig(n_points=n_points, discrete=discrete, soft=soft, dequantize=estimate == "dequantized_discrete",
                            seed=seed, clip=clip, protocol=protocol)
        self.model, self.estimate = model, estimate
        self._evaluator = Evaluator(model, config, batch_size=batch_size)
        self.reset()

    def reset(self) -> None:
        """Forget every example seen."""
        self._sums = [0.0, 0.0, 0.0]  # examples, sum of nats, sum of squared nats
        self._seen = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, first_index: int | None = None) -> None:
        """Add the examples ``x`` ``(B, *shape)``; example ``k`` of the batch uses the noise of index
        ``first_index + k``.  Default: the examples seen so far by this process, offset by
        ``rank * 2**40`` under ``torch.distributed`` (every example its own noise; give
        ``first_index`` to reproduce :func:`~itdiffusion.evaluate` on any number of processes)."""
        if first_index is None:
            first_index = _rank() * RANK_STRIDE + self._seen
        device = next((b.device for b in self.model.buffers()), torch.device("cpu"))
        chunk = self._evaluator.evaluate_rows(x.to(device), int(first_index))
        row = "dequantized" if self.estimate == "dequantized_discrete" else self.estimate
        values = torch.from_numpy(chunk.arrays[f"{row}/nll"]).double()
        if self.estimate == "dequantized_discrete":
            values = values - self.model.spectrum.d * math.log(self._evaluator.config.discrete.delta)
        self._sums[0] += len(values)
        self._sums[1] += values.sum().item()
        self._sums[2] += (values * values).sum().item()
        self._seen += len(x)

    def compute(self) -> Estimate:
        """The mean over every example seen (by every process), with its standard error."""
        n, total, squares = _all_sum(self._sums)
        if n < 1:
            raise ValueError("BitsPerDim.compute() before any update()")
        mean = total / n
        var = max(squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else math.nan
        return Estimate(mean, math.sqrt(var / n) if n > 1 else math.nan, self.model.spectrum.d)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()
