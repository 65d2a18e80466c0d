"""Squared errors of one denoiser call, and of the Gaussian-optimal denoiser on the same noise.

Every estimate of this package is built from epsilon-form errors ``||eps - eps_hat||^2`` of
the denoiser at ``z = channel(x, logsnr, eps)``.  One network call gives, from the same
``eps_hat``: the raw error, the error after hard or soft rounding of ``x_hat`` to the data grid,
and (no network) the Gaussian denoiser's error on the same noise, the control variate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from .channel import add_noise, x_from_eps
from .grid import DiscreteGrid
from .perdim import to_dimensions
from .spectrum import GaussianSpectrum

ROUNDINGS = ("none", "hard", "soft")
# (z (B, *shape), logsnr (B,)) -> eps_hat; a conditional denoiser also takes ``y=`` (B, ...) labels.
Denoise = Callable[..., torch.Tensor]

# Elements per error computation (whole network batches, at least one): small enough to stay
# in a CPU core's cache, large enough to keep an accelerator busy.
_ERROR_CHUNK = {"cpu": 2**14}
_ERROR_CHUNK_OTHER = 2**22


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")
    return rounding


def check_batch_size(batch_size) -> None:
    """``ValueError`` unless ``batch_size`` is ``None`` or a positive integer."""
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def check_clamp(clamp) -> tuple[float, float] | None:
    """``clamp`` as ``(lo, hi)`` floats with ``lo < hi`` (or ``None``)."""
    if clamp is None:
        return None
    lo, hi = (float(v) for v in clamp)
    if not lo < hi:
        raise ValueError(f"clamp must be an interval (lo, hi) with lo < hi, got {tuple(clamp)}")
    return lo, hi


@dataclass
class Errors:
    """Epsilon-form squared errors (float64), one per (example, point).

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
        value = {"none": self.raw, "hard": self.hard, "soft": self.soft}[check_rounding(rounding)]
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


@dataclass(frozen=True)
class ErrorOptions:
    """What to compute from each call.

    Attributes:
        discrete: the data grid (needed for rounding).
        roundings: any of ``"hard"``, ``"soft"``, computed from the same ``x_hat``.
        clamp: ``(lo, hi)`` to clamp ``x_hat`` into before the raw error (valid when the data
            lie in that interval: projecting can only move ``x_hat`` closer).
        batch_size: call the network on at most this many pairs at a time.
        soft_variance: the error variance of ``x_hat`` that soft rounding assumes:
            ``"gaussian"`` (the Gaussian denoiser's, :func:`soft_rounding_variance`) or
            ``"channel"`` (``sigmoid(-a) = 1 / (1 + e^a)``, the published code's kernel).
        per_dim: keep one error per dimension, ``(P, d)`` instead of the sum ``(P,)`` (the
            Gaussian's per eigen-coordinate, assigned to dimensions by
            :func:`itdiffusion.core.perdim.to_dimensions`).
    """

    discrete: DiscreteGrid | None = None
    roundings: tuple[str, ...] = ()
    clamp: tuple[float, float] | None = None
    batch_size: int | None = None
    soft_variance: str = "gaussian"
    per_dim: bool = False

    def __post_init__(self):
        for rounding in self.roundings:
            if rounding not in ("hard", "soft"):
                raise ValueError(f"unknown rounding {rounding!r}; choose 'hard' or 'soft'")
        if self.roundings and self.discrete is None:
            raise ValueError("rounding needs a DiscreteGrid (discrete=...)")
        check_batch_size(self.batch_size)
        object.__setattr__(self, "clamp", check_clamp(self.clamp))
        if self.soft_variance not in ("gaussian", "channel"):
            raise ValueError(f"soft_variance must be 'gaussian' or 'channel', got {self.soft_variance!r}")


def _call(denoise: Denoise, z: torch.Tensor, logsnr: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """``denoise(z, logsnr)``, or ``denoise(z, logsnr, y=y)`` for a condition ``y``."""
    return denoise(z, logsnr) if y is None else denoise(z, logsnr, y=y)


def denoise_checked(denoise: Denoise, z: torch.Tensor, logsnr: torch.Tensor, batch_size: int | None,
                    y: torch.Tensor | None = None) -> torch.Tensor:
    """``eps_hat`` in network batches of ``batch_size``; ``ValueError`` for a wrong shape or NaN/Inf.

    ``y``: ``(len(z), ...)`` condition of each pair (``None``: unconditional), batched with ``z``.
    """
    if batch_size is not None and len(z) > batch_size:
        eps_hat = torch.cat([_call(denoise, z[i : i + batch_size], logsnr[i : i + batch_size],
                                   None if y is None else y[i : i + batch_size])
                             for i in range(0, len(z), batch_size)])
    else:
        eps_hat = _call(denoise, z, logsnr, y)
    if not isinstance(eps_hat, torch.Tensor) or eps_hat.shape != z.shape:
        got = tuple(eps_hat.shape) if isinstance(eps_hat, torch.Tensor) else type(eps_hat).__name__
        raise ValueError(f"denoiser returned {got} for input of shape {tuple(z.shape)}; expected the same shape")
    bad = ~torch.isfinite(eps_hat.detach().flatten(1)).all(1)
    if bool(bad.any()):
        where = sorted({round(v, 4) for v in logsnr[bad].double().tolist()})
        raise ValueError(f"denoiser returned NaN or Inf at log-SNR {where[:5]}{' ...' if len(where) > 5 else ''}")
    return eps_hat


def soft_rounding_variance(spectrum: GaussianSpectrum, logsnr: torch.Tensor) -> torch.Tensor:
    """Per-element error variance of ``x_hat`` assumed by soft rounding, ``(B,)`` data units.

    The Gaussian denoiser's mean squared error per element, ``e^-a mmse_g(a) / d``: at
    low log-SNR ``x_hat`` is far better than ``z / alpha`` (whose variance ``e^-a`` pulls
    every value to the middle of the grid), and at high log-SNR the two agree.
    """
    a = logsnr.double().reshape(-1)
    return torch.exp(-a) * spectrum.mmse(a.to(spectrum.log_eigs.device)).to(a.device) / spectrum.d


def call_errors(
    denoise: Denoise,
    spectrum: GaussianSpectrum,
    x: torch.Tensor,
    logsnr: torch.Tensor,
    eps: torch.Tensor,
    options: ErrorOptions = ErrorOptions(),
    *,
    x_eig: torch.Tensor | None = None,
    eps_eig: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> Errors:
    """Errors of one network call per pair on ``z = channel(x, logsnr, eps)``.

    Args:
        x, eps: ``(P, *shape)``; ``logsnr``: ``(P,)``.
        x_eig, eps_eig: ``x`` and ``eps`` in the spectrum's eigen-basis when already computed
            (each saves a ``d x d`` product in the Gaussian error).
        y: ``(P, ...)`` condition passed to the denoiser as ``y=`` (``None``: unconditional).

    Returns:
        :class:`Errors` of shape ``(P,)`` (``(P, d)`` with ``options.per_dim``).
    """
    z = add_noise(x, logsnr, eps)
    eps_hat = denoise_checked(denoise, z, logsnr, options.batch_size, y)
    a = logsnr.double().reshape(-1, *([1] * (x.dim() - 1)))
    diff = eps.double() - eps_hat.double()  # eps - eps_hat, float64
    x_hat = x_from_eps(z, eps_hat, logsnr).double() if options.clamp is not None or options.roundings else None
    if options.clamp is not None:
        clamped = x_hat.clamp(*options.clamp)
        diff = torch.where(clamped != x_hat, torch.exp(0.5 * a) * (x.double() - clamped), diff)
    total = (lambda t: t.flatten(1)) if options.per_dim else (lambda t: t.flatten(1).sum(1))  # noqa: E731
    if options.per_dim:  # the Gaussian's error per eigen-coordinate, assigned to dimensions as its offsets are
        resid = spectrum.denoise_residual(x, logsnr, eps, x_eig=x_eig, eps_eig=eps_eig)
        gauss = to_dimensions(spectrum, resid * resid)
    else:
        gauss = spectrum.denoise_error(x, logsnr, eps, x_eig=x_eig, eps_eig=eps_eig)
    errs = Errors(raw=total(diff * diff), gauss=gauss)
    if options.roundings:
        errs.hard, errs.soft = _rounded_errors(spectrum, options, x, x_hat, logsnr, a, total)
    return errs


def _rounded_errors(spectrum, options: ErrorOptions, x, x_hat, logsnr, a, total):
    grid = options.discrete
    k_x = grid.round_index(x.double())
    scale = torch.exp(a) * grid.delta**2
    hard = soft = None
    if "hard" in options.roundings:
        hard = total(scale * (k_x - grid.round_index(x_hat)) ** 2)
    if "soft" in options.roundings:
        var = soft_rounding_variance(spectrum, logsnr) if options.soft_variance == "gaussian" else \
            torch.sigmoid(-logsnr.double().reshape(-1))
        k_soft = grid.soft_round_index(x_hat, logsnr, noise_var=var)
        soft = total(scale * (k_x - k_soft) ** 2)
    return hard, soft


def pair_errors(
    denoise: Denoise,
    spectrum: GaussianSpectrum,
    x: torch.Tensor,
    logsnr: torch.Tensor,
    eps: torch.Tensor,
    options: ErrorOptions = ErrorOptions(),
    y: torch.Tensor | None = None,
) -> Errors:
    """:func:`call_errors` for every (example, call) pair, in chunks of whole network batches.

    Args:
        x: ``(B, *shape)``; ``logsnr``: ``(n,)`` shared or ``(B, n)`` per example;
        eps: ``(B, n, *shape)``; y: ``(B, ...)`` condition of each example, or ``None``.

    Returns:
        :class:`Errors` of shape ``(B, n)`` (``(B, n, d)`` with ``options.per_dim``).
    """
    shape, d = tuple(x.shape[1:]), spectrum.d
    n_examples, n_calls = eps.shape[:2]
    logsnr = logsnr.to(x.device).expand(n_examples, n_calls).reshape(-1)
    pairs_x = x.unsqueeze(1).expand(n_examples, n_calls, *shape).reshape(-1, *shape)
    pairs_eps = eps.reshape(-1, *shape)
    rotated = {}
    if spectrum.eigvecs is not None:  # full spectrum: rotate each example once, not per call
        x_eig = spectrum.to_eigenbasis(x)
        rotated["x_eig"] = x_eig.unsqueeze(1).expand(n_examples, n_calls, d).reshape(-1, d)
        rotated["eps_eig"] = spectrum.to_eigenbasis(pairs_eps, shift=0.0)
    if y is not None:
        rotated["y"] = y.unsqueeze(1).expand(n_examples, n_calls, *y.shape[1:]).reshape(-1, *y.shape[1:])
    # The network sees batch_size pairs at a time; the error arithmetic runs on chunks of
    # whole network batches holding about _ERROR_CHUNK elements (fewer, larger operations).
    net_batch = len(logsnr) if options.batch_size is None else int(options.batch_size)
    options = replace(options, batch_size=net_batch)
    step = max(1, _ERROR_CHUNK.get(x.device.type, _ERROR_CHUNK_OTHER) // (d * net_batch)) * net_batch
    parts = [
        call_errors(denoise, spectrum, pairs_x[i : i + step], logsnr[i : i + step], pairs_eps[i : i + step], options,
                    **{k: v[i : i + step] for k, v in rotated.items()})
        for i in range(0, len(logsnr), step)
    ]
    return Errors.cat(parts).map(lambda t: t.reshape(n_examples, n_calls, *t.shape[1:]))
