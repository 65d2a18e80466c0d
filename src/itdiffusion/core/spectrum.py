"""The Gaussian reference: mean and covariance spectrum of the data.

Every likelihood in this package is measured against a Gaussian ``N(mu, Sigma)`` with
``Sigma = U diag(lambda) U^T``: its entropy ``h_g``, its mmse curve, its optimal (linear)
denoiser and the closed-form integrals of that denoiser's error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .. import fileio as _io
from .channel import alpha_sigma
from .proposal import default_loc_scale

ORTHONORMAL_TOL = 1e-6  # max |V^T V - I| of a loaded spectrum's eigenvectors (eigh gives ~1e-14)
FORMAT = "itdiffusion.spectrum"
VERSION = 1
DEFAULT_REL_FLOOR = 1e-6


def _as_float64_2d(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(len(x), -1).to(torch.float64)


def _softplus_minus_sigmoid(u: torch.Tensor) -> torch.Tensor:
    """``softplus(u) - sigmoid(u) = Int_{-inf}^u sigmoid(v)^2 dv`` (float64), non-negative and increasing.

    For very negative ``u`` both terms are ``~ e^u`` while their difference is ``~ e^(2u) / 2``:
    there the power series ``sum_{k>=2} (-1)^k (k-1)/k t^k`` in ``t = e^u`` is used instead
    (for ``u < -6`` the first seven terms are exact to float64 precision).
    """
    t = torch.exp(u.clamp(max=-6.0))
    series = t * t * (1 / 2 - t * (2 / 3 - t * (3 / 4 - t * (4 / 5 - t * (5 / 6 - t * (6 / 7 - t * 7 / 8))))))
    return torch.where(u < -6.0, series, F.softplus(u) - torch.sigmoid(u))


@dataclass(frozen=True, eq=False)
class GaussianSpectrum:
    """Mean ``(d,)``, eigenvectors ``(d, d)`` (columns; ``None`` for the diagonal
    approximation, whose eigen-basis is the pixel basis) and log-eigenvalues ``(d,)`` of the
    data covariance, all float64; ``shape`` is the shape of one example (``prod(shape) = d``).
    """

    mean: torch.Tensor
    eigvecs: torch.Tensor | None
    log_eigs: torch.Tensor
    shape: tuple[int, ...]

    def __post_init__(self):
        d = self.log_eigs.numel()
        if math.prod(self.shape) != d or self.mean.shape != (d,):
            raise ValueError(f"spectrum arrays disagree: shape {self.shape}, mean {tuple(self.mean.shape)}, "
                             f"{d} eigenvalues")
        if self.eigvecs is not None and self.eigvecs.shape != (d, d):
            raise ValueError(f"eigenvectors must be ({d}, {d}), got {tuple(self.eigvecs.shape)}")
        if not bool(torch.isfinite(self.log_eigs).all()) or not bool(torch.isfinite(self.mean).all()):
            raise ValueError("spectrum has non-finite mean or eigenvalues")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_data(
        cls, x: torch.Tensor, *, diagonal: bool = False, rel_floor: float = DEFAULT_REL_FLOOR,
        added_variance: float = 0.0,
    ) -> "GaussianSpectrum":
        """Spectrum of samples ``x`` of shape ``(n, *shape)``, computed in float64.

        See :meth:`from_batches` for ``rel_floor`` and ``added_variance``.
        """
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        if x.dim() < 2 or len(x) < 2:
            raise ValueError(f"need at least 2 samples of shape (n, *shape), got {tuple(x.shape)}")
        return cls.from_batches([x], diagonal=diagonal, rel_floor=rel_floor, added_variance=added_variance)

    @classmethod
    def from_batches(
        cls, batches: Iterable[torch.Tensor], *, diagonal: bool = False, rel_floor: float = DEFAULT_REL_FLOOR,
        added_variance: float = 0.0,
    ) -> "GaussianSpectrum":
        """Spectrum accumulated over batches ``(b, *shape)`` (first and second moments, float64).

        ``added_variance`` is added to every eigenvalue: ``delta^2 / 12`` gives the covariance
        of data on a grid of spacing ``delta`` after uniform dequantization, the right
        reference for dequantized estimates (and a harmless one for discrete ones).
        Eigenvalues below ``rel_floor`` times their mean are then raised to it, so that
        constant pixels do not give ``log 0``; any reference Gaussian keeps the estimators
        exact.
        """
        n, total, outer, shape = 0, None, None, None
        for xb in batches:
            if shape is None:
                shape = tuple(xb.shape[1:])
            elif tuple(xb.shape[1:]) != shape:
                raise ValueError(f"batches disagree in shape: {shape} and {tuple(xb.shape[1:])}")
            flat = _as_float64_2d(xb).cpu()
            if not bool(torch.isfinite(flat).all()):
                raise ValueError("data contain NaN or Inf; cannot compute a spectrum")
            total = flat.sum(0) if total is None else total + flat.sum(0)
            sq = (flat * flat).sum(0) if diagonal else flat.T @ flat
            outer = sq if outer is None else outer + sq
            n += len(flat)
        if shape is None or n < 2:
            raise ValueError("need at least 2 samples to compute a spectrum")
        d = math.prod(shape)
        if not diagonal and n <= d:
            raise ValueError(
                f"a full covariance of dimension {d} needs more than {d} samples (got {n}); "
                "use diagonal=True or more data"
            )
        mean = total / n
        if diagonal:
            eigs, eigvecs = (outer - n * mean * mean) / (n - 1), None
        else:
            cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
            eigs, eigvecs = torch.linalg.eigh(0.5 * (cov + cov.T))
        if added_variance < 0:
            raise ValueError(f"added_variance must be non-negative, got {added_variance}")
        eigs = eigs + added_variance
        floor = rel_floor * max(eigs.clamp_min(0).mean().item(), 1e-300)
        return cls(mean=mean, eigvecs=eigvecs, log_eigs=eigs.clamp_min(floor).log(), shape=shape)

    @classmethod
    def isotropic(cls, shape: tuple[int, ...], variance: float = 1.0, mean: float = 0.0) -> "GaussianSpectrum":
        """``N(mean, variance * I)`` in the pixel basis."""
        d = math.prod(shape)
        return cls(
            mean=torch.full((d,), float(mean), dtype=torch.float64),
            eigvecs=None,
            log_eigs=torch.full((d,), math.log(variance), dtype=torch.float64),
            shape=tuple(shape),
        )

    def to(self, device: torch.device | str) -> "GaussianSpectrum":
        """The same spectrum with its tensors on ``device`` (float64 kept)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GaussianSpectrum(move(self.mean), move(self.eigvecs), move(self.log_eigs), self.shape)

    def with_min_variance(self, variance: float) -> "GaussianSpectrum":
        """The same Gaussian with every eigenvalue raised to at least ``variance``.

        For dequantized data ``x + u`` (``u`` uniform of width ``delta``) a floor of
        ``delta^2 / 12`` keeps the reference non-degenerate where the data never vary (any
        Gaussian reference is valid; a degenerate one makes the estimate's variance explode).
        """
        floor = math.log(float(variance))
        return GaussianSpectrum(self.mean, self.eigvecs, self.log_eigs.clamp_min(floor), self.shape)

    # ----------------------------------------------------------------- scalars
    @property
    def d(self) -> int:
        return self.log_eigs.numel()

    @property
    def diagonal(self) -> bool:
        return self.eigvecs is None

    @property
    def loc(self) -> float:
        """Default location of the log-SNR proposal, ``-mean(log lambda)``."""
        return default_loc_scale(self.log_eigs)[0]

    @property
    def scale(self) -> float:
        """Default scale of the log-SNR proposal, ``sqrt(1 + 3/pi^2 var(log lambda))``."""
        return default_loc_scale(self.log_eigs)[1]

    def entropy(self) -> float:
        """Differential entropy ``h_g = d/2 log(2 pi e) + 1/2 sum log lambda`` in nats."""
        return 0.5 * self.d * math.log(2 * math.pi * math.e) + 0.5 * self.log_eigs.sum().item()

    # ----------------------------------------------------------------- curves and densities
    def mmse(self, logsnr: torch.Tensor) -> torch.Tensor:
        """Epsilon-form mmse of the Gaussian, ``sum_i sigmoid(a + log lambda_i)`` (float64, ``logsnr``'s shape)."""
        a = torch.as_tensor(logsnr, dtype=torch.float64, device=self.log_eigs.device)
        return torch.sigmoid(a.unsqueeze(-1) + self.log_eigs).sum(-1)

    def to_eigenbasis(self, x: torch.Tensor, shift: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Coordinates ``U^T (x - shift * mu)`` of ``x`` ``(B, *shape)`` as ``(B, d)`` float64.

        ``shift`` may be a ``(B, 1)`` tensor (``alpha`` when projecting a noisy ``z``).
        """
        centred = _as_float64_2d(x) - shift * self.mean
        return centred if self.eigvecs is None else centred @ self.eigvecs

    def from_eigenbasis(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse rotation ``U y`` of ``(B, d)`` coordinates (no mean added), float64."""
        return y if self.eigvecs is None else y @ self.eigvecs.T

    def log_prob(self, x: torch.Tensor, *, x_eig: torch.Tensor | None = None) -> torch.Tensor:
        """``log N(x; mu, Sigma)`` per example, ``(B, *shape) -> (B,)`` float64.

        ``x_eig``: ``to_eigenbasis(x)`` if already known.
        """
        y = self.to_eigenbasis(x) if x_eig is None else x_eig.to(torch.float64)
        maha = (y * y * torch.exp(-self.log_eigs)).sum(1)
        return -0.5 * (maha + self.log_eigs.sum() + self.d * math.log(2 * math.pi))

    def denoise(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """The Gaussian-optimal (linear) ``eps_hat`` for ``z`` ``(B, *shape)``, ``logsnr`` ``(B,)``.

        In the eigen-basis ``eps_hat_i = sigma / (alpha^2 lambda_i + sigma^2) * (z - alpha mu)_i``.
        Computed in float64, returned in ``z``'s dtype.
        """
        a = logsnr.to(torch.float64).reshape(-1, 1)
        alpha, sigma = alpha_sigma(a)
        y = self.to_eigenbasis(z, shift=alpha)
        gain = sigma / (alpha**2 * torch.exp(self.log_eigs) + sigma**2)
        return self.from_eigenbasis(gain * y).to(z.dtype).reshape(z.shape)

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        return self.denoise(z, logsnr)

    def denoise_error(
        self,
        x: torch.Tensor,
        logsnr: torch.Tensor,
        eps: torch.Tensor,
        *,
        x_eig: torch.Tensor | None = None,
        eps_eig: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``||eps - denoise(z)||^2`` for ``z = channel(x, logsnr, eps)``, float64 ``(B,)``.

        Computed in the eigen-basis, where the rotation keeps the norm: with
        ``y_e = U^T eps``, ``y_x = U^T (x - mu)`` and ``l = log lambda``, the residual is
        ``sigmoid(a + l) y_e - e^(a/2) sigmoid(-(a + l)) y_x`` (exact, in float64, and one
        ``d x d`` product per call instead of two; none with ``x_eig`` given).

        Args:
            x, eps: ``(B, *shape)``; ``logsnr``: ``(B,)``.
            x_eig: ``to_eigenbasis(x)`` if already known (e.g. shared by many calls).
            eps_eig: ``to_eigenbasis(eps, shift=0)`` if already known.
        """
        resid = self.denoise_residual(x, logsnr, eps, x_eig=x_eig, eps_eig=eps_eig)
        return (resid * resid).sum(1)

    def denoise_residual(
        self,
        x: torch.Tensor,
        logsnr: torch.Tensor,
        eps: torch.Tensor,
        *,
        x_eig: torch.Tensor | None = None,
        eps_eig: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``U^T (eps - denoise(z))`` in the eigen-basis, ``(B, d)`` float64 (see :meth:`denoise_error`)."""
        a = logsnr.to(torch.float64).reshape(-1, 1)
        y_x = self.to_eigenbasis(x) if x_eig is None else x_eig.to(torch.float64)
        y_e = self.to_eigenbasis(eps, shift=0.0) if eps_eig is None else eps_eig.to(torch.float64)
        u = a + self.log_eigs
        return torch.sigmoid(u) * y_e - torch.exp(0.5 * a + F.logsigmoid(-u)) * y_x

    def error_integral(self, x: torch.Tensor, logsnr: torch.Tensor | float) -> torch.Tensor:
        """``Int_{-inf}^{A} E_eps ||eps - eps_g(z_a)||^2 da`` for each example of ``x``, float64 ``(B,)``.

        The expected error of the Gaussian denoiser at a *fixed* ``x`` is
        ``sum_i [sigmoid(a + l_i)^2 + y_i^2 e^a / (1 + lambda_i e^a)^2]`` (``y = U^T(x - mu)``,
        ``l = log lambda``), whose antiderivative is
        ``sum_i [softplus(A + l_i) - sigmoid(A + l_i) + y_i^2 / lambda_i * sigmoid(A + l_i)]``.
        ``A`` is a scalar or a ``(B,)`` tensor.
        """
        y = self.to_eigenbasis(x)
        upper = torch.as_tensor(logsnr, dtype=torch.float64, device=y.device).reshape(-1, 1)
        u = upper + self.log_eigs
        s = torch.sigmoid(u)
        return (_softplus_minus_sigmoid(u) + y * y * torch.exp(-self.log_eigs) * s).sum(1)

    # ----------------------------------------------------------------- files
    def save(self, path) -> None:
        """Write an ``.npz`` file (no pickle), atomically."""
        arrays = {"mean": self.mean.cpu().numpy(), "log_eigs": self.log_eigs.cpu().numpy()}
        if self.eigvecs is not None:
            arrays["eigvecs"] = self.eigvecs.cpu().numpy()
        meta = {"format": FORMAT, "version": VERSION, "shape": list(self.shape),
                "diagonal": self.diagonal, "loc": self.loc, "scale": self.scale, "entropy": self.entropy()}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        _io.save_npz_atomic(path, arrays)

    @classmethod
    def load(cls, path) -> "GaussianSpectrum":
        """Read a file written by :meth:`save`; refuses pickles and malformed files."""
        arrays = _io.load_npz(path)
        meta = _io.read_meta(arrays, path, FORMAT, VERSION)
        try:
            real = lambda key: torch.from_numpy(_io.real_array(arrays, key))  # noqa: E731
            spectrum = cls(
                mean=real("mean"),
                eigvecs=real("eigvecs") if "eigvecs" in arrays else None,
                log_eigs=real("log_eigs"),
                shape=tuple(int(s) for s in meta["shape"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path}: not a valid spectrum file ({err})") from None
        if spectrum.eigvecs is not None:
            v = spectrum.eigvecs
            gap = (v.T @ v - torch.eye(v.shape[1], dtype=v.dtype)).abs().max().item()
            if not gap < ORTHONORMAL_TOL:
                raise ValueError(f"{path}: the eigenvectors are not orthonormal (max |V^T V - I| = {gap:.3g}); "
                                 "not a spectrum this package wrote")
        return spectrum
