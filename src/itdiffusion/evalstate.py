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
from .results import Term

FORMAT = "itdiffusion.eval-progress"
VERSION = 2
TERMS = ("continuous", "discrete", "discrete_published_min", "dequantized")
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


# ============================================================================ rows to estimates
@dataclass(frozen=True)
class CurveLayout:
    """How a chunk's stored arrays give the per-example error curves.

    Stored are each term's integrand and each pass's Gaussian error (``PASS/gauss``), and the
    rounding the discrete term does not use.  The model's raw error is the continuous
    integrand plus the Gaussian's error on the same noise (this package's estimators) or plus
    the Gaussian's mmse curve ``mmse_g`` ``(m,)`` (the published estimators).  ``below``
    ``(m,)``: the points below the discrete split (where the discrete integrand subtracts the
    Gaussian's error).
    """

    below: np.ndarray
    rounding: str = "hard"
    mmse_g: np.ndarray | None = None

    def rows(self, arrays: dict) -> dict[str, np.ndarray]:
        """Per-example curves (float64) of one chunk: ``mmse*`` curves, ``TERM_integrand`` and
        ``TERM_alt`` (the curve a term's "min with ..." estimate may take instead; zero if absent)."""
        f64 = lambda key: arrays[key].astype(np.float64)  # noqa: E731
        gauss, ours = f64("data/gauss"), self.mmse_g is None
        out = {"mmse": f64("continuous/integrand") + (gauss if ours else self.mmse_g), "mmse_gauss": gauss}
        if "discrete/integrand" in arrays:
            out[f"mmse_{self.rounding}"] = f64("discrete/integrand") + (self.below * gauss if ours else 0.0)
            for other in ("hard", "soft"):
                if other != self.rounding and f"data/{other}" in arrays:
                    out[f"mmse_{other}"] = f64(f"data/{other}")
            if ours:
                out["discrete_alt"] = (~self.below) * gauss
        if "discrete_published_min/integrand" in arrays:
            out["discrete_published_min_alt"] = f64("discrete/integrand")
        if "dequantized/integrand" in arrays:
            deq_gauss = f64("dequantized/gauss")
            out["mmse_gauss_dequantized"] = deq_gauss
            out["mmse_dequantized"] = f64("dequantized/integrand") + (deq_gauss if ours else self.mmse_g)
        for term in TERMS:
            if f"{term}/integrand" in arrays:
                out[f"{term}_integrand"] = f64(f"{term}/integrand")
        return out


def chunk_means(chunks, layout: CurveLayout) -> dict[str, np.ndarray]:
    """Means over all rows of every per-example curve, summed row by row in index order (so
    they do not depend on how the rows were split into chunks)."""
    sums, n = {}, 0
    for chunk in chunks:
        for key, rows in layout.rows(chunk.arrays).items():
            start = sums.get(key, np.zeros(rows.shape[1]))
            sums[key] = np.cumsum(np.vstack([start[None], rows]), axis=0)[-1]
        n += chunk.stop - chunk.first
    return {key: value / n for key, value in sums.items()}


def assemble_terms(chunks, layout: CurveLayout, means: dict, weights: np.ndarray, keep: bool) -> dict[str, Term]:
    """Per-example arrays of every term, with its "min with ..." estimate.

    That estimate takes, at every point where the data-set mean integrand exceeds the mean of
    the term's alternative curve (the Gaussian's, or for ``discrete_published_min`` the
    rounded curve), the alternative: ``nll + 1/2 sum_{i switched} w_i (alt_i - integrand_i)``.
    """
    names = [t for t in TERMS if f"{t}_integrand" in means]
    alt_mean = {t: means.get(f"{t}_alt", np.zeros_like(weights)) for t in names}
    skip_w = {t: np.where(means[f"{t}_integrand"] <= alt_mean[t], 0.0, weights) for t in names}
    parts = {t: {"offset": [], "nll": [], "gmin": [], "integrand": [], "gauss": []} for t in names}
    for chunk in chunks:
        a, rows = chunk.arrays, layout.rows(chunk.arrays)
        for t in names:
            integrand = rows[f"{t}_integrand"]
            alt = rows.get(f"{t}_alt", np.zeros_like(integrand))
            p = parts[t]
            p["offset"].append(a[f"{t}/offset"])
            p["nll"].append(a[f"{t}/nll"])
            p["gmin"].append(a[f"{t}/nll"] + 0.5 * ((alt - integrand) * skip_w[t]).sum(-1))
            if keep:
                p["integrand"].append(a[f"{t}/integrand"])
                p["gauss"].append(alt.astype(np.float32))
    cat = lambda v: np.concatenate(v) if v else None  # noqa: E731
    return {t: Term(offset=cat(p["offset"]), integrand_mean=means[f"{t}_integrand"], gauss_mean=alt_mean[t],
                    nll_nats=cat(p["nll"]), nll_gauss_min=cat(p["gmin"]), integrand=cat(p["integrand"]),
                    gauss=cat(p["gauss"])) for t, p in parts.items()}
