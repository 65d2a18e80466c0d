"""Built-in data sets that need no download.

Every set is generated from, or shipped with, the package's own dependencies
(numpy, scikit-learn), so loading works offline and is fully deterministic:
all randomness comes from a :class:`numpy.random.SeedSequence` built from
``(seed, name)``; the global numpy and torch generators are never touched.

Two families:

* 2-D continuous sets (``moons``, ``circles``, ``square``, ``swissroll``,
  ``scg``, ``gmm``), shape ``(2,)``. Where the density is known in closed form
  (``square``, ``scg``, ``gmm``) the data set carries ``true_nll`` (exact
  ``-log p(x)`` in nats) and ``true_entropy`` (nats).
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images with
  17 grey levels), scaled to ``[-1, 1]``, shape ``(1, 8, 8)``, on a 17-level grid.

Example::

    ds = load_dataset("scg")
    ds.train.shape          # torch.Size([4000, 2])
    ds.true_nll(ds.test)    # (1000,) exact -log p(x), nats
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Dataset",
    "GMM_MEANS",
    "GMM_STDS",
    "GMM_WEIGHTS",
    "GMM_ENTROPY",
    "SCG_CORRELATION",
    "SCG_COVARIANCE",
    "SQUARE_HALF_WIDTH",
    "DIGITS_GRID",
    "gmm_params",
    "gmm_nll",
    "scg_nll",
    "square_nll",
    "list_datasets",
    "load_dataset",
    "iterate_batches",
]

NllFn = Callable[[Tensor], Tensor]

DEFAULT_N_TRAIN = 4000
DEFAULT_N_TEST = 1000
DIGITS_N_TEST = 300
DIGITS_GRID = (-1.0, 1.0, 17)
"""Digits grid as ``(lo, hi, levels)``: 17 equally spaced values, spacing 1/8."""

# --- strongly correlated Gaussian -------------------------------------------
SCG_CORRELATION = -0.495 / 0.505
"""Off-diagonal entry c of the scg covariance ``[[1, c], [c, 1]]``.

Its eigenvalues are ``1 +- c = 1/0.505 and 0.01/0.505`` (about 1.980 and
0.0198), so ``det = 1 - c^2 = 0.01/0.505^2`` and the differential entropy
``log(2 pi e) + log(det)/2 = 1.21849`` nats."""
SCG_COVARIANCE = ((1.0, SCG_CORRELATION), (SCG_CORRELATION, 1.0))

# --- uniform square -----------------------------------------------------------
SQUARE_HALF_WIDTH = math.sqrt(3.0)
"""The square set is uniform on ``[-sqrt 3, sqrt 3]^2``: unit variance per
coordinate, entropy ``log 12`` nats."""

# --- Gaussian mixture -----------------------------------------------------------
_RING = 2.0
GMM_MEANS = tuple(
    (_RING * math.cos(2 * math.pi * k / 8), _RING * math.sin(2 * math.pi * k / 8))
    for k in range(8)
)
"""(K=8, 2) component means: eight points on a circle of radius 2."""
GMM_STDS = (0.1, 0.2, 0.3, 0.5, 0.1, 0.2, 0.3, 0.5)
"""(K,) isotropic standard deviation of each component."""
GMM_WEIGHTS = (0.1, 0.15, 0.1, 0.15, 0.1, 0.15, 0.1, 0.15)
"""(K,) mixture weights, summing to one."""
GMM_ENTROPY = 2.0714417
"""Differential entropy of the mixture in nats, by quadrature on a fine grid
(no closed form; the tests check it to 1e-6)."""

# Fixed affine maps bringing the scikit-learn shapes to roughly unit variance.
# They are constants of the distribution, not statistics of a sample.
_MOONS_SHIFT, _MOONS_SCALE = (0.5, 0.25), (0.87, 0.5)
_CIRCLES_SCALE = 0.56
_SWISS_SHIFT, _SWISS_SCALE = (2.0, 0.2), 6.8


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data set with a deterministic train/test split.

    Attributes:
        name: registry name, as given to :func:`load_dataset`.
        train: (n_train, *shape) float32 tensor on the CPU.
        test: (n_test, *shape) float32 tensor on the CPU.
        shape: shape of one example, e.g. ``(2,)`` or ``(1, 8, 8)``.
        grid: ``(lo, hi, levels)`` when every coordinate takes one of ``levels``
            equally spaced values in ``[lo, hi]`` (discrete data), else ``None``.
        true_nll: maps x of shape (..., *shape) to the exact ``-log p(x)`` in
            nats, shape (...); ``None`` when the density is unknown.
        true_entropy: differential entropy in nats when known, else ``None``.
        description: one line for humans.
    """

    name: str
    train: Tensor
    test: Tensor
    shape: tuple[int, ...]
    grid: tuple[float, float, int] | None
    true_nll: NllFn | None
    true_entropy: float | None
    description: str

    @property
    def dim(self) -> int:
        """Number of coordinates d of one example."""
        return math.prod(self.shape)

    @property
    def delta(self) -> float | None:
        """Grid spacing of discrete data, ``(hi - lo) / (levels - 1)``; else None."""
        if self.grid is None:
            return None
        lo, hi, levels = self.grid
        return (hi - lo) / (levels - 1)


# ---------------------------------------------------------------------------
# Exact densities
# ---------------------------------------------------------------------------


def gmm_params(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Parameters of the ``gmm`` set as new tensors.

    Returns:
        ``(means, stds, weights)`` of shapes (K, 2), (K,), (K,) with K = 8.
    """
    return (
        torch.tensor(GMM_MEANS, dtype=dtype),
        torch.tensor(GMM_STDS, dtype=dtype),
        torch.tensor(GMM_WEIGHTS, dtype=dtype),
    )


def gmm_nll(x: Tensor) -> Tensor:
    """Exact ``-log p(x)`` (nats) of the ``gmm`` mixture; x (..., 2) -> (...).

    Computed in float64 by log-sum-exp over components, returned in x's dtype.
    """
    means, stds, weights = gmm_params(torch.float64)
    x64 = x.to(torch.float64)
    means, stds, weights = (t.to(x.device) for t in (means, stds, weights))
    sq_dist = ((x64.unsqueeze(-2) - means) ** 2).sum(-1)  # (..., K)
    log_comp = (
        weights.log() - torch.log(2 * math.pi * stds**2) - sq_dist / (2 * stds**2)
    )
    return (-torch.logsumexp(log_comp, dim=-1)).to(x.dtype)


def scg_nll(x: Tensor) -> Tensor:
    """Exact Gaussian ``-log N(x; 0, SCG_COVARIANCE)`` in nats; x (..., 2) -> (...)."""
    cov = torch.tensor(SCG_COVARIANCE, dtype=torch.float64, device=x.device)
    x64 = x.to(torch.float64)
    mahalanobis = (x64 @ torch.linalg.inv(cov) * x64).sum(-1)
    nll = 0.5 * mahalanobis + math.log(2 * math.pi) + 0.5 * torch.logdet(cov)
    return nll.to(x.dtype)


def square_nll(x: Tensor) -> Tensor:
    """Exact ``-log p(x)`` of the uniform square; x (..., 2) -> (...).

    ``log(area) = log 12`` inside ``[-sqrt 3, sqrt 3]^2`` and ``+inf`` outside.
    """
    inside = (x.abs() <= SQUARE_HALF_WIDTH).all(-1)
    log_area = math.log((2 * SQUARE_HALF_WIDTH) ** 2)
    nll = torch.full(inside.shape, log_area, dtype=x.dtype, device=x.device)
    return nll.masked_fill(~inside, math.inf)


def _scg_entropy() -> float:
    """``log(2 pi e) + 0.5 log det`` of the scg covariance, in nats."""
    return math.log(2 * math.pi * math.e) + 0.5 * math.log(1 - SCG_CORRELATION**2)


# ---------------------------------------------------------------------------
# Samplers: (n, numpy Generator) -> (n, 2) float64 array
# ---------------------------------------------------------------------------


def _random_state(rng: np.random.Generator) -> np.random.RandomState:
    """A legacy RandomState for scikit-learn, seeded from ``rng`` (not global)."""
    return np.random.RandomState(np.random.MT19937(rng.integers(2**63)))


def _sample_moons(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=0.05, random_state=_random_state(rng))
    return (x - _MOONS_SHIFT) / _MOONS_SCALE


def _sample_circles(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import make_circles

    x, _ = make_circles(n, noise=0.03, factor=0.5, random_state=_random_state(rng))
    return x / _CIRCLES_SCALE


def _sample_swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n, noise=0.5, random_state=_random_state(rng))
    return (x[:, [0, 2]] - _SWISS_SHIFT) / _SWISS_SCALE


def _sample_square(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-SQUARE_HALF_WIDTH, SQUARE_HALF_WIDTH, size=(n, 2))


def _sample_scg(n: int, rng: np.random.Generator) -> np.ndarray:
    chol = np.linalg.cholesky(np.array(SCG_COVARIANCE))
    return rng.standard_normal((n, 2)) @ chol.T


def _sample_gmm(n: int, rng: np.random.Generator) -> np.ndarray:
    means, stds = np.array(GMM_MEANS), np.array(GMM_STDS)
    k = rng.choice(len(GMM_WEIGHTS), size=n, p=np.array(GMM_WEIGHTS))
    return means[k] + stds[k, None] * rng.standard_normal((n, 2))


@dataclass(frozen=True)
class _Spec2D:
    sampler: Callable[[int, np.random.Generator], np.ndarray]
    true_nll: NllFn | None
    true_entropy: float | None
    description: str


_SPECS_2D: dict[str, _Spec2D] = {
    "moons": _Spec2D(
        _sample_moons, None, None,
        "two interleaved half circles (scikit-learn make_moons, noise 0.05), "
        "standardised by fixed constants",
    ),
    "circles": _Spec2D(
        _sample_circles, None, None,
        "two concentric circles (scikit-learn make_circles, factor 0.5, noise 0.03), "
        "scaled by a fixed constant",
    ),
    "square": _Spec2D(
        _sample_square, square_nll, math.log(12.0),
        "uniform on [-sqrt 3, sqrt 3]^2 (unit variance); entropy log 12 nats",
    ),
    "swissroll": _Spec2D(
        _sample_swissroll, None, None,
        "2-D swiss roll spiral (scikit-learn make_swiss_roll, noise 0.5, x-z plane), "
        "scaled by fixed constants",
    ),
    "scg": _Spec2D(
        _sample_scg, scg_nll, _scg_entropy(),
        "strongly correlated Gaussian N(0, [[1, c], [c, 1]]), c = -0.495/0.505; "
        "entropy 1.2185 nats",
    ),
    "gmm": _Spec2D(
        _sample_gmm, gmm_nll, GMM_ENTROPY,
        "8 isotropic Gaussians (std 0.1-0.5) on a circle of radius 2; exact density",
    ),
}

_DIGITS_DESCRIPTION = (
    "scikit-learn's 8x8 handwritten digits (1,797 images, 17 grey levels), "
    "scaled to [-1, 1] as x/8 - 1"
)


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, in a fixed order."""
    return [*_SPECS_2D, "digits"]


def _seed_sequence(name: str, seed: int) -> np.random.SeedSequence:
    """Entropy source for one (name, seed) pair; stable across Python runs."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.SeedSequence([int(seed), zlib.crc32(name.encode())])


def _to_tensor(x: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _check_size(label: str, n: int | None, default: int) -> int:
    n = default if n is None else n
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{label} must be a positive int, got {n!r}")
    return int(n)


def _load_2d(name: str, seed: int, n_train: int | None, n_test: int | None) -> Dataset:
    """Draw independent train and test samples of a 2-D set."""
    spec = _SPECS_2D[name]
    n_train = _check_size("n_train", n_train, DEFAULT_N_TRAIN)
    n_test = _check_size("n_test", n_test, DEFAULT_N_TEST)
    train_seq, test_seq = _seed_sequence(name, seed).spawn(2)
    train = spec.sampler(n_train, np.random.default_rng(train_seq))
    test = spec.sampler(n_test, np.random.default_rng(test_seq))
    return Dataset(
        name=name,
        train=_to_tensor(train),
        test=_to_tensor(test),
        shape=(2,),
        grid=None,
        true_nll=spec.true_nll,
        true_entropy=spec.true_entropy,
        description=spec.description,
    )


def _load_digits(seed: int, n_train: int | None, n_test: int | None) -> Dataset:
    """Split scikit-learn's digits by a seeded permutation; scale to [-1, 1]."""
    from sklearn.datasets import load_digits

    images = load_digits().data.reshape(-1, 1, 8, 8) / 8.0 - 1.0  # (1797, 1, 8, 8)
    total = len(images)
    n_test = _check_size("n_test", n_test, DIGITS_N_TEST)
    n_train = _check_size("n_train", n_train, total - n_test)
    if n_train + n_test > total:
        raise ValueError(
            f"digits has {total} images; n_train + n_test = {n_train + n_test}"
        )
    order = np.random.default_rng(_seed_sequence("digits", seed)).permutation(total)
    return Dataset(
        name="digits",
        train=_to_tensor(images[order[n_test : n_test + n_train]]),
        test=_to_tensor(images[order[:n_test]]),
        shape=(1, 8, 8),
        grid=DIGITS_GRID,
        true_nll=None,
        true_entropy=None,
        description=_DIGITS_DESCRIPTION,
    )


def load_dataset(
    name: str,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
) -> Dataset:
    """Load a built-in data set; deterministic in ``(name, seed, n_train, n_test)``.

    Args:
        name: one of :func:`list_datasets`.
        seed: non-negative int; selects the samples (2-D sets) or the split
            (digits). The global RNGs are not used.
        n_train: training size; default 4,000 for 2-D sets, the remaining
            1,497 images for digits.
        n_test: test size; default 1,000 for 2-D sets, 300 for digits.
            For 2-D sets train and test are drawn from independent streams,
            so each is unchanged when only the other's size changes.

    Raises:
        ValueError: unknown name, bad seed or sizes.
    """
    if name in _SPECS_2D:
        return _load_2d(name, seed, n_train, n_test)
    if name == "digits":
        return _load_digits(seed, n_train, n_test)
    raise ValueError(
        f"unknown data set {name!r}; known: {', '.join(list_datasets())}"
    )


def iterate_batches(
    x: Tensor,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[Tensor]:
    """Yield consecutive mini-batches of ``x`` along its first dimension.

    Args:
        x: (n, ...) tensor.
        batch_size: examples per batch; the last batch may be smaller unless
            ``drop_last``.
        shuffle: visit the examples in a random order drawn from ``generator``.
        generator: a CPU :class:`torch.Generator`; required when ``shuffle``
            so that the order never depends on the global RNG.
        drop_last: skip a final batch smaller than ``batch_size``.

    Yields:
        (b, ...) tensors on x's device, b <= batch_size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if shuffle and generator is None:
        raise ValueError("shuffle=True needs an explicit torch.Generator")
    n = x.shape[0]
    order = torch.randperm(n, generator=generator).to(x.device) if shuffle else None
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if drop_last and stop - start < batch_size:
            return
        yield x[start:stop] if order is None else x[order[start:stop]]
