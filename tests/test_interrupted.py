"""Runs killed with SIGKILL at random moments, then resumed, end exactly where an uninterrupted run ends.

``itd finetune`` and ``itd eval`` run as subprocesses and are killed (``kill -9``: no handler
runs, nothing is flushed) at seeded random moments: after a random number of their
checkpoint or progress files have been written, plus a random fraction of the time between
two writes, so that kills land before, during and after writes.  After every kill the
files on disk must load (they are written to a temporary name and renamed).  The command
is then run again with ``--resume`` (or without it, for ``eval``, whose default is to
continue) until it completes; the final weights, optimizer state, history and results must
equal an uninterrupted run's bit for bit, and no temporary file may be left behind.
The fine-tuning run keeps an EMA of its weights, accumulates gradients over two passes and
logs to a folder: the EMA weights must match too, and the resumed log hold every step once
with the uninterrupted run's values (the CSV byte for byte).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from itdiffusion import Results
from itdiffusion.training.checkpoint import load_checkpoint
from itdiffusion.training.runlog import tensorboard_available
from itdiffusion.cli import main

SRC = Path(__file__).resolve().parent.parent / "src"
KILLS = 3
BUDGET_S = 90.0  # the whole test; about 25 s on an idle 2-core machine


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # one thread, as in this process (conftest): the same float results
    return env


def _inode(path: Path):
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns
    except FileNotFoundError:
        return None


def _run_and_kill(argv: list[str], watched: Path, writes: int, extra_s: float, deadline: float) -> bool:
    """Start ``itd argv``; SIGKILL it ``extra_s`` seconds after ``watched`` has been (re)written
    ``writes`` times (0: counted from the start).  Returns whether it was still running when killed."""
    proc = subprocess.Popen([sys.executable, "-m", "itdiffusion.cli", *argv], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen, last = 0, _inode(watched)
        while seen < writes and proc.poll() is None and time.monotonic() < deadline:
            now = _inode(watched)
            if now is not None and now != last:
                seen, last = seen + 1, now
            time.sleep(0.002)
        time.sleep(extra_s)
        running = proc.poll() is None
        proc.kill()
        proc.wait(timeout=30)
        if not running and proc.returncode != 0:
            pytest.fail(f"itd {argv[0]} failed: {proc.stderr.read().decode()[-2000:]}")
        return running
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def _rows_saved(folder: Path) -> int:
    """Rows held by a progress folder's chunk files (each must read back whole)."""
    total = 0
    for path in folder.glob("rows-*.npz"):
        with np.load(path, allow_pickle=False) as arrays:
            first, stop = (int(v) for v in path.stem.split("-")[1:])
            assert all(len(arrays[k]) == stop - first for k in arrays.files if not k.startswith("sum/"))
        total += stop - first
    return total


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def _tensorboard_losses(folder: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


def _history(run: Path) -> list[dict]:
    rows = json.loads((run / "history.json").read_text())
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def spectrum(tmp_path_factory):
    path = tmp_path_factory.mktemp("interrupted") / "spectrum.npz"
    assert main(["spectrum", "--data", "digits", "--out", str(path), "--dequantize"]) == 0
    return path


def test_killed_finetune_and_eval_resume_to_identical_results(spectrum, tmp_path, capsys):
    began = time.monotonic()
    deadline = began + BUDGET_S
    rng = random.Random(int(os.environ.get("ITD_KILL_SEED", "20240508")))  # try others: ITD_KILL_SEED=n

    # ---------------------------------------------------------------- finetune
    def finetune_args(out: Path) -> list[str]:
        return ["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum),
                "--out", str(out), "--epochs", "10", "--limit", "96", "--batch-size", "16", "--grad-accum", "2",
                "--ema", "0.9", "--log-dir", str(out / "logs"), "--lr", "2e-3",
                "--grad-clip", "1", "--test-data", "digits", "--test-examples", "8", "--test-points", "4",
                "--quiet", "--device", "cpu"]

    reference = tmp_path / "reference-run"
    assert main(finetune_args(reference)) == 0
    assert _temps(reference) == []
    epoch_s = max(r["seconds"] for r in json.loads((reference / "history.json").read_text()))

    run = tmp_path / "killed-run"
    ckpt = run / "checkpoint.safetensors"
    interrupted = 0
    for i in range(KILLS):
        resume = ckpt.exists()
        argv = finetune_args(run) + (["--resume"] if resume else [])
        interrupted += _run_and_kill(argv, ckpt, writes=rng.randint(0 if resume else 1, 2),
                                     extra_s=rng.uniform(0.0, epoch_s), deadline=deadline)
        if ckpt.exists():
            load_checkpoint(ckpt)  # never a truncated file
            json.loads((run / "history.json").read_text())
            if i == 0:  # what a kill in the middle of a write leaves (rarely hit here): the next --resume removes it
                for name in ("checkpoint.safetensors", "history.json", "run.json"):
                    (run / f".{name}.k1ll3d00.tmp").write_bytes(b"half a file")
    assert interrupted >= 2, "the runs ended before they could be killed"
    assert main(finetune_args(run) + ["--resume"]) == 0
    a, b = load_checkpoint(reference / "checkpoint.safetensors"), load_checkpoint(ckpt)
    assert a.epoch == b.epoch == 10
    assert a.model_state.keys() == b.model_state.keys()
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
    assert a.ema_state is not None and a.ema_state.keys() == b.ema_state.keys()
    for key in a.ema_state:
        assert torch.equal(a.ema_state[key], b.ema_state[key]), key
    for pid, slots in a.optimizer_state["state"].items():
        for key, value in slots.items():
            other = b.optimizer_state["state"][pid][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (pid, key)
    assert _history(run) == _history(reference)
    assert json.loads((run / "run.json").read_text())["epochs_done"] == 10
    log = (run / "logs" / "log.csv").read_text()
    assert log == (reference / "logs" / "log.csv").read_text()
    assert [int(line.split(",")[0]) for line in log.splitlines()[1:]] == list(range(1, 10 * 3 + 1))
    if tensorboard_available():  # each resumed run's event file purges the steps its predecessor logged after
        assert _tensorboard_losses(run / "logs") == _tensorboard_losses(reference / "logs")
    assert _temps(run) == []

    # ---------------------------------------------------------------- eval
    def eval_args(out: Path) -> list[str]:
        return ["eval", "--model", str(reference), "--data", "digits", "--spectrum", str(spectrum), "--out", str(out),
                "--points", "32", "--limit", "64", "--images-per-step", "4", "--checkpoint-every", "0",
                "--dequantize", "--soft-round", "--quiet", "--device", "cpu"]

    expected = tmp_path / "reference.json"
    step_began = time.monotonic()
    assert main(eval_args(expected)) == 0
    step_s = (time.monotonic() - step_began) / 16  # 64 images in steps of 4
    assert _temps(tmp_path) == []

    out = tmp_path / "killed.json"
    partial = tmp_path / "killed.partial"
    interrupted, saved = 0, []
    for i in range(KILLS):
        if out.exists():  # a kill after the results were written: the run is complete
            break
        # the first rerun is the same command (it continues by default), later ones say --resume
        argv = eval_args(out) + (["--resume"] if i >= 2 and partial.exists() else [])
        interrupted += _run_and_kill(argv, partial, writes=rng.randint(1, 3), extra_s=rng.uniform(0.0, 1.5 * step_s),
                                     deadline=deadline)
        if partial.exists():
            saved.append(_rows_saved(partial))  # never a truncated chunk
        if i == 0 and partial.exists():  # as above: the next run removes what a kill in the middle of a write leaves
            for name in ("killed.npz", "killed.json"):
                (tmp_path / f".{name}.k1ll3d00.tmp").write_bytes(b"half a file")
            (partial / ".rows-0000000000-0000000004.npz.k1ll3d00.tmp").write_bytes(b"half a file")
    assert interrupted >= 2, "the evaluations ended before they could be killed"
    assert any(0 < rows < 64 for rows in saved), saved  # a kill in mid-run (one right after the meta file saves 0)
    capsys.readouterr()
    if not out.exists():
        assert main(eval_args(out) + (["--resume"] if partial.exists() else [])) == 0
    a, b = Results.load(expected), Results.load(out)
    assert a.summary() == b.summary()
    for key in a.curves:
        assert np.array_equal(a.curves[key], b.curves[key]), key
    for name in a.terms:
        for field in ("nll_nats", "nll_gauss_min", "integrand", "gauss"):
            assert np.array_equal(getattr(a.terms[name], field), getattr(b.terms[name], field)), (name, field)
    assert not partial.exists() and _temps(tmp_path) == []
    assert time.monotonic() - began < BUDGET_S
