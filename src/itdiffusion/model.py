"""``ITDiffusion``: a denoiser plus the Gaussian reference, turned into a likelihood model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .core import estimators
from .core.channel import add_noise, x_from_eps
from .core.grid import DiscreteGrid
from .core.proposal import logistic_points, logistic_quantile
from .core.noise import CallLayout, draw_example_noise, seed_from
from .core.spectrum import GaussianSpectrum

DEFAULT_CLIP = 10.0  # half-width of the log-SNR range, in logistic scales (evaluation)
DEFAULT_TRAIN_CLIP = 10.0  # same, for the stochastic training objective
TRAIN_PROPOSALS = ("uniform", "logistic")
DISCRETE_SPLIT = 0.0  # where the discrete estimator stops using the Gaussian control variate, in scales from loc
ROUNDINGS = ("none", "hard", "soft")
_NOISE_BUDGET = 2**24  # elements of noise drawn at once when estimating (per group of examples)
# Elements per error computation in point_errors (whole network batches, at least one): small
# enough to stay in a CPU core's cache, large enough to keep an accelerator busy.
_ERROR_CHUNK = {"cpu": 2**14}
_ERROR_CHUNK_OTHER = 2**22

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Errors:
    """Epsilon-form squared errors ``||eps - eps_hat||^2`` (float64), one per (example, point).

    ``raw``: the denoiser (after clamping, if asked); ``gauss``: the Gaussian-optimal
    denoiser on the same noise; ``hard``/``soft``: the denoiser's ``x_hat`` rounded to the
    grid (``None`` when not asked for).  All share the leading shape of the inputs.
    """

    raw: torch.Tensor
    gauss: torch.Tensor
    hard: torch.Tensor | None = None
    soft: torch.Tensor | None = None

    def rounded(self, rounding: str) -> torch.Tensor:
        """The error for ``rounding`` in ``("none", "hard", "soft")``."""
        value = {"none": self.raw, "hard": self.hard, "soft": self.soft}[rounding]
        if value is None:
            raise ValueError(f"{rounding!r} rounding was not computed")
        return value

    def in_x_units(self, logsnr: torch.Tensor) -> "Errors":
        """The same errors in data units, ``||x - x_hat||^2 = e^-a ||eps - eps_hat||^2``."""
        scale = torch.exp(-logsnr.double()).to(self.raw.device)
        return self.map(lambda t: t * scale.expand_as(t))

    def map(self, fn) -> "Errors":
        return Errors(*(None if t is None else fn(t) for t in (self.raw, self.gauss, self.hard, self.soft)))

    @staticmethod
    def cat(parts: Sequence["Errors"], dim: int = 0) -> "Errors":
        fields = zip(*((p.raw, p.gauss, p.hard, p.soft) for p in parts))
        return Errors(*(None if f[0] is None else torch.cat(f, dim) for f in fields))


def check_batch_size(batch_size) -> None:
    """``ValueError`` unless ``batch_size`` is ``None`` or a positive integer."""
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")


def default_antithetic(discrete: DiscreteGrid | None) -> bool:
    """Whether to group calls antithetically by default.

    Measured with exact denoisers (``benchmarks/estimator.py`` and the notes in the README):
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
        train_proposal: how :meth:`loss` draws log-SNR in its range: ``"uniform"``
            (default: every log-SNR weighs the same, no importance weights to blow up
            gradients) or ``"logistic"`` (the truncated logistic of the estimates, as in
            the published code, there with ``train_clip=4``).
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
        if train_proposal not in TRAIN_PROPOSALS:
            raise ValueError(f"unknown train_proposal {train_proposal!r}; choose one of {TRAIN_PROPOSALS}")
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint may carry a spectrum of another kind (full vs diagonal): take its shapes.
        for name in ("spectrum_mean", "spectrum_log_eigs", "spectrum_eigvecs"):
            value = state_dict.get(prefix + name)
            if value is not None and value.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(value, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------- configuration
    @property
    def spectrum(self) -> GaussianSpectrum:
        """The Gaussian reference, on this module's device."""
        eigvecs = None if self.spectrum_eigvecs.numel() == 0 else self.spectrum_eigvecs
        return GaussianSpectrum(self.spectrum_mean, eigvecs, self.spectrum_log_eigs, self.shape)

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
        clip = self.clip if clip is None else clip
        return self.loc - clip * self.scale, self.loc + clip * self.scale

    # ----------------------------------------------------------------- checks
    def check_data(self, x: torch.Tensor, discrete: DiscreteGrid | None = None, name: str = "data") -> None:
        """Raise ``ValueError`` for data of the wrong shape, non-finite or (if discrete) off the grid."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of shape (B, {', '.join(map(str, self.shape))})")
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but the spectrum is for examples of shape {self.shape}"
            )
        if len(x) == 0:
            raise ValueError(f"{name} has no examples")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf")
        if discrete is not None:
            discrete.check(x, name)

    # ----------------------------------------------------------------- denoising
    def forward(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """``eps_hat`` from the wrapped denoiser (no checks)."""
        return self.denoiser(z, logsnr.to(z.dtype))

    def _denoise_checked(self, z: torch.Tensor, logsnr: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        if batch_size is not None and len(z) > batch_size:  # network batches of batch_size
            eps_hat = torch.cat([self(z[i : i + batch_size], logsnr[i : i + batch_size])
                                 for i in range(0, len(z), batch_size)])
        else:
            eps_hat = self(z, logsnr)
        if not isinstance(eps_hat, torch.Tensor) or eps_hat.shape != z.shape:
            got = tuple(eps_hat.shape) if isinstance(eps_hat, torch.Tensor) else type(eps_hat).__name__
            raise ValueError(f"denoiser returned {got} for input of shape {tuple(z.shape)}; expected the same shape")
        bad = ~torch.isfinite(eps_hat.detach().flatten(1)).all(1)
        if bool(bad.any()):
            where = sorted({round(v, 4) for v in logsnr[bad].double().tolist()})
            raise ValueError(f"denoiser returned NaN or Inf at log-SNR {where[:5]}{' ...' if len(where) > 5 else ''}")
        return eps_hat

    def errors(
        self,
        x: torch.Tensor,
        logsnr: torch.Tensor,
        eps: torch.Tensor,
        *,
        discrete: DiscreteGrid | None = None,
        roundings: Sequence[str] = (),
        clamp: tuple[float, float] | None = None,
        x_eig: torch.Tensor | None = None,
        eps_eig: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> Errors:
        """Squared errors of one network call on ``z = channel(x, logsnr, eps)``.

        Args:
            x, eps: ``(P, *shape)``; ``logsnr``: ``(P,)``.
            roundings: any of ``"hard"``, ``"soft"``, computed from the same ``x_hat``.
            clamp: ``(lo, hi)`` to clamp ``x_hat`` into before the raw error (valid when the
                data lie in that interval: projecting can only move ``x_hat`` closer).
            x_eig, eps_eig: ``x`` and ``eps`` in the spectrum's eigen-basis when already
                computed (each saves a ``d x d`` product in the Gaussian error).
            batch_size: call the network on at most this many pairs at a time (the errors
                are still computed for all pairs at once).
        """
        z = add_noise(x, logsnr, eps)
        eps_hat = self._denoise_checked(z, logsnr, batch_size)
        a = logsnr.double().reshape(-1, *([1] * (x.dim() - 1)))
        diff = eps.double() - eps_hat.double()  # eps - eps_hat, float64
        need_x_hat = clamp is not None or bool(roundings)
        x_hat = x_from_eps(z, eps_hat, logsnr).double() if need_x_hat else None
        if clamp is not None:
            clamped = x_hat.clamp(*clamp)
            diff = torch.where(clamped != x_hat, torch.exp(0.5 * a) * (x.double() - clamped), diff)
        errs = Errors(raw=(diff * diff).flatten(1).sum(1),
                      gauss=self.spectrum.denoise_error(x, logsnr, eps, x_eig=x_eig, eps_eig=eps_eig))
        if roundings:
            if discrete is None:
                raise ValueError("rounding needs a DiscreteGrid (discrete=...)")
            k_x = discrete.round_index(x.double())
            scale = torch.exp(a) * discrete.delta**2
            if "hard" in roundings:
                errs.hard = (scale * (k_x - discrete.round_index(x_hat)) ** 2).flatten(1).sum(1)
            if "soft" in roundings:
                soft = discrete.soft_round_index(x_hat, logsnr, noise_var=self.soft_rounding_variance(logsnr))
                errs.soft = (scale * (k_x - soft) ** 2).flatten(1).sum(1)
        return errs

    def point_errors(
        self,
        x: torch.Tensor,
        logsnr: torch.Tensor,
        eps: torch.Tensor,
        *,
        batch_size: int | None = None,
        **kwargs,
    ) -> Errors:
        """:meth:`errors` for every (example, point) pair, in network batches of ``batch_size`` pairs.

        Args:
            x: ``(B, *shape)``; ``logsnr``: ``(n,)`` shared or ``(B, n)`` per example;
            eps: ``(B, n, *shape)``.

        Returns:
            :class:`Errors` of shape ``(B, n)``.
        """
        n_examples, n_points = eps.shape[:2]
        logsnr = logsnr.to(x.device).expand(n_examples, n_points).reshape(-1)
        pairs_x = x.unsqueeze(1).expand(n_examples, n_points, *self.shape).reshape(-1, *self.shape)
        pairs_eps = eps.reshape(-1, *self.shape)
        rotated = {}
        if self.spectrum_eigvecs.numel():  # full spectrum: rotate each example once, not per point
            x_eig = self.spectrum.to_eigenbasis(x)
            rotated["x_eig"] = x_eig.unsqueeze(1).expand(n_examples, n_points, x_eig.shape[1]).reshape(-1, self.d)
            rotated["eps_eig"] = self.spectrum.to_eigenbasis(pairs_eps, shift=0.0)
        # The network sees batch_size pairs at a time; the error arithmetic runs on chunks of
        # whole network batches holding about _ERROR_CHUNK elements (fewer, larger operations).
        net_batch = len(logsnr) if batch_size is None else int(batch_size)
        chunk = _ERROR_CHUNK.get(x.device.type, _ERROR_CHUNK_OTHER)
        step = max(1, chunk // (self.d * net_batch)) * net_batch
        parts = [
            self.errors(pairs_x[i : i + step], logsnr[i : i + step], pairs_eps[i : i + step],
                        **{k: v[i : i + step] for k, v in rotated.items()}, batch_size=net_batch, **kwargs)
            for i in range(0, len(logsnr), step)
        ]
        return Errors.cat(parts).map(lambda t: t.reshape(n_examples, n_points))

    def soft_rounding_variance(self, logsnr: torch.Tensor) -> torch.Tensor:
        """Per-element error variance of ``x_hat`` assumed by soft rounding, ``(B,)`` data units.

        The Gaussian denoiser's mean squared error per element, ``e^-a mmse_g(a) / d``: at
        low log-SNR ``x_hat`` is far better than ``z / alpha`` (whose variance ``e^-a`` the
        published code assumes, which pulls every value to the middle of the grid), and at
        high log-SNR the two agree.
        """
        a = logsnr.double().reshape(-1)
        return torch.exp(-a) * self.spectrum.mmse(a.to(self.spectrum_log_eigs.device)).to(a.device) / self.d

    # ----------------------------------------------------------------- objectives
    def loss(
        self, x: torch.Tensor, generator: torch.Generator | None = None, *, share: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        """Stochastic training objective: a differentiable estimate of mean ``-log p(x)`` in nats.

        One log-SNR per example, stratified across the batch over ``loc +- train_clip *
        scale`` (uniformly or from the truncated logistic, see ``train_proposal``), one
        noise draw; uses the Gaussian control variate, so the value is an unbiased estimate
        of the truncated continuous NLL.  Gradients flow only through the denoiser.

        ``share=(rank, size, n)`` (data-parallel training): ``x`` holds rows
        ``rank::size`` of a batch of ``n`` examples.  The strata and the noise are drawn
        for the whole batch, exactly as one process would draw them, and this share's rows
        are taken; the value is ``size / n`` times the sum of this share's per-example
        losses, so that its average over the ``size`` processes (what
        ``DistributedDataParallel`` does to gradients) is the batch mean, however unevenly
        the batch is split.
        """
        self.check_data(x, None)
        rank, size, n = (0, 1, len(x)) if share is None else (int(v) for v in share)
        rows = slice(rank, None, size)
        if not (0 <= rank < size and len(range(n)[rows]) == len(x)):
            raise ValueError(f"share {share} does not match a batch of {len(x)} examples")
        if generator is None:
            generator = torch.Generator(device=x.device)
            generator.seed()
        order = torch.randperm(n, generator=generator, device=generator.device).cpu().double()
        u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).cpu()
        frac = (order + u) / n
        if self.train_proposal == "uniform":
            lo, hi = self.logsnr_range(self.train_clip)
            logsnr, inv_density = lo + (hi - lo) * frac, torch.full_like(frac, hi - lo)
        else:
            logsnr, inv_density = logistic_quantile(frac, self.loc, self.scale, self.train_clip)
        logsnr, weights = logsnr[rows].to(x.device), inv_density[rows].to(x.device)
        eps = torch.randn((n, *x.shape[1:]), generator=generator, device=generator.device, dtype=x.dtype)
        eps = eps[rows].to(x.device)
        z = add_noise(x, logsnr, eps)
        eps_hat = self(z, logsnr)
        err = ((eps - eps_hat) ** 2).flatten(1).sum(1)
        with torch.no_grad():
            spec = self.spectrum
            # x and eps rotated in one product: a full basis is read from memory once per step
            rows_xe = torch.cat([x.detach().flatten(1).double() - spec.mean, eps.flatten(1).double()])
            y_x, y_e = spec.to_eigenbasis(rows_xe, shift=0.0).split(len(x))
            err_g = spec.denoise_error(x, logsnr, eps, x_eig=y_x, eps_eig=y_e)
            neg_log_gauss = -spec.log_prob(x, x_eig=y_x)
        per_example = neg_log_gauss + 0.5 * weights * (err.double() - err_g)
        return per_example.mean() if share is None else per_example.sum() * (size / n)

    # ----------------------------------------------------------------- estimates
    def discrete_split(self, clip: float | None = None) -> float:
        """Log-SNR above which the discrete estimator drops the Gaussian control variate."""
        lo, hi = self.logsnr_range(clip)
        return min(max(self.loc + DISCRETE_SPLIT * self.scale, lo), hi)

    def integrand(
        self,
        x: torch.Tensor,
        errs: Errors,
        logsnr: torch.Tensor,
        *,
        discrete: DiscreteGrid | None = None,
        rounding: str = "hard",
        clip: float | None = None,
    ) -> estimators.Integrand:
        """Estimator terms (:class:`estimators.Integrand`) from ``(B, n)`` errors."""
        spec = self.spectrum
        if discrete is None:
            return estimators.continuous(spec, x, errs.raw, errs.gauss)
        a_hi = self.logsnr_range(clip)[1]
        return estimators.discrete(
            spec, discrete, x, errs.rounded(rounding), errs.gauss, logsnr.to(x.device), self.discrete_split(clip), a_hi
        )

    def points(
        self, n_strata: int, *, mode: str, clip: float, fractions: torch.Tensor | None = None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-SNR points and weights: ``(m,)`` for ``"grid"``, else ``(B, m)`` from ``fractions``.

        ``fractions`` ``(B, m)`` are the examples' own uniform draws (see :mod:`itdiffusion.core.noise`).
        """
        if mode == "grid":
            return logistic_points(n_strata, self.loc, self.scale, clip, mode="grid", device=device)
        if mode not in ("iid", "stratified"):
            raise ValueError(f"unknown integration mode {mode!r}; choose 'stratified', 'iid' or 'grid'")
        frac = fractions if mode == "iid" else (torch.arange(n_strata, device=fractions.device) + fractions) / n_strata
        logsnr, inv_density = logistic_quantile(frac, self.loc, self.scale, clip)
        return logsnr.to(device), (inv_density / n_strata).to(device)

    def stratum_errors(
        self,
        x: torch.Tensor,
        logsnr: torch.Tensor,
        eps: torch.Tensor,
        layout: CallLayout,
        *,
        batch_size: int | None = None,
        **kwargs,
    ) -> Errors:
        """Errors of ``layout.n_calls`` calls per example, averaged over the calls of each point.

        Args:
            x: ``(B, *shape)``; ``logsnr``: ``(m,)`` or ``(B, m)``; ``eps``: ``(B, m, *shape)``.

        Returns:
            :class:`Errors` of shape ``(B, m)``.
        """
        idx = layout.stratum(x.device)
        call_logsnr = logsnr.to(x.device).expand(len(x), layout.n_strata)[:, idx]
        errs = self.point_errors(x, call_logsnr, layout.call_noise(eps), batch_size=batch_size, **kwargs)
        return errs.map(layout.mean_per_stratum)

    @torch.no_grad()
    def nll(
        self,
        x: torch.Tensor,
        n_points: int = 256,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        discrete: DiscreteGrid | None = None,
        rounding: str = "hard",
        clamp: tuple[float, float] | None = None,
        mode: str = "stratified",
        clip: float | None = None,
        antithetic: bool | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Per-example negative log-likelihood in nats, ``(B, *shape) -> (B,)`` float64.

        Continuous data: ``-log p(x)``.  With ``discrete=DiscreteGrid(...)``: an upper bound
        on ``-log P(x)`` (exact for the optimal denoiser, in expectation), with analytic
        tails.  Calls the denoiser on ``n_points`` noisy copies of each example.

        Args:
            n_points: log-SNR points (and network calls) per example.
            generator / seed: randomness; each example gets its own stream derived from the
                seed and its position in ``x``, so results do not depend on ``batch_size``.
            rounding: ``"hard"``, ``"soft"`` or ``"none"`` (discrete data only).
            clamp: ``(lo, hi)`` interval to clamp ``x_hat`` into (data must lie in it).
            mode: ``"stratified"`` (default), ``"iid"`` or ``"grid"`` placement of points.
            clip: integration half-width in scales (default: ``self.clip``).
            antithetic: spend the calls in groups of four antithetic noise draws at
                ``ceil(n_points / 4)`` points (see :class:`itdiffusion.core.noise.CallLayout`).
                Default: on for continuous data, off for discrete data (see
                :func:`default_antithetic`).
            batch_size: (example, point) pairs per network call (default: all at once
                within a group of examples).
        """
        if int(n_points) != n_points or n_points < 1:
            raise ValueError(f"n_points must be a positive integer, got {n_points!r}")
        check_batch_size(batch_size)
        _check_rounding(rounding)
        self.check_data(x, discrete)
        clip = self.clip if clip is None else float(clip)
        seed = seed_from(generator) if seed is None else int(seed)
        roundings = (rounding,) if discrete is not None and rounding != "none" else ()
        layout = CallLayout(int(n_points), default_antithetic(discrete) if antithetic is None else antithetic)
        group = max(1, _NOISE_BUDGET // (n_points * self.d))
        out = []
        for start in range(0, len(x), group):
            xb = x[start : start + group]
            noise = draw_example_noise(seed, range(start, start + len(xb)), layout.n_strata, self.shape,
                                       dtype=x.dtype, device=x.device)
            logsnr, weights = self.points(layout.n_strata, mode=mode, clip=clip, fractions=noise.fractions,
                                          device=x.device)
            errs = self.stratum_errors(xb, logsnr, noise.eps, layout, batch_size=batch_size,
                                       discrete=discrete, roundings=roundings, clamp=clamp)
            terms = self.integrand(xb, errs, logsnr, discrete=discrete, rounding=rounding, clip=clip)
            out.append(terms.nll(weights))
        return torch.cat(out)
