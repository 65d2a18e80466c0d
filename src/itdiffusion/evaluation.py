"""The test-time protocol: every estimator over a whole data set, at shared log-SNR points."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from .core.errors import ErrorOptions, Errors
from .core.grid import DiscreteGrid
from .core.pipeline import Pass
from .core.proposal import check_n_points
from .evalstate import (Chunk, CurveLayout, ProgressStore, assemble_terms, chunk_means, identity_differences,
                        json_identity, merge_ranges, missing)
from .model import ITDiffusion
from .protocols import PaperProtocol, standard_errors
from .results import Results
from .tuning import MIN_PILOT_CALLS

PROTOCOLS = ("ours", "paper")  # this package's estimators, or the published code's (see itdiffusion.protocols)



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
    protocol: str = "ours"
    soft_variance: str = "gaussian"  # "channel": the published soft-rounding kernel, variance sigmoid(-a)
    clamp_dequantized: bool = True  # project the dequantized pass's x_hat onto [lo - delta/2, hi + delta/2]

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {PROTOCOLS}")
        check_n_points(self.n_points)
        if self.placement not in ("midpoint", "stratified"):
            raise ValueError("evaluation shares its points across examples: placement must be 'midpoint' or "
                             f"'stratified', got {self.placement!r}")
        if self.dequantize and self.discrete is None:
            raise ValueError("dequantize=True needs the data grid (discrete=DiscreteGrid(...))")
        if self.soft_variance not in ("gaussian", "channel"):
            raise ValueError(f"soft_variance must be 'gaussian' or 'channel', got {self.soft_variance!r}")
        if self.soft and self.discrete is None:
            raise ValueError("soft rounding needs the data grid (discrete=DiscreteGrid(...))")


def _as_tensor(batch) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, dict):
        raise ValueError("batches must be tensors of shape (B, *shape) or (x, label) pairs")
    return torch.as_tensor(batch)


def _np(value: torch.Tensor, dtype=np.float64) -> np.ndarray:
    return value.detach().cpu().numpy().astype(dtype, copy=False)


class Evaluator:
    """Runs :func:`evaluate` one batch at a time, keeping each batch's rows as a :class:`Chunk`.

    An example's noise depends only on the seed and its index, so any split into batches or
    processes gives the same numbers.  With a progress folder (:meth:`attach`), chunks are
    written there as they are saved (append-only, see :mod:`itdiffusion.evalstate`) and
    dropped from memory; several evaluators (processes) may share one folder, each adding the
    rows it evaluates, and any of them can then assemble the :meth:`results`.
    """

    def __init__(self, model: ITDiffusion, config: EvalConfig, *, batch_size: int | None = None, index_offset: int = 0):
        config.validate()
        self.model, self.config, self.batch_size = model, config, batch_size
        self.index_offset = self.next_index = int(index_offset)
        self.paper = PaperProtocol(model, config, batch_size) if config.protocol == "paper" else None
        if self.paper is not None:
            self.clip, self.estimator, self.quadrature = self.paper.clip, self.paper.estimator, self.paper.quadrature
        else:
            self.clip = model.clip if config.clip is None else float(config.clip)
            self.estimator = model.estimator(
                config.n_points, discrete=config.discrete, rounding="soft" if config.soft else None,
                placement=config.placement, clip=self.clip, antithetic=config.antithetic, batch_size=batch_size)
            self.quadrature = self.estimator.shared_quadrature(config.seed)
        self.layout = self.estimator.sampling.layout
        self.logsnr, self.weights = self.quadrature.logsnr, self.quadrature.weights
        self.store: ProgressStore | None = None
        self.pilot_report: dict | None = None  # what a tuning pilot before this evaluation spent
        self._held: list[Chunk] = []  # evaluated rows not (yet) in the store
        self._stored: list[tuple[int, int]] = []  # rows in the store

    # ----------------------------------------------------------------- rows
    @property
    def covered(self) -> list[tuple[int, int]]:
        """Merged ``[first, stop)`` ranges of the rows evaluated so far (held or stored)."""
        return merge_ranges([(c.first, c.stop) for c in self._held] + self._stored)

    def done_in(self, first: int, stop: int) -> int:
        """How many rows of ``[first, stop)`` are evaluated."""
        return (stop - first) - sum(b - a for a, b in missing(first, stop, self.covered))

    @property
    def n_done(self) -> int:
        """Rows evaluated from ``index_offset`` on."""
        return self.done_in(self.index_offset, max([self.index_offset] + [b for _, b in self.covered]))

    def add_batch(self, x: torch.Tensor, first: int | None = None) -> None:
        """Evaluate rows ``first, first + 1, ...`` (default: after the last added) of ``x`` ``(B, *shape)``
        on the model's device.  All or nothing: if it fails, nothing of the batch is kept."""
        first = self.next_index if first is None else int(first)
        if missing(first, first + len(x), self.covered) != [(first, first + len(x))]:
            raise ValueError(f"rows {first}-{first + len(x)} are already evaluated")
        self._held.append(self._evaluate(x, first))
        self.next_index = first + len(x)

    @torch.no_grad()
    def _evaluate(self, x: torch.Tensor, first: int) -> Chunk:
        """One batch's rows: per-example offsets and estimates (float64), and the independent
        per-point curves (float32): each term's integrand, the Gaussian's errors, the other rounding."""
        cfg, model, est = self.config, self.model, self.estimator
        model.check_data(x, cfg.discrete)
        measured = est.measure(model, model.spectrum, x, seed=cfg.seed, first_index=first,
                               shared=self.quadrature, passes=self._passes())
        if self.paper is not None:
            return Chunk(first, first + len(x), self.paper.chunk_arrays(measured))
        arrays, quad, spec = {}, measured.quadrature, model.spectrum
        for name, errs in measured.errors.items():
            inputs, term = measured.inputs[name], ("continuous" if name == "data" else name)
            arrays[f"{name}/gauss"] = _np(errs.gauss, np.float32)
            reference = self._dequantized_reference() if name == "dequantized" else spec
            _add_term(arrays, term, est.integrand(reference, inputs, errs, quad, discrete=False), quad)
            if name == "data" and cfg.discrete is not None:
                _add_term(arrays, "discrete", est.integrand(spec, inputs, errs, quad), quad)
                for other in _other_roundings(est.rounding):
                    arrays[f"data/{other}"] = _np(errs.rounded(other), np.float32)
        return Chunk(first, first + len(x), arrays)

    def evaluate_rows(self, x: torch.Tensor, first: int) -> Chunk:
        """Rows ``first, first + 1, ...`` of ``x`` evaluated, without keeping them (see :mod:`itdiffusion.metrics`)."""
        return self._evaluate(x, first)

    def _passes(self) -> tuple[Pass, ...]:
        """The data (with both roundings for discrete data) and, if asked, the dequantized data."""
        cfg = self.config
        if self.paper is not None:
            return self.paper.passes()
        if cfg.discrete is None:
            return (Pass("data", False, ErrorOptions(None, (), cfg.clamp, self.batch_size)),)
        passes = [Pass("data", False, ErrorOptions(cfg.discrete, ("hard", "soft"), _range(cfg.discrete),
                                                    self.batch_size, soft_variance=cfg.soft_variance))]
        if cfg.dequantize:
            clamp = _range(cfg.discrete, widen=True) if cfg.clamp_dequantized else None
            passes.append(Pass("dequantized", True, ErrorOptions(None, (), clamp, self.batch_size),
                               self._dequantized_reference()))
        return tuple(passes)

    def _dequantized_reference(self):
        """The Gaussian reference of the dequantized data: every variance at least ``delta^2 / 12``
        (the variance the uniform offsets add), so pixels that never vary do not make it degenerate."""
        return self.model.spectrum.with_min_variance(self.config.discrete.delta ** 2 / 12)

    # ----------------------------------------------------------------- progress
    def identity(self, meta: dict | None = None) -> dict:
        """What a progress folder must match to be continued: the configuration and ``meta``
        (not the first index nor the number of processes: any process may add any rows)."""
        return json_identity({"config": self._config_dict(), "meta": meta or {}})

    def attach(self, folder, meta: dict | None = None) -> int:
        """Use the progress folder ``folder`` (created if new): its rows count as evaluated, and
        :meth:`save_progress` adds chunks to it.  Returns the rows done from ``index_offset`` on.
        ``ValueError`` if it holds another evaluation (other settings, data or model)."""
        store, now = ProgressStore(folder), self.identity(meta)
        if store.exists():
            store.check()  # a damaged folder is refused before anything else
            changed = identity_differences(store.identity(), now)
            if changed:
                raise ValueError(f"{folder}: partial evaluation with other settings ({', '.join(changed[:4])} "
                                 "differ); delete it to start over")
        else:
            store.create(now)
        self.store, self._stored = store, store.ranges()
        return self.n_done

    load_progress = attach

    def save_progress(self) -> None:
        """Write the rows evaluated since the last save to the progress folder (one chunk each)."""
        if self.store is None:
            raise ValueError("no progress folder: call attach(folder) first")
        while self._held:
            chunk = self._held[0]
            self.store.write(chunk)
            self._stored = sorted(self._stored + [(chunk.first, chunk.stop)])
            self._held.pop(0)

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

        ``batches`` start at example ``index_offset``; rows already evaluated (held, or in the
        progress folder) are skipped.  With ``checkpoint`` (a folder, see :meth:`attach`):
        progress is saved there at least every ``checkpoint_every`` seconds (0: after every
        batch), when the run stops on any error or ``KeyboardInterrupt``, and at the end.
        ``callback`` gets the rows done from ``index_offset`` to the end of each batch.
        """
        device = next((b.device for b in self.model.buffers()), torch.device("cpu"))
        if checkpoint is not None and self.store is None:
            self.attach(checkpoint, checkpoint_meta)
        last_save, at = time.monotonic(), self.index_offset
        try:
            for batch in batches:
                x = _as_tensor(batch)
                gaps = missing(at, at + len(x), self.covered)
                for lo, hi in gaps:
                    self.add_batch(x[lo - at : hi - at].to(device), lo)
                at += len(x)
                if gaps and callback is not None:
                    callback(self.done_in(self.index_offset, at))
                if gaps and self.store is not None and time.monotonic() - last_save >= checkpoint_every:
                    self.save_progress()
                    last_save = time.monotonic()
        finally:
            if self.store is not None:
                self.save_progress()

    # ----------------------------------------------------------------- results
    def _chunks(self, first: int, stop: int):
        """Every evaluated chunk within ``[first, stop)``, in index order (stored ones read one at a time)."""
        held = {(c.first, c.stop): c for c in self._held}
        for lo, hi in sorted(set(held) | set(self._stored)):
            if hi > first and lo < stop:
                chunk = held.get((lo, hi)) or self.store.read(lo, hi)
                yield chunk.rows(first, stop)

    def results(self) -> Results:
        """Combine every evaluated row into :class:`Results` (the rows must be contiguous).

        Data-set means are float64 sums of the rows in index order, so they do not depend on
        how the rows were split into batches or processes.
        """
        covered = self.covered
        if not covered:
            raise ValueError("no examples were evaluated (empty data)")
        if len(covered) > 1:
            gaps = missing(covered[0][0], covered[-1][1], covered)
            raise ValueError(f"evaluation incomplete: rows {gaps[0][0]}-{gaps[0][1]} are missing")
        first, stop = covered[0]
        layout = self._curve_layout()
        means = chunk_means(self._chunks(first, stop), layout)
        weights = self.weights.double().cpu().numpy()
        terms = assemble_terms(self._chunks(first, stop), layout, means, weights, self.config.per_sample_curves)
        curves = {k: v for k, v in means.items() if k.startswith("mmse")}
        curves["mmse_gauss_analytic"] = self.model.spectrum.mmse(self.logsnr.double()).cpu().numpy()
        results = Results(
            logsnr=self.logsnr.double().cpu().numpy(), weights=weights, shape=self.model.shape,
            n_examples=stop - first, config=self._config_dict(), curves=curves, terms=terms,
        )
        if self.paper is not None:
            results.config["standard_errors"] = standard_errors(results, self.paper.order, self._chunks(first, stop))
        return results

    def _curve_layout(self) -> CurveLayout:
        below = (self.logsnr < self.estimator.split).cpu().numpy()
        mmse_g = None if self.paper is None else self.paper.mmse_g()
        rounding = self.estimator.rounding if self.paper is None else ("soft" if self.config.soft else "hard")
        return CurveLayout(below=below, rounding=rounding, mmse_g=mmse_g)

    def _tuning_dict(self) -> dict:
        """The fit in use (``tuning``: what a resumed run must match) and the discrete rounding."""
        if self.paper is not None:
            return {}
        fit = self.model.tuning
        used = fit is not None and self.estimator.proposal == self.model.tuned_proposal(fit, self.clip)
        return {"tuning": fit.identity() if used else None, "rounding": self.estimator.rounding}

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
            "gaussian_entropy_nats": model.spectrum.entropy(), "protocol": cfg.protocol,
            "dequantized_reference": None if not cfg.dequantize else "eigenvalues floored at delta^2/12",
            "soft_variance": cfg.soft_variance, "clamp_dequantized": cfg.clamp_dequantized and cfg.dequantize,
            **self._tuning_dict(),
            **({} if self.paper is None else self.paper.config_dict()),
        }


def _other_roundings(rounding: str) -> tuple[str, ...]:
    """The roundings whose curves are stored beside the discrete term's (``"auto"`` uses both)."""
    return {"soft": ("hard",), "hard": ("soft",)}.get(rounding, ("hard", "soft"))


def _add_term(arrays: dict, name: str, terms, quad) -> None:
    """Per-example offset and estimate (float64) and integrand (float32) of one term."""
    arrays[f"{name}/offset"] = _np(terms.offset)
    arrays[f"{name}/nll"] = _np(terms.integrate(quad))
    arrays[f"{name}/integrand"] = _np(terms.values, np.float32)


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
    protocol: str = "ours",
    soft_variance: str = "gaussian",
    clamp_dequantized: bool = True,
    batch_size: int | None = None,
    index_offset: int = 0,
    callback: Callable[[int], None] | None = None,
    checkpoint=None,
    checkpoint_every: float = 300.0,
    checkpoint_meta: dict | None = None,
    tune: bool | None = None,
    pilot: torch.Tensor | None = None,
    pilot_calls: int | None = None,
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
        protocol: ``"ours"`` (this package's estimators) or ``"paper"``: the published code's
            test protocol (its shared iid points from ``seed``, clip 4, its estimators, tails and
            soft-rounding kernel), with an honest standard error beside the published one (see
            :mod:`itdiffusion.protocols`); ``placement`` and ``antithetic`` are then unused.
        soft_variance: the error variance soft rounding assumes for ``x_hat``: ``"gaussian"``
            (the Gaussian denoiser's, ``e^-a mmse_g(a) / d``) or ``"channel"`` (``sigmoid(-a)``,
            the published code's kernel).
        clamp_dequantized: project the dequantized pass's ``x_hat`` onto the grid's range widened
            by half a step (a better denoiser, still a valid estimate; the published code does not).
        batch_size: (example, point) pairs per network call.
        index_offset: index of the first example (for sharding across processes).
        callback: called with the number of examples done after every batch.
        checkpoint: a folder holding partial progress (append-only chunks of rows, see
            :mod:`itdiffusion.evalstate`): continued when it exists (settings, data order and
            ``checkpoint_meta`` must match), added to at least every ``checkpoint_every``
            seconds, when the run stops on an error or ``KeyboardInterrupt``, and at the end
            (it is left in place; a second call with it returns at once).  A resumed run
            gives the same numbers as an uninterrupted one.  See :meth:`Evaluator.run`.
        checkpoint_meta: JSON-able facts the checkpoint must agree with (e.g. a model hash).
        tune: fit the estimator on ``pilot`` first (:meth:`ITDiffusion.tune`, in place, seeded
            by ``seed``); default: when ``pilot`` is given and the model is not tuned yet.
            ``False``: evaluate the model as it is.  A tuned model's fit is used and saved in
            ``Results.config["tuning"]`` (a resumed run must have the same fit).
        pilot: ``(P, *shape)`` pilot examples, never the evaluated ones (e.g. training data).
        pilot_calls: the pilot's budget of denoiser calls (default :func:`pilot_budget`);
            the calls spent are reported in ``Results.config["pilot"]``, apart from the evaluation's.

    Returns:
        :class:`Results`.
    """
    config = EvalConfig(n_points=n_points, discrete=discrete, soft=soft, dequantize=dequantize, clamp=clamp,
                        placement=placement, antithetic=antithetic, seed=seed, clip=clip, per_sample_curves=per_sample_curves,
                        protocol=protocol, soft_variance=soft_variance, clamp_dequantized=clamp_dequantized)
    config.validate()
    report = _maybe_tune(model, config, batches, tune, pilot, pilot_calls, batch_size)
    evaluator = Evaluator(model, config, batch_size=batch_size, index_offset=index_offset)
    evaluator.run(batches, callback=callback, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                  checkpoint_meta=checkpoint_meta)
    results = evaluator.results()
    results.config["pilot"] = report
    return results


PILOT_SHARE = 0.05  # the pilot's default budget: at most this share of the evaluation's calls ...
PILOT_EXAMPLES = 64  # ... and at most the calls of this many examples


def pilot_budget(n_examples: int | None, calls_per_example: int) -> int:
    """Default pilot budget: ``min(5 % of the evaluation's calls, the calls of 64 examples)``
    (the 64 examples' calls when the number of evaluated examples is not known)."""
    cap = PILOT_EXAMPLES * int(calls_per_example)
    return cap if n_examples is None else min(cap, int(PILOT_SHARE * n_examples * calls_per_example))


def _maybe_tune(model, config: EvalConfig, batches, tune, pilot, pilot_calls, batch_size,
                n_examples: int | None = None) -> dict | None:
    """Tune ``model`` on ``pilot`` when asked (see :func:`evaluate`); the pilot's report.

    ``n_examples`` (the number evaluated) sizes the default budget; ``None``: counted from a
    list of ``batches``, unknown for an iterator."""
    if tune is None:
        tune = pilot is not None and model.tuning is None
    if not tune or config.protocol == "paper":
        return None
    if pilot is None:
        raise ValueError("tune=True needs pilot examples (pilot=...), never the evaluated ones")
    if n_examples is None and isinstance(batches, (list, tuple)):
        n_examples = sum(len(_as_tensor(b)) for b in batches)
    budget = pilot_budget(n_examples, config.n_points) if pilot_calls is None else int(pilot_calls)
    if pilot_calls is None and budget < MIN_PILOT_CALLS:
        return {"budget": budget, "skipped": f"default budget under {MIN_PILOT_CALLS} calls: not tuned"}
    gen = torch.Generator().manual_seed(int(config.seed) + 7919)
    fit = model.tune(torch.as_tensor(pilot).to(model.proposal.device), budget, generator=gen,
                     discrete=config.discrete, calls_per_example=config.n_points, batch_size=batch_size).tuning
    return {"budget": budget, **dict(fit.pilot or {})}
