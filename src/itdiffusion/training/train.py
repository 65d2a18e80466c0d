"""Training (or fine-tuning) a denoiser with the information-theoretic objective.

Plain PyTorch: Adam on ``ITDiffusion.loss``.  Every epoch's randomness (shuffling, the
loss's log-SNR and noise draws, dropout) comes from a seed derived from
``(config.seed, epoch)``, so a run resumed from the checkpoint of epoch ``k`` retraces
exactly what the uninterrupted run would have done.  The caller's global RNG is left
untouched (dropout runs inside ``torch.random.fork_rng``).

Data parallel (``world`` with several processes, see :mod:`itdiffusion.training.distributed`):
every process draws the same epoch permutation and takes every ``size``-th example of
each batch; every process draws the log-SNR strata and noise of the whole batch from
the same stream and keeps its rows, so each example is trained with the noise it would
get in one process, and each process's loss is scaled so that the gradients averaged by
``DistributedDataParallel`` are those of the batch mean.  Without dropout the only
difference from one process is then the order of floating-point sums (see
``tests/test_pipeline.py``); dropout masks are drawn per process.  Only the first process
validates and writes files.  One process behaves exactly as without ``world``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import fileio as _io
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .distributed import World, all_sum, barrier
from ..core.grid import DiscreteGrid
from ..model import ITDiffusion
from ..core.noise import example_seed

CHECKPOINT = "checkpoint.safetensors"
HISTORY = "history.json"
_RANK_STRIDE = 7919  # offsets the dropout seed of process r > 0 (process 0 keeps the one-process seed)


@dataclass
class TrainConfig:
    """Optimisation settings (saved in every checkpoint)."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 256
    seed: int = 0
    grad_clip: float | None = None
    lr_schedule: str = "constant"  # or "cosine": decay to 0 over all epochs' steps
    val_points: int = 64  # network calls per validation example
    val_examples: int | None = 1000  # validate on at most this many examples
    dequantize: float = 0.0  # add uniform noise of this width (e.g. the grid step) to every training batch

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "val_points"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip!r}")
        if not (self.dequantize >= 0 and math.isfinite(self.dequantize)):
            raise ValueError(f"dequantize must be a non-negative width, got {self.dequantize!r}")


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float  # mean IT loss over the epoch, nats per example
    val_nll: float | None  # validation -log p (or the discrete bound), nats per example
    val_se: float | None
    seconds: float


@dataclass
class History:
    records: list[EpochRecord] = field(default_factory=list)

    def to_json(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    @classmethod
    def from_json(cls, rows: list[dict]) -> "History":
        return cls([EpochRecord(**r) for r in rows])


def _epoch_seed(seed: int, epoch: int) -> int:
    return example_seed(seed, 1_000_003 + epoch)


def _device(model: ITDiffusion) -> torch.device:
    return next(iter(model.buffers())).device


@torch.no_grad()
def validate(model: ITDiffusion, x_val: torch.Tensor, config: TrainConfig, discrete: DiscreteGrid | None = None):
    """Mean validation NLL and its standard error (nats per example), with a fixed seed."""
    was_training = model.training
    model.eval()
    x = x_val[: config.val_examples] if config.val_examples else x_val
    batch = max(1, min(len(x), 2**16 // config.val_points))
    nll = torch.cat([
        model.nll(x[i : i + batch], config.val_points, seed=config.seed, discrete=discrete)
        for i in range(0, len(x), batch)
    ])
    model.train(was_training)
    return nll.mean().item(), (nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan"))


def train(
    model: ITDiffusion,
    x_train: torch.Tensor,
    config: TrainConfig,
    *,
    x_val: torch.Tensor | None = None,
    discrete: DiscreteGrid | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    meta: dict | None = None,
    progress: bool = True,
    on_epoch: Callable[[EpochRecord, ITDiffusion], None] | None = None,
    world: World | None = None,
) -> History:
    """Train ``model``'s denoiser on ``x_train`` with the IT objective; returns the history.

    Args:
        x_train: ``(n, *shape)`` tensor, or a source read on demand (``len(x_train)``, its ``shape``
            and ``x_train[indices]``, e.g. :class:`~itdiffusion.data.stream.ImageSource`), so that a data
            set larger than memory is never held whole; rows are moved to the model's device per batch.
        x_val: ``(n, *shape)`` tensor.
        discrete: validate with the discrete bound on this grid.
        out_dir: where ``checkpoint.safetensors`` and ``history.json`` are written
            (atomically) after every epoch.
        resume: continue from ``out_dir``'s checkpoint (its settings must match).
        meta: JSON-able description stored in the checkpoint (e.g. how to rebuild the net).
        on_epoch: called after every epoch with its record and the model (first process only).
        world: this process's place in a data-parallel job (the process group must be
            initialised); ``None``: one process.
    """
    world = world or World()
    device, params = _check_inputs(model, x_train, config, x_val, discrete)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    history, start = History(), 1
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if world.distributed and config.batch_size < world.size:
        raise ValueError(f"batch_size {config.batch_size} is smaller than the number of processes {world.size}")
    if resume:
        start, history = _resume(model, optimizer, out, config)
        if world.is_main:  # a run killed while writing or between its two files: tidy up, make them agree
            for name in (CHECKPOINT, HISTORY):
                _io.remove_stale_temps(out / name)
            _io.save_json_atomic(out / HISTORY, history.to_json())
    loss_fn = _loss_function(model, device, world)
    for epoch in range(start, config.epochs + 1):
        began = time.perf_counter()
        loss = _run_epoch(model, loss_fn, optimizer, x_train, config, epoch, device, progress, world)
        val = (None, None)
        if x_val is not None and world.is_main:
            val = validate(model, x_val.to(device), config, discrete)
        record = EpochRecord(epoch, loss, val[0], val[1], time.perf_counter() - began)
        history.records.append(record)
        if out is not None and world.is_main:
            _save(out, model, optimizer, epoch, config, history, meta)
        if on_epoch is not None and world.is_main:
            on_epoch(record, model)
    barrier(world)
    return history


def _check_inputs(model: ITDiffusion, x_train, config: TrainConfig, x_val, discrete) -> tuple[torch.device, list]:
    """Validate the settings and data; returns the model's device and its trainable parameters."""
    config.validate()
    _check_train_data(model, x_train)
    if x_val is not None:
        model.check_data(x_val, discrete, name="validation data")
    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the denoiser has no trainable parameters")
    return device, params


class _Loss(nn.Module):
    """``forward(x, generator) = model.loss(x, generator)``, so that DistributedDataParallel sees the call."""

    def __init__(self, model: ITDiffusion):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, generator: torch.Generator, share: tuple[int, int, int]) -> torch.Tensor:
        return self.model.loss(x, generator=generator, share=share)


def _loss_function(model: ITDiffusion, device: torch.device, world: World):
    if not world.distributed:
        return lambda x, generator, share: model.loss(x, generator=generator)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if device.type == "cuda" else None
    # The spectrum buffers never change: no need to broadcast them before every step.
    return DistributedDataParallel(_Loss(model), device_ids=ids, broadcast_buffers=False)


def _check_train_data(model: ITDiffusion, x_train) -> None:
    """A tensor is checked whole; a source read on demand (``len``, ``shape``, ``source[indices]``,
    e.g. :class:`~itdiffusion.data.stream.ImageSource`) by its shape here and batch by batch when read."""
    if isinstance(x_train, torch.Tensor):
        model.check_data(x_train, None, name="training data")
    elif tuple(getattr(x_train, "shape", ())) != tuple(model.shape) or len(x_train) == 0:
        raise ValueError(f"training data of {len(x_train)} examples of shape {tuple(getattr(x_train, 'shape', ()))} "
                         f"do not fit a model of examples of shape {tuple(model.shape)}")


def _read_batch(x_train, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of the training data; rows read on demand are checked as they arrive."""
    x = x_train[indices]
    if not isinstance(x_train, torch.Tensor) and not bool(torch.isfinite(x).all()):
        raise ValueError("training data contain NaN or Inf")
    return x


def _epoch_batches(n: int, config: TrainConfig, epoch: int, world: World) -> list[torch.Tensor]:
    """Every batch of the epoch (the same permutation on every process)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(config.seed, epoch)))
    batches = [order[i : i + config.batch_size] for i in range(0, n, config.batch_size)]
    if world.distributed:  # a trailing batch too small to give every process an example is dropped
        batches = [b for b in batches if len(b) >= world.size]
    return batches


def _run_epoch(model, loss_fn, optimizer, x_train, config, epoch, device, progress, world) -> float:
    seed = _epoch_seed(config.seed, epoch)
    # The same stream on every process: each draws the noise of the whole batch and keeps its rows,
    # so that the examples see the noise they would see in one process.
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    batches = _epoch_batches(len(x_train), config, epoch, world)
    model.train()
    total, count = 0.0, 0
    bar = _progress(len(batches), f"epoch {epoch}/{config.epochs}", progress and world.is_main)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 2 + _RANK_STRIDE * world.rank)  # dropout, inside the fork only
        for step, batch in enumerate(batches):
            _set_lr(optimizer, config, (epoch - 1) * len(batches) + step, config.epochs * len(batches))
            rows = slice(world.rank, None, world.size)
            x = _read_batch(x_train, batch[rows]).to(device)
            if config.dequantize:
                u = torch.rand((len(batch), *x.shape[1:]), generator=gen, device=gen.device, dtype=x.dtype)
                x = x + config.dequantize * (u[rows].to(device) - 0.5)
            loss = loss_fn(x, gen, (world.rank, world.size, len(batch)))
            if not math.isfinite(loss.item()):  # before the step: the weights stay those of the last good step
                raise FloatingPointError(f"training loss became {loss.item()} in epoch {epoch}, step {step + 1}; "
                                         "lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            # this process's share of the batch's summed loss (the loss of a share is scaled by size / n)
            total, count = total + loss.item() * len(batch) / world.size, count + len(x)
            bar.update(1)
            bar.set_postfix(loss=f"{total / count:.4f}")
    bar.close()
    total, count = all_sum([total, count], world, device if device.type == "cuda" else "cpu")
    return total / count


def _set_lr(optimizer, config: TrainConfig, step: int, total: int) -> None:
    """Learning rate as a function of the global step only (so a resumed run matches)."""
    lr = config.lr
    if config.lr_schedule == "cosine":
        lr = 0.5 * config.lr * (1.0 + math.cos(math.pi * step / max(1, total)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI)
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, dynamic_ncols=True)


def _save(out: Path, model, optimizer, epoch, config, history, meta) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # The RNG state of the next epoch is a function of (seed, epoch): record it explicitly.
    rng = {"seed": config.seed, "next_epoch": epoch + 1, "next_epoch_seed": _epoch_seed(config.seed, epoch + 1)}
    ckpt_meta = {"train_config": asdict(config), "history": history.to_json(), "model": meta or {}, "rng": rng}
    save_checkpoint(out / CHECKPOINT, Checkpoint(model.state_dict(), optimizer.state_dict(), epoch, ckpt_meta))
    _io.save_json_atomic(out / HISTORY, history.to_json())


_MUST_MATCH = ("lr", "batch_size", "seed", "grad_clip", "lr_schedule", "val_points", "val_examples", "dequantize")


def _resume(model, optimizer, out: Path | None, config: TrainConfig):
    if out is None or not (out / CHECKPOINT).exists():
        raise ValueError(f"nothing to resume: no {CHECKPOINT} in {out}")
    ckpt = load_checkpoint(out / CHECKPOINT)
    saved = ckpt.meta.get("train_config", {})
    must_match = _MUST_MATCH + (("epochs",) if config.lr_schedule == "cosine" else ())
    changed = [k for k in must_match if k in saved and saved[k] != getattr(config, k)]
    if changed:
        raise ValueError("cannot resume with different settings: " + ", ".join(
            f"{k} {saved[k]!r} -> {getattr(config, k)!r}" for k in changed))
    model.load_state_dict(ckpt.model_state)
    optimizer.load_state_dict(ckpt.optimizer_state)
    return ckpt.epoch + 1, History.from_json(ckpt.meta.get("history", []))
