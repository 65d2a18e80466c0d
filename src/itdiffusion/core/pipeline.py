"""The estimator pipeline: the one place where noise, log-SNR points, network calls and errors meet.

An :class:`Estimator` says where the integral over log-SNR is taken (its proposal), how each
example's calls are spent (:class:`Sampling`) and what is estimated (continuous ``-log p(x)``
or the discrete bound, with rounding and clamping).  For a batch of examples it

1. reads every example's own random stream (:class:`itdiffusion.core.noise.NoiseStreams`) in
   chunks of points, for groups of examples small enough for ``NOISE_BUDGET``;
2. places the log-SNR points (:class:`~itdiffusion.core.proposal.Quadrature`), per example or
   shared by all;
3. calls the denoiser on every (example, call) pair and measures the errors
   (:func:`itdiffusion.core.errors.pair_errors`), averaged over the calls of each point;
4. turns errors into integrands (:mod:`itdiffusion.core.estimators`) and integrates them.

``nll``, the evaluation protocol, the continuous-time variational bound and the demo all go
through :meth:`Estimator.measure`; none of them repeats these steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from . import estimators
from .errors import Denoise, ErrorOptions, Errors, check_rounding, pair_errors
from .grid import DiscreteGrid
from .noise import NOISE_BUDGET, CallLayout, NoiseStreams, point_chunk
from .adaptive import RoundingMap
from .proposal import Proposal, Quadrature, check_n_points, check_placement, quadrature
from .spectrum import GaussianSpectrum


@dataclass(frozen=True)
class Sampling:
    """How the ``n_calls`` network calls of one example are spent.

    ``antithetic``: in groups of four antithetic noise draws at ``ceil(n_calls / 4)`` points
    (see :class:`~itdiffusion.core.noise.CallLayout`), else one call per point.
    ``placement``: ``"stratified"``, ``"iid"`` or ``"midpoint"`` (see :mod:`~itdiffusion.core.proposal`).
    """

    n_calls: int
    antithetic: bool = True
    placement: str = "stratified"

    def __post_init__(self):
        object.__setattr__(self, "n_calls", check_n_points(self.n_calls))
        check_placement(self.placement)

    @property
    def layout(self) -> CallLayout:
        return CallLayout(self.n_calls, self.antithetic)

    @property
    def n_points(self) -> int:
        """Distinct log-SNR points per example."""
        return self.layout.n_strata


@dataclass(frozen=True)
class Pass:
    """One input the denoiser is called on, with the noise and points shared by all passes.

    ``dequantize``: the data plus the example's uniform offset times the grid step.
    ``spectrum``: the Gaussian reference of this pass's control variate (default: the one
    given to :meth:`Estimator.measure`).
    ``y``: the condition of every example, ``(B, ...)`` for the ``B`` examples measured, passed to
    the denoiser as ``y=`` (``None``: unconditional).  Passes that differ only in ``y`` see the
    same noise at the same points (conditional likelihoods, mutual information, classification).
    """

    name: str = "data"
    dequantize: bool = False
    options: ErrorOptions = field(default_factory=ErrorOptions)
    spectrum: GaussianSpectrum | None = None
    y: torch.Tensor | None = field(default=None, compare=False)

    def rows(self, start: int, stop: int) -> "Pass":
        """This pass for examples ``start:stop`` of the batch (its condition sliced)."""
        return self if self.y is None else replace(self, y=self.y[start:stop])


@dataclass
class Measurement:
    """What :meth:`Estimator.measure` measured on ``B`` examples.

    ``inputs`` and ``errors`` are keyed by pass name: ``(B, *shape)`` inputs and
    :class:`~itdiffusion.core.errors.Errors` of shape ``(B, m)``, one value per point
    (averaged over the point's calls).
    """

    quadrature: Quadrature
    inputs: dict[str, torch.Tensor]
    errors: dict[str, Errors]


@dataclass(frozen=True)
class Estimator:
    """An estimator of ``-log p(x)`` (continuous) or of an upper bound on ``-log P(x)``.

    Attributes:
        proposal: the log-SNR proposal; its range is the integration range.
        sampling: calls per example and how they are spent.
        discrete: the data grid for the discrete bound (``None``: continuous data).
        rounding: ``"hard"``, ``"soft"``, ``"none"`` or ``"auto"`` (discrete only; ``"auto"``: the
            per-region choice of ``rounding_map``).
        clamp: ``(lo, hi)`` interval to clamp ``x_hat`` into.
        split: log-SNR above which the discrete bound drops the Gaussian control variate.
        batch_size: (example, call) pairs per network call.
        rounding_map: the fitted rounding of each log-SNR region (for ``rounding="auto"``).
    """

    proposal: Proposal
    sampling: Sampling
    discrete: DiscreteGrid | None = None
    rounding: str = "hard"
    clamp: tuple[float, float] | None = None
    split: float = 0.0
    batch_size: int | None = None
    rounding_map: RoundingMap | None = None

    def __post_init__(self):
        if self.rounding == "auto":
            if self.rounding_map is None:
                raise ValueError('rounding="auto" needs a tuned model (model.tune(...)): no rounding was fitted')
        else:
            check_rounding(self.rounding)
        object.__setattr__(self, "split", min(max(float(self.split), self.proposal.lo), self.proposal.hi))

    @property
    def roundings(self) -> tuple[str, ...]:
        if self.discrete is None or self.rounding == "none":
            return ()
        return self.rounding_map.needed if self.rounding == "auto" else (self.rounding,)

    def data_pass(self, roundings: tuple[str, ...] | None = None) -> Pass:
        """The pass on the data itself, computing this estimator's rounding (or ``roundings``)."""
        roundings = self.roundings if roundings is None else roundings
        return Pass("data", False, ErrorOptions(self.discrete, roundings, self.clamp, self.batch_size))

    def shared_quadrature(self, seed: int | None = None) -> Quadrature:
        """Points shared by every example: the midpoint rule, or one draw from ``seed``."""
        draws = None
        if self.sampling.placement != "midpoint":
            if seed is None:
                raise ValueError(f"shared {self.sampling.placement} points need a seed")
            gen = torch.Generator().manual_seed(int(seed))
            draws = torch.rand(self.sampling.n_points, generator=gen, dtype=torch.float64)
        return quadrature(self.proposal, self.sampling.n_points, self.sampling.placement, draws)

    # ----------------------------------------------------------------- the pipeline
    def measure(
        self,
        denoise: Denoise,
        spectrum: GaussianSpectrum,
        x: torch.Tensor,
        *,
        seed: int,
        first_index: int = 0,
        shared: Quadrature | None = None,
        passes: tuple[Pass, ...] | None = None,
        same_noise: bool = False,
        per_call: bool = False,
        indices=None,
    ) -> Measurement:
        """Errors of every pass on examples ``first_index, first_index + 1, ...`` of ``x`` ``(B, *shape)``.

        ``shared``: points shared by every example (default: each example its own, from its
        stream).  ``passes`` default to the data pass of this estimator.  ``same_noise``:
        every example draws the stream of example ``first_index`` (common random numbers,
        e.g. for a smooth density plot).  ``per_call``: keep one error per call ``(B, n_calls)``
        instead of the mean over each point's calls (the tuning pilot).  ``indices``: the stream
        index of every example (``(B,)`` ints, instead of ``first_index, first_index + 1, ...``).
        """
        if indices is not None:
            indices = [int(i) for i in indices]
            if len(indices) != len(x):
                raise ValueError(f"{len(indices)} stream indices for {len(x)} examples")
        passes = (self.data_pass(),) if passes is None else tuple(passes)
        for p in passes:
            if p.y is not None and len(p.y) != len(x):
                raise ValueError(f"pass {p.name!r} has {len(p.y)} conditions for {len(x)} examples")
        if any(p.dequantize for p in passes) and self.discrete is None:
            raise ValueError("dequantizing needs the data grid (discrete=DiscreteGrid(...))")
        layout, d = self.sampling.layout, max(1, x[0].numel())
        calls_per_chunk = point_chunk(layout.n_strata, d, NOISE_BUDGET) * layout.group
        group = max(1, NOISE_BUDGET // (calls_per_chunk * d))
        parts = []
        for start in range(0, len(x), group):
            xb = x[start : start + group]
            first = first_index if same_noise else first_index + start
            if indices is not None:
                group_indices = indices[start : start + len(xb)]
            else:
                group_indices = range(first, first + (1 if same_noise else len(xb)))
            streams = NoiseStreams(seed, group_indices, layout.n_strata, tuple(x.shape[1:]), dtype=x.dtype,
                                   device=x.device, budget=NOISE_BUDGET)
            group_passes = tuple(p.rows(start, start + group) for p in passes)
            parts.append(self._measure_group(denoise, spectrum, xb, streams, shared, group_passes, per_call))
        return _cat(parts, shared)

    def _measure_group(self, denoise, spectrum, x, streams: NoiseStreams, shared, passes, per_call=False) -> Measurement:
        """One group of examples, its noise read in chunks of points (see :class:`NoiseStreams`)."""
        layout, n = self.sampling.layout, len(x)
        fractions = streams.fractions.expand(n, -1)
        quad = shared if shared is not None else quadrature(
            self.proposal, self.sampling.n_points, self.sampling.placement,
            None if self.sampling.placement == "midpoint" else fractions)
        quad = quad.to(x.device)
        dequant = streams.dequant().expand(x.shape) if any(p.dequantize for p in passes) else None
        inputs = {p.name: x + self.discrete.delta * dequant if p.dequantize else x for p in passes}
        parts = {p.name: [] for p in passes}
        logsnr = quad.logsnr.expand(n, layout.n_strata)
        for first, stop, eps in streams.chunks():
            call_eps = layout.call_noise(eps.expand(n, *eps.shape[1:]), first)
            call_logsnr = logsnr[:, layout.stratum(x.device, first, stop)]
            for p in passes:
                errs = pair_errors(denoise, p.spectrum or spectrum, inputs[p.name], call_logsnr, call_eps, p.options,
                                   y=p.y)
                parts[p.name].append(errs if per_call else errs.map(lambda t: layout.mean_per_stratum(t, first)))
        return Measurement(quad, inputs, {name: Errors.cat(v, dim=1) for name, v in parts.items()})

    def integrand(self, spectrum: GaussianSpectrum, x: torch.Tensor, errs: Errors, quad: Quadrature,
                  *, discrete: bool | None = None, rounding: str | None = None) -> estimators.Integrand:
        """Estimator terms from ``(B, m)`` errors: continuous, or the discrete bound when this
        estimator has a grid (``discrete=False`` forces the continuous form)."""
        grid = self.discrete if discrete is None or discrete else None
        if grid is None:
            return estimators.continuous(spectrum, x, errs.raw, errs.gauss)
        rounding = self.rounding if rounding is None else rounding
        err = self.rounding_map.select(errs, quad.logsnr) if rounding == "auto" else errs.rounded(rounding)
        return estimators.discrete(spectrum, grid, x, err, errs.gauss, quad.logsnr.to(x.device), self.split, quad.hi)

    def nll(self, denoise: Denoise, spectrum: GaussianSpectrum, x: torch.Tensor, *, seed: int,
            first_index: int = 0, shared: Quadrature | None = None, same_noise: bool = False,
            y: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example estimate in nats, ``(B, *shape) -> (B,)`` float64 (arguments as in :meth:`measure`;
        ``y`` ``(B, ...)``: the condition, for ``-log p(x | y)``)."""
        m = self.measure(denoise, spectrum, x, seed=seed, first_index=first_index, shared=shared,
                         same_noise=same_noise, passes=(replace(self.data_pass(), y=y),))
        terms = self.integrand(spectrum, x, m.errors["data"], m.quadrature)
        return terms.integrate(m.quadrature)

    def with_sampling(self, **changes) -> "Estimator":
        return replace(self, sampling=replace(self.sampling, **changes))


def _cat(parts: list[Measurement], shared: Quadrature | None) -> Measurement:
    if len(parts) == 1:
        return parts[0]
    first = parts[0].quadrature
    quad = first if shared is not None or first.shared else Quadrature(
        torch.cat([p.quadrature.logsnr for p in parts]), torch.cat([p.quadrature.weights for p in parts]),
        first.proposal)
    inputs = {k: torch.cat([p.inputs[k] for p in parts]) for k in parts[0].inputs}
    errors = {k: Errors.cat([p.errors[k] for p in parts]) for k in parts[0].errors}
    return Measurement(quad, inputs, errors)
