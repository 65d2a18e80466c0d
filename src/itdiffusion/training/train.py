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

Gradient accumulation (``grad_accum=N``) takes steps on batches of ``N * batch_size``
examples, in ``N`` forward/backward passes: pass ``j`` of process ``r`` takes share
``j * size + r`` of ``N * size`` of the batch, with the noise the whole batch would get (the
generator is rewound to the step's state for every pass), so a run with ``batch_size=b,
grad_accum=N`` follows the run with ``batch_size=N*b`` up to the order of floating-point
sums (and dropout masks, drawn per pass).  ``ema``: an exponential moving average of the
weights (:mod:`itdiffusion.training.ema`) is updated after every step, used for validation
and saved next to the raw weights.  ``dtype="bf16"``: the loss's forward pass runs under
``torch.autocast`` to bfloat16; the weights, the optimizer and the Gaussian terms stay in
float32/float64.  ``log_dir``: per-step CSV and TensorBoard scalars
(:mod:`itdiffusion.training.runlog`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import fileio as _io
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .distributed import World, all_sum, barrier
from .ema import EMA, check_decay
from .reads import batch_reads, read_batch as _read_batch  # noqa: F401 (tests reach _read_batch here)
from .runlog import RunLog
from ..core.grid import DiscreteGrid
from ..model import ITDiffusion
from ..core.noise import example_seed

CHECKPOINT = "checkpoint.safetensors"
HISTORY = "history.json"
_RANK_STRIDE = 7919  # offsets the dropout seed of process r > 0 (process 0 keeps the one-process seed)
TRAIN_DTYPES = ("fp32", "bf16")


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
    ema: float | None = None  # decay of an exponential moving average of the weights (None: no average)
    grad_accum: int = 1  # forward/backward passes of batch_size examples per optimizer step
    dtype: str = "fp32"  # "bf16": the training forward pass under bfloat16 autocast

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "val_points", "grad_accum"):
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
        if self.ema is not None:
            check_decay(self.ema)
        if self.dtype not in TRAIN_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(TRAIN_DTYPES)}, got {self.dtype!r}")


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
    log_dir: str | Path | None = None,
    workers: int = 0,
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
        on_epoch: called after every epoch with its record and the model (its raw weights; first process only).
        world: this process's place in a data-parallel job (the process group must be
            initialised); ``None``: one process.
        log_dir: a folder for the per-step ``log.csv`` and, when ``tensorboard`` is installed,
            TensorBoard scalars (:mod:`itdiffusion.training.runlog`); continued by a resumed run.
        workers: with a source read on demand, this many ``DataLoader`` processes decode the
            epoch's batches ahead of use (pinned on CUDA); the weights do not depend on it.
    """
    world = world or World()
    device, params = _check_inputs(model, x_train, config, x_val, discrete)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    ema = EMA(model, config.ema) if config.ema is not None else None
    history, start = History(), 1
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if world.distributed and config.batch_size < world.size:
        raise ValueError(f"batch_size {config.batch_size} is smaller than the number of processes {world.size}")
    if resume:
        start, history = _resume_and_tidy(model, optimizer, ema, out, config, world)
    loop = _Loop(model, _loss_function(model, device, world), optimizer, ema, x_train, config, device, world,
                 progress, log_dir is not None, workers)
    steps = len(_epoch_batches(len(x_train), config, start, world))  # the same number in every epoch
    log = RunLog(log_dir, start, (start - 1) * steps + 1) if log_dir is not None and world.is_main else None
    saved = False
    try:
        for epoch in range(start, config.epochs + 1):
            record = _epoch(loop, epoch, log, x_val, discrete)
            history.records.append(record)
            if out is not None and world.is_main:
                _save(out, model, optimizer, ema, epoch, config, history, meta)
            saved = True
            if on_epoch is not None and world.is_main:
                on_epoch(record, model)
    finally:
        if log is not None:  # a new run that failed before its first checkpoint leaves no log
            log.close(discard=start == 1 and not saved and sys.exc_info()[0] is not None)
    barrier(world)
    return history


def _resume_and_tidy(model, optimizer, ema, out: Path, config, world: World) -> tuple[int, History]:
    """The run's state from ``out``; a run killed while writing or between its two files is tidied up."""
    start, history = _resume(model, optimizer, ema, out, config)
    if world.is_main:
        for name in (CHECKPOINT, HISTORY):
            _io.remove_stale_temps(out / name)
        _io.save_json_atomic(out / HISTORY, history.to_json())
    return start, history


@dataclass
class _Loop:
    """What every epoch of a run uses."""

    model: ITDiffusion
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    x_train: object
    config: TrainConfig
    device: torch.device
    world: World
    progress: bool
    log_steps: bool  # compute every step's batch-mean loss (over all processes) for the log
    workers: int = 0  # DataLoader processes reading batches of a source ahead of use


def _epoch(loop: _Loop, epoch: int, log: RunLog | None, x_val, discrete) -> EpochRecord:
    """Train one epoch, validate (with the EMA weights when there are some) and log it."""
    began = time.perf_counter()
    loss = _run_epoch(loop, epoch, log)
    val = (None, None)
    if x_val is not None and loop.world.is_main:
        with loop.ema.applied(loop.model) if loop.ema is not None else contextlib.nullcontext():
            val = validate(loop.model, x_val.to(loop.device), loop.config, discrete)
    if log is not None:
        log.end_epoch(loss, *val)
    return EpochRecord(epoch, loss, val[0], val[1], time.perf_counter() - began)


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
    if not world.distributed:  # one share of one: the plain batch mean
        return lambda x, generator, share: model.loss(x, generator=generator, share=share if share[1] > 1 else None)
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


def _epoch_batches(n: int, config: TrainConfig, epoch: int, world: World) -> list[torch.Tensor]:
    """Every step's batch of the epoch (the same permutation on every process), ``grad_accum`` passes each."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(config.seed, epoch)))
    size = config.batch_size * config.grad_accum
    batches = [order[i : i + size] for i in range(0, n, size)]
    if world.distributed:  # a trailing batch too small to give every process an example in every pass is dropped
        batches = [b for b in batches if len(b) >= world.size * config.grad_accum]
    return batches


def _run_epoch(loop: _Loop, epoch: int, log: RunLog | None) -> float:
    config, world, device = loop.config, loop.world, loop.device
    seed = _epoch_seed(config.seed, epoch)
    # The same stream on every process: each draws the noise of the whole batch and keeps its rows,
    # so that the examples see the noise they would see in one process.
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    batches = _epoch_batches(len(loop.x_train), config, epoch, world)
    loop.model.train()
    total, count = 0.0, 0
    bar = _progress(len(batches), f"epoch {epoch}/{config.epochs}", loop.progress and world.is_main)
    devices = [device] if device.type == "cuda" else []
    reduce_on = device if device.type == "cuda" else "cpu"
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 2 + _RANK_STRIDE * world.rank)  # dropout, inside the fork only
        for step, (batch, x) in enumerate(zip(batches, batch_reads(loop.x_train, batches, loop.world, loop.device, loop.workers))):
            index = (epoch - 1) * len(batches) + step
            lr = _set_lr(loop.optimizer, config, index, config.epochs * len(batches))
            step_sum, rows = _step(loop, batch, x, gen, epoch, step)
            total, count = total + step_sum, count + rows
            if loop.log_steps:  # the step's batch mean over all processes
                batch_sum = all_sum([step_sum], world, reduce_on)[0]
                if log is not None:
                    log.step(index + 1, epoch, batch_sum / len(batch), lr)
            bar.update(1)
            bar.set_postfix(loss=f"{total / count:.4f}")
    bar.close()
    total, count = all_sum([total, count], world, reduce_on)
    return total / count


def _step(loop: _Loop, batch: torch.Tensor, x: torch.Tensor, gen: torch.Generator, epoch: int,
          step: int) -> tuple[float, int]:
    """One optimizer step on ``batch`` (this process's rows ``x``) in ``grad_accum`` passes; the summed loss, rows."""
    config, world, model = loop.config, loop.world, loop.model
    passes, parts = config.grad_accum, config.grad_accum * world.size
    rows = slice(world.rank, None, world.size)
    x = x.to(loop.device, non_blocking=True)
    if config.dequantize:
        u = torch.rand((len(batch), *x.shape[1:]), generator=gen, device=gen.device, dtype=x.dtype)
        x = x + config.dequantize * (u[rows].to(loop.device) - 0.5)
    start = gen.get_state() if passes > 1 else None
    loop.optimizer.zero_grad(set_to_none=True)
    step_sum = 0.0
    for j in range(passes):
        part = x[j::passes]  # share j * size + rank of the batch (rows of this process's share, every passes-th)
        if not len(part):  # a short last batch of one process (several processes drop such batches)
            continue
        if start is not None:
            gen.set_state(start)  # every pass draws the noise of the whole batch and keeps its share's
        with _no_sync(loop.loss_fn, j < passes - 1), _autocast(config.dtype, loop.device):
            loss = loop.loss_fn(part, gen, (j * world.size + world.rank, parts, len(batch)))
        value = loss.item()
        if not math.isfinite(value):  # before the step: the weights stay those of the last good step
            raise FloatingPointError(f"training loss became {value} in epoch {epoch}, step {step + 1}; lower the lr")
        with _no_sync(loop.loss_fn, j < passes - 1):
            (loss / passes if passes > 1 else loss).backward()
        # this share's summed loss (the loss of a share is scaled by parts / n)
        step_sum += value * len(batch) / parts
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    loop.optimizer.step()
    if loop.ema is not None:
        loop.ema.update(model)
    return step_sum, len(x)


def _no_sync(loss_fn, skip: bool):
    """``DistributedDataParallel.no_sync`` for the passes before a step's last (gradients all-reduced once)."""
    return loss_fn.no_sync() if skip and hasattr(loss_fn, "no_sync") else contextlib.nullcontext()


def _autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _set_lr(optimizer, config: TrainConfig, step: int, total: int) -> float:
    """Learning rate as a function of the global step only (so a resumed run matches); returns it."""
    lr = config.lr
    if config.lr_schedule == "cosine":
        lr = 0.5 * config.lr * (1.0 + math.cos(math.pi * step / max(1, total)))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI); the bar shows the epoch's ETA
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, dynamic_ncols=True)


def _save(out: Path, model, optimizer, ema: EMA | None, epoch, config, history, meta) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # The RNG state of the next epoch is a function of (seed, epoch): record it explicitly.
    rng = {"seed": config.seed, "next_epoch": epoch + 1, "next_epoch_seed": _epoch_seed(config.seed, epoch + 1)}
    ckpt_meta = {"train_config": asdict(config), "history": history.to_json(), "model": meta or {}, "rng": rng}
    ema_state = None if ema is None else ema.state_dict()
    save_checkpoint(out / CHECKPOINT, Checkpoint(model.state_dict(), optimizer.state_dict(), epoch, ckpt_meta,
                                                 ema_state=ema_state))
    _io.save_json_atomic(out / HISTORY, history.to_json())


_MUST_MATCH = ("lr", "batch_size", "seed", "grad_clip", "lr_schedule", "val_points", "val_examples", "dequantize",
               "ema", "grad_accum", "dtype")
_ADDED_LATER = {"ema": None, "grad_accum": 1, "dtype": "fp32"}  # what a checkpoint written before them trained with


def _resume(model, optimizer, ema: EMA | None, out: Path | None, config: TrainConfig):
    if out is None or not (out / CHECKPOINT).exists():
        raise ValueError(f"nothing to resume: no {CHECKPOINT} in {out}")
    ckpt = load_checkpoint(out / CHECKPOINT)
    saved = {**_ADDED_LATER, **ckpt.meta.get("train_config", {})}
    must_match = _MUST_MATCH + (("epochs",) if config.lr_schedule == "cosine" else ())
    changed = [k for k in must_match if k in saved and saved[k] != getattr(config, k)]
    if changed:
        raise ValueError("cannot resume with different settings: " + ", ".join(
            f"{k} {saved[k]!r} -> {getattr(config, k)!r}" for k in changed))
    if ema is not None and ckpt.ema_state is None:
        raise ValueError(f"cannot resume with an EMA: {out / CHECKPOINT} holds no EMA weights")
    model.load_state_dict(ckpt.model_state)
    optimizer.load_state_dict(ckpt.optimizer_state)
    if ema is not None:
        ema.load_state_dict(ckpt.ema_state)
    return ckpt.epoch + 1, History.from_json(ckpt.meta.get("history", []))
