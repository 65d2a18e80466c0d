"""``ITDiffusion``: a denoiser with the Gaussian reference of its data, turned into a likelihood model."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .denoisers.protocol import Denoiser
from .core.condition import as_condition, check_takes_y
from .core.errors import ErrorOptions, Errors, call_errors, check_batch_size, pair_errors
from .core.grid import DiscreteGrid
from .core.noise import seed_from
from .core.pipeline import Estimator, Sampling
from .core.proposal import LogisticProposal
from .core.spectrum import GaussianSpectrum
from . import tuning as _tuning
from .objective import ITLoss

DEFAULT_CLIP = 10.0  # half-width of the log-SNR range, in logistic scales (evaluation)
DEFAULT_TRAIN_CLIP = 10.0  # same, for the stochastic training objective



def default_antithetic(discrete: DiscreteGrid | None) -> bool:
    """Whether to group calls antithetically by default.

    Measured with exact denoisers (``benchmarks/estimator.py`` and docs/estimator.md):
    for continuous data the noise dominates the variance and antithetic groups cut the
    per-sample RMSE 2-3x at d >= 64; for discrete data the sharp drop of the error curve
    dominates, and four times as many distinct log-SNR points is better (RMSE ~2x lower).
    """
    return discrete is None


class ITDiffusion(nn.Module):
    """A denoiser ``f(z, logsnr) -> eps_hat`` with the Gaussian reference of its data.

    The spectrum is kept in float64 buffers, so it moves with ``.to(device)`` and is
    saved in ``state_dict()`` (avoid ``.to(dtype)`` on the whole model: cast the denoiser).

    Args:
        denoiser: callable (usually an ``nn.Module``) mapping ``z`` ``(B, *shape)`` and
            ``logsnr`` ``(B,)`` to ``eps_hat`` ``(B, *shape)``.
        spectrum: the data's :class:`GaussianSpectrum`.
        loc, scale: log-SNR proposal (default: the spectrum's moment match).
        clip: integration range ``loc +- clip * scale`` for estimates.
        train_clip: the same for :meth:`loss`.
        train_proposal: how :meth:`loss` draws log-SNR (see :class:`itdiffusion.objective.ITLoss`).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        spectrum: GaussianSpectrum,
        *,
        loc: float | None = None,
        scale: float | None = None,
        clip: float = DEFAULT_CLIP,
        train_clip: float = DEFAULT_TRAIN_CLIP,
        train_proposal: str = "uniform",
    ):
        super().__init__()
        ITLoss(train_proposal)  # validates the name
        self.train_proposal = train_proposal
        self.denoiser = denoiser
        self.shape = tuple(spectrum.shape)
        self.register_buffer("spectrum_mean", spectrum.mean.detach().double().clone())
        self.register_buffer("spectrum_log_eigs", spectrum.log_eigs.detach().double().clone())
        eigvecs = torch.zeros(0, dtype=torch.float64) if spectrum.eigvecs is None else spectrum.eigvecs
        self.register_buffer("spectrum_eigvecs", eigvecs.detach().double().clone())
        proposal = [spectrum.loc if loc is None else loc, spectrum.scale if scale is None else scale, clip, train_clip]
        if not all(math.isfinite(v) for v in proposal) or min(proposal[1:]) <= 0:
            raise ValueError(f"loc must be finite and scale, clip, train_clip positive; got {proposal}")
        self.register_buffer("proposal", torch.tensor(proposal, dtype=torch.float64))
        for name, value in _tuning.to_buffers(None).items():
            self.register_buffer(name, value)
        self._spectrum_cache: tuple[tuple, GaussianSpectrum] | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint may carry a spectrum of another kind (full vs diagonal): take its shapes.
        for name in ("spectrum_mean", "spectrum_log_eigs", "spectrum_eigvecs"):
            value = state_dict.get(prefix + name)
            if value is not None and value.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(value, device=getattr(self, name).device))
        for name in _tuning.BUFFERS:  # a fit (or none: checkpoints made before tuning existed)
            value = state_dict.setdefault(prefix + name, torch.zeros(0, dtype=torch.float64))
            if value.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(value, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------- configuration
    @property
    def spectrum(self) -> GaussianSpectrum:
        """The Gaussian reference, on this module's device (built once per set of buffers)."""
        buffers = (self.spectrum_mean, self.spectrum_eigvecs, self.spectrum_log_eigs)
        key = tuple(id(b) for b in buffers)
        if self._spectrum_cache is None or self._spectrum_cache[0] != key:
            eigvecs = None if self.spectrum_eigvecs.numel() == 0 else self.spectrum_eigvecs
            spectrum = GaussianSpectrum(self.spectrum_mean, eigvecs, self.spectrum_log_eigs, self.shape)
            self._spectrum_cache = (key, spectrum)
        return self._spectrum_cache[1]

    @property
    def loc(self) -> float:
        return self.proposal[0].item()

    @property
    def scale(self) -> float:
        return self.proposal[1].item()

    @property
    def clip(self) -> float:
        return self.proposal[2].item()

    @property
    def train_clip(self) -> float:
        return self.proposal[3].item()

    @property
    def d(self) -> int:
        return math.prod(self.shape)

    def logsnr_range(self, clip: float | None = None) -> tuple[float, float]:
        """Integration range ``(loc - clip*scale, loc + clip*scale)``."""
        proposal = self.logsnr_proposal(clip)
        return proposal.lo, proposal.hi

    def logsnr_proposal(self, clip: float | None = None) -> LogisticProposal:
        """The truncated-logistic proposal of estimates (``clip`` default: ``self.clip``)."""
        return LogisticProposal(self.loc, self.scale, self.clip if clip is None else float(clip))

    @property
    def tuning(self) -> "_tuning.Tuning | None":
        """The fit of :meth:`tune` (from this module's buffers), or ``None`` when untuned."""
        return _tuning.from_buffers({name: getattr(self, name).cpu() for name in _tuning.BUFFERS})

    def tune(self, x_pilot: torch.Tensor, n_calls: int, *, generator: torch.Generator | None = None,
             discrete: DiscreteGrid | None = None, calls_per_example: int | None = None,
             batch_size: int | None = None) -> "ITDiffusion":
        """Fit the estimator to the data on pilot examples ``x_pilot`` ``(P, *shape)``, in place.

        Spends at most ``n_calls`` denoiser calls (on at most ``P`` pilot examples, never the
        ones evaluated later) and fits the log-SNR proposal, antithetic groups or one call per
        point, and for ``discrete`` data the rounding of each log-SNR region (see
        :mod:`itdiffusion.tuning`).  :meth:`nll`, :meth:`estimator` and
        :func:`itdiffusion.evaluate` then use the fit; it is kept in this module's buffers
        (``state_dict``).  ``calls_per_example``: the calls per example the fit is for
        (default ``n_calls // P``).  Returns ``self``.
        """
        fit = _tuning.tune(self, x_pilot, n_calls, generator=generator, discrete=discrete,
                          calls_per_example=calls_per_example, batch_size=batch_size)
        self.set_tuning(fit)
        return self

    def set_tuning(self, fit: "_tuning.Tuning | None") -> "ITDiffusion":
        """Use the fit ``fit`` (``None``: back to the untuned estimator)."""
        device = self.proposal.device
        for name, value in _tuning.to_buffers(fit).items():
            setattr(self, name, value.to(device))
        return self

    def tuned_proposal(self, fit: "_tuning.Tuning | None", clip: float | None = None):
        """The log-SNR proposal of the fit ``fit``: its fitted one, else (``None``, or a fit that
        kept the default) the logistic proposal at ``clip``."""
        return fit.proposal if fit is not None and fit.proposal is not None else self.logsnr_proposal(clip)

    def discrete_split(self, clip: float | None = None) -> float:
        """Log-SNR above which the discrete estimator drops the Gaussian control variate."""
        lo, hi = self.logsnr_range(clip)
        return min(max(self.loc, lo), hi)

    # ----------------------------------------------------------------- checks
    def check_data(self, x: torch.Tensor, discrete: DiscreteGrid | None = None, name: str = "data") -> None:
        """Raise ``ValueError`` for data of the wrong shape, non-finite or (if discrete) off the grid."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of shape (B, {', '.join(map(str, self.shape))})")
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but the spectrum is for examples of shape {self.shape}"
            )
        if x.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (no values); move it to the model's device")
        if len(x) == 0:
            raise ValueError(f"{name} has no examples")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf")
        if discrete is not None:
            discrete.check(x, name)

    # ----------------------------------------------------------------- denoising
    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``eps_hat`` from the wrapped denoiser; ``y``: its condition (``None``: unconditional).

        ``ValueError`` when ``y`` is given and the denoiser takes none."""
        if y is None:
            return self.denoiser(z, logsnr.to(z.dtype))
        check_takes_y(self.denoiser)
        return self.denoiser(z, logsnr.to(z.dtype), y=y)

    def condition(self, y, x: torch.Tensor) -> torch.Tensor | None:
        """``y`` as one condition per example of ``x`` on its device (see
        :func:`itdiffusion.core.condition.as_condition`); ``ValueError`` for an unconditional denoiser."""
        if y is None:
            return None
        check_takes_y(self.denoiser)
        return as_condition(y, len(x), x.device)

    def errors(self, x: torch.Tensor, logsnr: torch.Tensor, eps: torch.Tensor, *,
               discrete: DiscreteGrid | None = None, roundings=(), clamp=None, batch_size: int | None = None) -> Errors:
        """Squared errors of one call per pair, ``x, eps (P, *shape)``, ``logsnr (P,)`` (see
        :func:`itdiffusion.core.errors.call_errors`)."""
        options = ErrorOptions(discrete, tuple(roundings), clamp, batch_size)
        return call_errors(self, self.spectrum, x, logsnr, eps, options)

    def point_errors(self, x: torch.Tensor, logsnr: torch.Tensor, eps: torch.Tensor, *,
                     discrete: DiscreteGrid | None = None, roundings=(), clamp=None,
                     batch_size: int | None = None) -> Errors:
        """:meth:`errors` for ``x (B, *shape)``, ``logsnr (n,) or (B, n)``, ``eps (B, n, *shape)``:
        ``(B, n)`` errors (see :func:`itdiffusion.core.errors.pair_errors`)."""
        options = ErrorOptions(discrete, tuple(roundings), clamp, batch_size)
        return pair_errors(self, self.spectrum, x, logsnr, eps, options)

    # ----------------------------------------------------------------- objectives
    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None, *,
             share: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The training objective (:class:`itdiffusion.objective.ITLoss`) with this model's settings."""
        return ITLoss(self.train_proposal, self.train_clip)(self, x, generator, share=share)

    # ----------------------------------------------------------------- estimates
    def estimator(
        self,
        n_points: int = 256,
        *,
        discrete: DiscreteGrid | None = None,
        rounding: str | None = None,
        clamp: tuple[float, float] | None = None,
        placement: str = "stratified",
        clip: float | None = None,
        antithetic: bool | None = None,
        batch_size: int | None = None,
        tuned: bool = True,
    ) -> Estimator:
        """The :class:`~itdiffusion.core.pipeline.Estimator` of :meth:`nll` with these settings.

        With a fit (:meth:`tune`) and ``tuned``, its proposal and call layout are used (unless
        ``clip`` or ``antithetic`` is given) and ``rounding`` defaults to ``"auto"`` for
        discrete data; else (the untuned estimator) the logistic proposal and ``"hard"``.
        """
        check_batch_size(batch_size)
        fit = self.tuning if tuned else None
        fit = fit if fit is not None and (clip is None or float(clip) == self.clip) else None
        if rounding is None:
            rounding = "auto" if fit is not None and discrete is not None and fit.rounding is not None else "hard"
        if antithetic is None:
            antithetic = fit.antithetic if fit is not None else default_antithetic(discrete)
        proposal = self.tuned_proposal(fit, clip)
        return Estimator(
            proposal=proposal, sampling=Sampling(n_points, bool(antithetic), placement),
            discrete=discrete, rounding=rounding, clamp=clamp, split=self.discrete_split(clip), batch_size=batch_size,
            rounding_map=None if fit is None else fit.rounding,
        )

    @torch.no_grad()
    def nll(
        self,
        x: torch.Tensor,
        n_points: int = 256,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        discrete: DiscreteGrid | None = None,
        rounding: str | None = None,
        clamp: tuple[float, float] | None = None,
        placement: str = "stratified",
        clip: float | None = None,
        antithetic: bool | None = None,
        batch_size: int | None = None,
        tuned: bool = True,
        y=None,
    ) -> torch.Tensor:
        """Per-example negative log-likelihood in nats, ``(B, *shape) -> (B,)`` float64.

        Continuous data: ``-log p(x)`` (``-log p(x | y)`` with a condition ``y``).  With ``discrete=DiscreteGrid(...)``: an upper bound
        on ``-log P(x)`` (in expectation exact for the optimal denoiser only with
        ``rounding="none"``, or ``"auto"`` after :meth:`tune`, which keeps the raw error where
        rounding does not lower it; rounding makes a good network's bound tighter), with
        analytic tails.  Calls the denoiser on ``n_points`` noisy copies of each example.
        After :meth:`tune` the fitted estimator is used (``tuned=False``: the untuned one).

        Args:
            n_points: network calls per example.
            generator / seed: randomness; each example gets its own stream derived from the
                seed and its position in ``x``, so results do not depend on ``batch_size``.
            rounding: ``"hard"``, ``"soft"``, ``"none"`` or ``"auto"`` (discrete data only;
                default ``"auto"`` after :meth:`tune`, else ``"hard"``).
            clamp: ``(lo, hi)`` interval to clamp ``x_hat`` into (data must lie in it).
            placement: ``"stratified"`` (default), ``"iid"`` or ``"midpoint"`` placement of points.
            clip: integration half-width in scales (default: ``self.clip``).
            antithetic: spend the calls in groups of four antithetic noise draws at
                ``ceil(n_points / 4)`` points (see :class:`itdiffusion.core.noise.CallLayout`).
                Default: on for continuous data, off for discrete data (see
                :func:`default_antithetic`).
            batch_size: (example, point) pairs per network call (default: all at once
                within a group of examples).
            y: the condition of a conditional denoiser: ``(B,)`` labels, one int for every
                example, or any ``(B, ...)`` tensor the network takes (``None``: unconditional).
        """
        y = self.condition(y, x)
        estimator = self.estimator(n_points, discrete=discrete, rounding=rounding, clamp=clamp, placement=placement,
                                   clip=clip, antithetic=antithetic, batch_size=batch_size, tuned=tuned)
        self.check_data(x, discrete)
        seed = seed_from(generator) if seed is None else _check_seed(seed)
        return estimator.nll(self, self.spectrum, x, seed=seed, y=y)

    # ----------------------------------------------------------------- conditional uses and maps
    def _prepared(self, x, n_points, seed, generator, options: dict) -> tuple[Estimator, int]:
        """The estimator of ``options`` (the keywords of :meth:`estimator`) and the run seed, data checked."""
        estimator = self.estimator(n_points, **options)
        self.check_data(x, options.get("discrete"))
        return estimator, seed_from(generator) if seed is None else _check_seed(seed)

    def mi(self, x: torch.Tensor, y, n_points: int = 256, *, seed: int | None = None,
           generator: torch.Generator | None = None, return_se: bool = False, **options):
        """Per-example pointwise mutual information ``i(x; y) = log p(x | y) - log p(x)`` in nats, ``(B,)``.

        The unconditional and conditional errors are measured on the same noise and points (see
        :mod:`itdiffusion.conditional`).  ``return_se``: return ``(mi, se)``, ``se`` ``(B,)`` the
        standard error of each estimate.  ``options``: the keywords of :meth:`estimator`
        (``discrete``, ``rounding``, ``clamp``, ``placement``, ``clip``, ``antithetic``, ``batch_size``, ``tuned``).
        """
        from .conditional import mutual_information

        estimator, seed = self._prepared(x, n_points, seed, generator, options)
        mi, se = mutual_information(self, x, y, estimator, seed=seed)
        return (mi, se) if return_se else mi

    def classify(self, x: torch.Tensor, labels, n_points: int = 256, *, seed: int | None = None,
                 generator: torch.Generator | None = None, early_drop: float | None = None, rounds: int = 4,
                 return_calls: bool = False, **options):
        """``(B, K)`` log-likelihoods ``log p(x | y_k)`` (plus a constant shared by the ``K`` candidates).

        All candidates are measured on shared noise; ``softmax(scores, 1)`` is ``p(y | x)`` under a
        uniform prior and ``argmax`` the zero-shot label.  ``labels``: candidate conditions (or
        ``K`` for ``0..K-1``).  ``n_points``: calls per example and candidate.  ``early_drop``:
        drop a candidate after any of ``rounds`` rounds when it is behind the leader by that many
        standard errors (see :func:`itdiffusion.conditional.class_log_likelihoods`).
        ``return_calls``: also return the ``(B, K)`` calls spent per candidate.
        ``options``: the keywords of :meth:`estimator`.
        """
        from .conditional import class_log_likelihoods

        estimator, seed = self._prepared(x, n_points, seed, generator, options)
        scores, calls = class_log_likelihoods(self, x, labels, estimator, seed=seed, early_drop=early_drop,
                                              rounds=rounds)
        return (scores, calls) if return_calls else scores

    def nll_map(self, x: torch.Tensor, n_points: int = 256, *, seed: int | None = None,
                generator: torch.Generator | None = None, y=None, **options) -> torch.Tensor:
        """Per-dimension contributions ``(B, *shape)`` nats to :meth:`nll` (same seed and options: they
        sum to it, to float rounding).  ``y``: a condition, for a map of ``-log p(x | y)`` (maps of
        ``i(x; y)``: :meth:`mi_map`).  ``options``: the keywords of :meth:`estimator` (``discrete=``, ``rounding=``, ...).  How the
        Gaussian reference is assigned to dimensions: :mod:`itdiffusion.core.perdim`.
        """
        from .infomap import nll_map

        estimator, seed = self._prepared(x, n_points, seed, generator, options)
        return nll_map(self, x, estimator, seed=seed, y=self.condition(y, x))

    def mi_map(self, x: torch.Tensor, y, n_points: int = 256, *, seed: int | None = None,
               generator: torch.Generator | None = None, **options) -> torch.Tensor:
        """Per-dimension contributions ``(B, *shape)`` nats to :meth:`mi` (same seed: they sum to it)."""
        from .infomap import mi_map

        estimator, seed = self._prepared(x, n_points, seed, generator, options)
        return mi_map(self, x, self.condition(y, x), estimator, seed=seed)


def _check_seed(seed) -> int:
    """A run seed: an integer in 0 .. 2^63 - 1 (what the CLI's --seed accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be an integer in 0 .. 2^63 - 1, got {seed!r}")
    return int(seed)
