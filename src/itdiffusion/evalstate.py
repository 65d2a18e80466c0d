"""Streamed evaluation state: per-example results kept as append-only chunks of rows, on disk.

An evaluation produces, for every example, a few numbers per estimate (its closed-form
offset and its estimate, float64) and, per log-SNR point, its integrand (float32: the curves
are stored, not accumulated from); per batch it also keeps float64 sums over its examples of
every curve, so data-set means keep float64 precision.  A :class:`Chunk` holds one batch's
rows ``[first, stop)``; a :class:`ProgressStore` is a folder of chunk files
``rows-FIRST-STOP.npz`` (each written atomically, never rewritten) and an ``identity.json``
saying what evaluation they belong to.  Saving costs time in proportion to the rows added
since the last save; any set of processes may add rows (the rows of an example depend only on
the seed and its index), so a run can be resumed on another number of processes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import fileio as _io

FORMAT = "itdiffusion.eval-progress"
VERSION = 2
_CHUNK_RE = re.compile(r"^rows-(\d{10})-(\d{10})\.npz$")


@dataclass
class Chunk:
    """Rows ``[first, stop)`` of an evaluation: ``arrays`` keyed ``TERM/offset``, ``TERM/nll``
    ``(k,)`` float64, ``TERM/integrand``, ``TERM/gauss`` ``(k, m)`` float32, and batch sums
    ``sum/...`` ``(m,)`` float64 (see :mod:`itdiffusion.evaluation`)."""

    first: int
    stop: int
    arrays: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return f"rows-{self.first:010d}-{self.stop:010d}.npz"

    def rows(self, first: int, stop: int) -> "Chunk":
        """The part of this chunk within ``[first, stop)`` (batch sums are kept only when whole)."""
        lo, hi = max(first, self.first), min(stop, self.stop)
        if (lo, hi) == (self.first, self.stop):
            return self
        a, b = lo - self.first, hi - self.first
        arrays = {k: v[a:b] for k, v in self.arrays.items() if not k.startswith("sum/")}
        return Chunk(lo, hi, arrays)


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """Sorted, merged ``[first, stop)`` ranges."""
    out: list[list[int]] = []
    for first, stop in sorted(ranges):
        if out and first <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([first, stop])
    return [tuple(r) for r in out]


def missing(first: int, stop: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``[first, stop)`` not in the merged ranges ``covered``."""
    gaps, at = [], first
    for lo, hi in covered:
        if hi <= at or lo >= stop:
            continue
        if lo > at:
            gaps.append((at, lo))
        at = max(at, hi)
    if at < stop:
        gaps.append((at, stop))
    return gaps


class ProgressStore:
    """A folder of chunk files for one evaluation (see module docstring)."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def exists(self) -> bool:
        return (self.folder / "identity.json").is_file()

    def create(self, identity: dict) -> None:
        """Start the folder with ``identity`` (it must not hold another evaluation)."""
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"{self.folder}: exists and is not a folder of partial progress")
        self.folder.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "version": VERSION, "identity": identity}
        _io.save_json_atomic(self.folder / "identity.json", header)

    def identity(self) -> dict:
        header = _io.load_json(self.folder / "identity.json")
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError(f"{self.folder}: not partial progress of this version of itdiffusion "
                             f"(format {header.get('format')!r}, version {header.get('version')!r})")
        return header.get("identity", {})

    def ranges(self) -> list[tuple[int, int]]:
        """``[first, stop)`` of every chunk file, sorted; ``ValueError`` if two overlap."""
        found = []
        for path in self.folder.iterdir():
            match = _CHUNK_RE.match(path.name)
            if match:
                found.append((int(match.group(1)), int(match.group(2))))
        found.sort()
        for (a0, a1), (b0, b1) in zip(found, found[1:]):
            if b0 < a1:
                raise ValueError(f"{self.folder}: chunks rows {a0}-{a1} and {b0}-{b1} overlap "
                                 "(two evaluations wrote the same folder?)")
        return found

    def check(self) -> list[tuple[int, int]]:
        """:meth:`ranges`, after reading every chunk file once (a damaged one is refused now, not
        after the rest of the evaluation)."""
        ranges = self.ranges()
        for first, stop in ranges:
            self.read(first, stop)
        return ranges

    def remove_stale_temps(self) -> int:
        """Delete what a process killed while writing left behind (only when no other is writing)."""
        if not self.folder.is_dir():
            return 0
        stale = [p for p in self.folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def write(self, chunk: Chunk) -> None:
        _io.save_npz_atomic(self.folder / chunk.name, chunk.arrays)

    def read(self, first: int, stop: int) -> Chunk:
        """The chunk file of rows ``[first, stop)``, checked for consistent row counts."""
        path = self.folder / Chunk(first, stop, {}).name
        arrays = _io.load_npz(path)
        for key, value in arrays.items():
            if value.dtype.kind not in "fiu":
                raise ValueError(f"{path}: array {key!r} has dtype {value.dtype}; expected real numbers")
            if not key.startswith("sum/") and len(value) != stop - first:
                raise ValueError(f"{path}: truncated or corrupt (array {key!r} has {len(value)} rows, "
                                 f"expected {stop - first})")
        return Chunk(first, stop, arrays)

    def remove(self) -> None:
        """Delete the folder's files (after the results are written)."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if path.name == "identity.json" or _CHUNK_RE.match(path.name) or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass


def identity_differences(saved, now, prefix: str = "") -> list[str]:
    """Dotted names of the entries where two JSON-like values differ."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now)):
            out += identity_differences(saved.get(key), now.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == now else [prefix.rstrip(".") or "value"]


def json_identity(value) -> dict:
    """``value`` as it reads back from JSON (tuples become lists, NaN becomes null)."""
    return json.loads(json.dumps(_io._json_safe(value)))
