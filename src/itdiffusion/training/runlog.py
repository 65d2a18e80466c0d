"""What a training run logs to ``--log-dir``: a CSV always, TensorBoard scalars when installed.

``log.csv`` holds one row per optimizer step: ``step`` (1-based, over the whole run),
``epoch``, ``loss`` (the step's batch-mean IT loss, nats per example), ``lr`` (the rate the
step used), and, on the last step of an epoch that validated, ``val_nll`` and ``val_se``
(the validation NLL, or its discrete bound, and its standard error, nats per example).
Each row is written and flushed as its step ends (the last step of an epoch waits for the
validation), before the epoch's checkpoint is written, so after a kill the CSV holds at
least every step of the checkpoint's epochs; resuming drops the rows after them (and a
half-written last line) so the steps are never duplicated or missing.

With ``tensorboard`` importable (``pip install itdiffusion[log]``), the same numbers go to
TensorBoard event files in the folder: ``train/loss`` and ``train/lr`` per step,
``train/epoch_loss``, ``val/nll`` and ``val/se`` per epoch (at the epoch's last step).  A
resumed run writes a new event file that purges the old file's steps from the resumed one
on (``purge_step``), so TensorBoard shows each step once.
"""

from __future__ import annotations

import math
from pathlib import Path

from .. import fileio as _io

CSV_NAME = "log.csv"
COLUMNS = ("step", "epoch", "loss", "lr", "val_nll", "val_se")
_EVENTS = "events.out.tfevents.*"


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be imported (it needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def _number(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))


def _kept_lines(path: Path, last_epoch: int) -> list[str]:
    """The complete rows of ``path`` of epochs up to ``last_epoch`` (with the header first)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")[:-1]  # a last line without its newline was cut by a kill
    if not lines or lines[0] != ",".join(COLUMNS):
        raise ValueError(f"{path} is not a log of this program (its header is not {','.join(COLUMNS)}); "
                         "move it away or choose another --log-dir")
    kept = [lines[0]]
    for line in lines[1:]:
        fields = line.split(",")
        try:
            epoch = int(fields[1])
        except (IndexError, ValueError):
            continue
        if len(fields) == len(COLUMNS) and epoch <= last_epoch:
            kept.append(line)
    return kept


class RunLog:
    """The per-step CSV (and TensorBoard scalars) of one run, continued by a resumed run.

    Args:
        folder: the log folder (created if missing).
        first_epoch: the epoch this process starts with (``> 1`` when resuming).
        first_step: the global step this process starts with (1-based).
        tensorboard: also write TensorBoard scalars (``None``: when importable).
    """

    def __init__(self, folder, first_epoch: int, first_step: int, tensorboard: bool | None = None):
        self.folder = Path(folder)
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / CSV_NAME
        self._made_csv = not self.path.exists()
        _io.remove_stale_temps(self.path)
        lines = [",".join(COLUMNS)]
        if self.path.exists():
            if first_epoch == 1:
                raise ValueError(f"--log-dir {self.folder} already holds {CSV_NAME} of another run; "
                                 "choose another --log-dir (a resumed run continues its own)")
            lines = _kept_lines(self.path, first_epoch - 1)
        _io.write_atomic(self.path, lambda fh: fh.write(("\n".join(lines) + "\n").encode()))
        self._csv = open(self.path, "a", encoding="utf-8")
        self._pending: dict | None = None
        self._writer = None
        if tensorboard if tensorboard is not None else tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            self._old_events = set(self.folder.glob(_EVENTS))
            self._writer = SummaryWriter(str(self.folder), purge_step=first_step if first_step > 1 else None)

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        """Record one optimizer step (its row is written when the next step, or the epoch's end, comes)."""
        self._flush_pending()
        self._pending = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "val_nll": None, "val_se": None}
        if self._writer is not None:
            self._writer.add_scalar("train/loss", loss, step)
            self._writer.add_scalar("train/lr", lr, step)

    def end_epoch(self, epoch_loss: float, val_nll: float | None, val_se: float | None) -> None:
        """The epoch's mean loss and validation, on its last step's row; everything is flushed."""
        row = self._pending
        if row is not None:
            row["val_nll"], row["val_se"] = val_nll, val_se
            if self._writer is not None:
                self._writer.add_scalar("train/epoch_loss", epoch_loss, row["step"])
                if val_nll is not None:
                    self._writer.add_scalar("val/nll", val_nll, row["step"])
                if val_se is not None and math.isfinite(val_se):
                    self._writer.add_scalar("val/se", val_se, row["step"])
        self._flush_pending()
        if self._writer is not None:
            self._writer.flush()

    def _flush_pending(self) -> None:
        row, self._pending = self._pending, None
        if row is None:
            return
        fields = [str(row["step"]), str(row["epoch"])] + [_number(row[k]) for k in COLUMNS[2:]]
        self._csv.write(",".join(fields) + "\n")
        self._csv.flush()

    def close(self, discard: bool = False) -> None:
        """Flush and close; ``discard``: remove what this log created (a run that failed before its first
        checkpoint leaves no files behind)."""
        if discard:
            self._pending = None
        self._flush_pending()
        self._csv.close()
        if self._writer is not None:
            self._writer.close()
        if not discard:
            return
        if self._writer is not None:
            for path in set(self.folder.glob(_EVENTS)) - self._old_events:
                path.unlink(missing_ok=True)
        if self._made_csv:
            self.path.unlink(missing_ok=True)
        if self._made_folder and not any(self.folder.iterdir()):
            self.folder.rmdir()
