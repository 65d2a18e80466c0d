"""The test-time protocol: every estimator over a whole data set, at shared log-SNR points."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from . import fileio as _io
from .core.grid import DiscreteGrid
from .core.errors import ErrorOptions, Errors
from .core.pipeline import Pass
from .model import ITDiffusion
from .results import Results, Term
PROGRESS_FORMAT = "itdiffusion.eval-progress"
PROGRESS_VERSION = 1


@dataclass
class EvalConfig:
    """Settings of one evaluation (all of them end up in ``Results.config``)."""

    n_points: int = 1000
    discrete: DiscreteGrid | None = None
    soft: bool = False
    dequantize: bool = False
    clamp: tuple[float, float] | None = None
    placement: str = "midpoint"
    antithetic: bool | None = None
    seed: int = 0
    clip: float | None = None
    per_sample_curves: bool = False

    def validate(self) -> None:
        if int(self.n_points) != self.n_points or self.n_points < 1:
            raise ValueError(f"n_points must be a positive integer, got {self.n_points!r}")
        if self.placement not in ("midpoint", "stratified"):
            raise ValueError("evaluation shares its points across examples: placement must be 'midpoint' or "
                             f"'stratified', got {self.placement!r}")
        if self.dequantize and self.discrete is None:
            raise ValueError("dequantize=True needs the data grid (discrete=DiscreteGrid(...))")
        if self.soft and self.discrete is None:
            raise ValueError("soft rounding needs the data grid (discrete=DiscreteGrid(...))")


@dataclass
class _Accumulator:
    """Per-example pieces gathered batch by batch (numpy, float64)."""

    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, key: str, value: torch.Tensor) -> None:
        self.parts.setdefault(key, []).append(value.detach().double().cpu().numpy())

    def get(self, key: str) -> np.ndarray:
        return np.concatenate(self.parts[key])

    def __contains__(self, key: str) -> bool:
        return key in self.parts

    def mark(self) -> dict[str, int]:
        """How many pieces each key holds (to undo an interrupted batch with :meth:`rollback`)."""
        return {key: len(value) for key, value in self.parts.items()}

    def rollback(self, mark: dict[str, int]) -> None:
        for key in list(self.parts):
            if key not in mark:
                del self.parts[key]
            else:
                del self.parts[key][mark[key]:]


def _as_tensor(batch) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, dict):
        raise ValueError("batches must be tensors of shape (B, *shape) or (x, label) pairs")
    return torch.as_tensor(batch)


class Evaluator:
    """Runs :func:`evaluate` one batch at a time (so callers can checkpoint between batches).

    Example indices count from ``index_offset``; an example's noise depends only on the
    seed and its index, so any split into batches or processes gives the same numbers.
    The per-example pieces can be saved and restored (:meth:`save_progress`,
    :meth:`load_progress`, :meth:`state_arrays`), so a long evaluation can be resumed,
    and shards evaluated by several processes can be joined into one result.
    """

    def __init__(self, model: ITDiffusion, config: EvalConfig, *, batch_size: int | None = None, index_offset: int = 0):
        config.validate()
        self.model, self.config, self.batch_size = model, config, batch_size
        self.index_offset = int(index_offset)
        self.clip = model.clip if config.clip is None else float(config.clip)
        self.estimator = model.estimator(
            config.n_points, discrete=config.discrete, rounding="soft" if config.soft else "hard",
            placement=config.placement, clip=self.clip, antithetic=config.antithetic, batch_size=batch_size)
        self.layout = self.estimator.sampling.layout
        self.quadrature = self.estimator.shared_quadrature(config.seed)
        self.logsnr, self.weights = self.quadrature.logsnr, self.quadrature.weights
        self.next_index = int(index_offset)
        self.acc = _Accumulator()

    @property
    def n_done(self) -> int:
        return sum(len(p) for p in self.acc.parts.get("continuous/offset", []))

    def add_batch(self, x: torch.Tensor) -> None:
        """Evaluate a batch ``(B, *shape)`` on the model's device and keep its per-example terms.

        All or nothing: if it fails or is interrupted, nothing of the batch is kept.
        """
        mark, next_index = self.acc.mark(), self.next_index
        try:
            self._add_batch(x)
        except BaseException:
            self.acc.rollback(mark)
            self.next_index = next_index
            raise

    @torch.no_grad()
    def _add_batch(self, x: torch.Tensor) -> None:
        cfg, model = self.config, self.model
        model.check_data(x, cfg.discrete)
        measured = self.estimator.measure(model, model.spectrum, x, seed=cfg.seed, first_index=self.next_index,
                                          shared=self.quadrature, passes=self._passes())
        self.next_index += len(x)
        for name, errs in measured.errors.items():
            self._add_curves(name, errs)
            inputs = measured.inputs[name]
            self._add_term("continuous" if name == "data" else name,
                           self.estimator.integrand(model.spectrum, inputs, errs, measured.quadrature, discrete=False))
            if name == "data" and cfg.discrete is not None:
                self._add_term("discrete", self.estimator.integrand(model.spectrum, inputs, errs, measured.quadrature))

    def _passes(self) -> tuple[Pass, ...]:
        """The data (with both roundings for discrete data) and, if asked, the dequantized data."""
        cfg, est = self.config, self.estimator
        if cfg.discrete is None:
            return (Pass("data", False, ErrorOptions(None, (), cfg.clamp, self.batch_size)),)
        passes = [Pass("data", False, ErrorOptions(cfg.discrete, ("hard", "soft"), _range(cfg.discrete),
                                                    self.batch_size))]
        if cfg.dequantize:
            passes.append(Pass("dequantized", True, ErrorOptions(None, (), _range(cfg.discrete, widen=True),
                                                                 self.batch_size)))
        return tuple(passes)

    def _add_curves(self, name: str, errs: Errors) -> None:
        suffix = "" if name == "data" else "_" + name
        self.acc.add(f"curve/mmse{suffix}", errs.raw)
        self.acc.add(f"curve/mmse_gauss{suffix}", errs.gauss)
        for key in ("hard", "soft"):
            if getattr(errs, key) is not None:
                self.acc.add(f"curve/mmse_{key}{suffix}", getattr(errs, key))

    def _add_term(self, name: str, terms) -> None:
        self.acc.add(f"{name}/offset", terms.offset)
        self.acc.add(f"{name}/integrand", terms.values)
        self.acc.add(f"{name}/gauss", terms.gauss)
        self.acc.add(f"{name}/nll", terms.integrate(self.quadrature))

    # ----------------------------------------------------------------- state
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every per-example piece evaluated so far, one ``(n_done, ...)`` float64 array per key."""
        return {key: self.acc.get(key) for key in sorted(self.acc.parts)}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the evaluated pieces by ``arrays`` (from :meth:`state_arrays`, possibly of
        several shards concatenated in index order)."""
        sizes = {len(v) for v in arrays.values()}
        if len(sizes) > 1:
            raise ValueError(f"per-example arrays disagree in length: {sorted(sizes)}")
        self.acc = _Accumulator({key: [np.asarray(value, dtype=np.float64)] for key, value in arrays.items()})
        self.next_index = self.index_offset + (sizes.pop() if sizes else 0)

    def identity(self, meta: dict | None = None) -> dict:
        """What a saved state must match to be resumed: the configuration, the first index, ``meta``."""
        ident = {"config": self._config_dict(), "index_offset": self.index_offset, "meta": meta or {}}
        return json.loads(json.dumps(_io._json_safe(ident)))

    def save_progress(self, path, meta: dict | None = None) -> None:
        """Write the per-example pieces and :meth:`identity` to ``path`` (``.npz``, no pickle, atomic)."""
        header = {"format": PROGRESS_FORMAT, "version": PROGRESS_VERSION, "n_done": self.n_done,
                  "identity": self.identity(meta)}
        arrays = {f"part/{key}": value for key, value in self.state_arrays().items()}
        arrays["meta"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        _io.save_npz_atomic(path, arrays)

    def load_progress(self, path, meta: dict | None = None) -> int:
        """Restore a state written by :meth:`save_progress`; returns the examples already done.

        Raises ``ValueError`` if it was written for other settings, data or model.
        """
        arrays = _io.load_npz(path)
        header = _io.read_meta(arrays, path, PROGRESS_FORMAT, PROGRESS_VERSION)
        saved, now = header.get("identity", {}), self.identity(meta)
        changed = sorted(_differences(saved, now))
        if changed:
            raise ValueError(f"{path}: partial evaluation with other settings ({', '.join(changed[:4])} differ); "
                             "delete it to start over")
        parts = {key[len("part/"):]: value for key, value in arrays.items() if key.startswith("part/")}
        self.load_state_arrays(parts)
        if self.n_done != int(header.get("n_done", -1)):
            raise ValueError(f"{path}: corrupt partial evaluation (example count does not match)")
        return self.n_done

    def run(
        self,
        batches: Iterable,
        *,
        callback: Callable[[int], None] | None = None,
        checkpoint=None,
        checkpoint_every: float = 300.0,
        checkpoint_meta: dict | None = None,
    ) -> None:
        """Evaluate ``batches`` (tensors ``(B, *shape)`` or ``(x, label)`` pairs), in order.

        ``batches`` start at example ``index_offset``; the examples this evaluator already
        holds (from :meth:`load_progress`) are skipped.  With ``checkpoint`` (a path): if
        it exists and nothing is held yet, resume from it (it must match, see
        :meth:`load_progress`); save progress there at
        least every ``checkpoint_every`` seconds (0: after every batch), on
        ``KeyboardInterrupt`` and at the end.  Because every example's noise depends only
        on the seed and its index, a resumed run gives the same numbers.
        """
        device = next((b.device for b in self.model.buffers()), torch.device("cpu"))
        if checkpoint is not None and self.n_done == 0 and Path(checkpoint).exists():
            self.load_progress(checkpoint, checkpoint_meta)
        done, last_save, seen = self.n_done, time.monotonic(), 0
        try:
            for batch in batches:
                x = _as_tensor(batch)
                skip = min(max(done - seen, 0), len(x))
                seen += len(x)
                if skip == len(x):
                    continue
                self.add_batch(x[skip:].to(device))
                if callback is not None:
                    callback(self.n_done)
                if checkpoint is not None and time.monotonic() - last_save >= checkpoint_every:
                    self.save_progress(checkpoint, checkpoint_meta)
                    last_save = time.monotonic()
        except KeyboardInterrupt:
            if checkpoint is not None and self.n_done:
                self.save_progress(checkpoint, checkpoint_meta)
            raise
        if checkpoint is not None:
            self.save_progress(checkpoint, checkpoint_meta)

    def results(self) -> Results:
        """Combine everything evaluated so far into :class:`Results`."""
        if self.n_done == 0:
            raise ValueError("no examples were evaluated (empty data)")
        weights = self.weights.double().cpu().numpy()
        names = sorted({key.split("/")[0] for key in self.acc.parts if not key.startswith("curve/")},
                       key=["continuous", "discrete", "dequantized"].index)
        terms = {name: self._term(name, weights) for name in names}
        curves = {k.split("/", 1)[1]: self.acc.get(k).mean(0) for k in self.acc.parts if k.startswith("curve/")}
        curves["mmse_gauss_analytic"] = self.model.spectrum.mmse(self.logsnr.double()).cpu().numpy()
        return Results(
            logsnr=self.logsnr.double().cpu().numpy(), weights=weights, shape=self.model.shape,
            n_examples=self.n_done, config=self._config_dict(), curves=curves, terms=terms,
        )

    def _term(self, name: str, weights: np.ndarray) -> Term:
        integrand, gauss = self.acc.get(f"{name}/integrand"), self.acc.get(f"{name}/gauss")
        offset = self.acc.get(f"{name}/offset")
        use_model = integrand.mean(0) <= gauss.mean(0)
        chosen = np.where(use_model, integrand, gauss)
        keep = self.config.per_sample_curves
        return Term(
            offset=offset, integrand_mean=integrand.mean(0), gauss_mean=gauss.mean(0),
            nll_nats=self.acc.get(f"{name}/nll"), nll_gauss_min=offset + 0.5 * (chosen * weights).sum(-1),
            integrand=integrand.astype(np.float32) if keep else None,
            gauss=gauss.astype(np.float32) if keep else None,
        )

    def _config_dict(self) -> dict:
        cfg, model = self.config, self.model
        grid = cfg.discrete
        lo, hi = model.logsnr_range(self.clip)
        return {
            "n_points": self.layout.n_calls, "n_strata": self.layout.n_strata, "antithetic": self.layout.antithetic,
            "placement": cfg.placement, "seed": cfg.seed, "loc": model.loc, "scale": model.scale, "clip": self.clip,
            "logsnr_range": [lo, hi], "soft": cfg.soft, "dequantize": cfg.dequantize,
            "clamp": list(cfg.clamp) if cfg.clamp else None,
            "grid": None if grid is None else {"lo": grid.lo, "hi": grid.hi, "levels": grid.levels, "delta": grid.delta},
            "calls_per_example": self.layout.n_calls * (2 if cfg.dequantize else 1),
            "gaussian_entropy_nats": model.spectrum.entropy(),
        }


def _differences(saved, now, prefix: str = "") -> list[str]:
    """Dotted names of the entries where two JSON-like values differ."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now)):
            out += _differences(saved.get(key), now.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == now else [prefix.rstrip(".") or "value"]


def _range(grid: DiscreteGrid, widen: bool = False) -> tuple[float, float]:
    pad = 0.5 * grid.delta if widen else 0.0
    return grid.lo - pad, grid.hi + pad


def evaluate(
    model: ITDiffusion,
    batches: Iterable,
    n_points: int = 1000,
    *,
    discrete: DiscreteGrid | None = None,
    soft: bool = False,
    dequantize: bool = False,
    clamp: tuple[float, float] | None = None,
    placement: str = "midpoint",
    antithetic: bool | None = None,
    seed: int = 0,
    clip: float | None = None,
    per_sample_curves: bool = False,
    batch_size: int | None = None,
    index_offset: int = 0,
    callback: Callable[[int], None] | None = None,
    checkpoint=None,
    checkpoint_every: float = 300.0,
    checkpoint_meta: dict | None = None,
) -> Results:
    """Every estimator of the paper's test protocol over a data set.

    All examples share ``ceil(n_points / 4)`` log-SNR points, each visited by a group of
    four antithetic noise draws (or ``n_points`` points with ``antithetic=False``, the
    default for discrete data: see :func:`itdiffusion.model.default_antithetic`), placed
    by the midpoint rule of the model's proposal (``placement="midpoint"``) or by one stratified
    draw from ``seed``.

    Args:
        model: the :class:`ITDiffusion` to evaluate (its device is used).
        batches: iterable of ``(B, *shape)`` tensors (or ``(x, label)`` pairs).
        n_points: network calls per example for each pass.
        discrete: the data grid; adds the discrete bound (hard- or ``soft``-rounded ``x_hat``
            from the same call) and clamps ``x_hat`` to the grid's range.
        dequantize: also estimate ``-log p(x + u)`` with uniform ``u`` of one grid step
            (a second network call per point) and its discrete limit.
        clamp: interval to clamp ``x_hat`` into for continuous data.
        per_sample_curves: keep ``(N, m)`` per-example integrands in the results (needed for
            standard errors of ensembles).
        batch_size: (example, point) pairs per network call.
        index_offset: index of the first example (for sharding across processes).
        callback: called with the number of examples done after every batch.
        checkpoint: path of an ``.npz`` file holding partial progress: resumed from when it
            exists (settings, data order and ``checkpoint_meta`` must match), written at
            least every ``checkpoint_every`` seconds, on ``KeyboardInterrupt`` and at the
            end (it is left in place; a second call with it returns at once).  A resumed
            run gives the same numbers as an uninterrupted one.  See :meth:`Evaluator.run`.
        checkpoint_meta: JSON-able facts the checkpoint must agree with (e.g. a model hash).

    Returns:
        :class:`Results`.
    """
    config = EvalConfig(n_points=n_points, discrete=discrete, soft=soft, dequantize=dequantize, clamp=clamp,
                        placement=placement, antithetic=antithetic, seed=seed, clip=clip, per_sample_curves=per_sample_curves)
    evaluator = Evaluator(model, config, batch_size=batch_size, index_offset=index_offset)
    evaluator.run(batches, callback=callback, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                  checkpoint_meta=checkpoint_meta)
    return evaluator.results()
