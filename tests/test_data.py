"""Tests for the built-in data sets (itdiffusion.data.toy)."""

import math

import numpy as np
import pytest
import torch

from itdiffusion.data.toy import (
    DIGITS_GRID,
    GMM_ENTROPY,
    Dataset,
    gmm_nll,
    gmm_params,
    iterate_batches,
    list_datasets,
    load_dataset,
    scg_nll,
    square_nll,
)

TWO_D = ["moons", "circles", "square", "swissroll", "scg", "gmm"]


def test_registry_lists_every_set():
    assert list_datasets() == [*TWO_D, "digits"]


@pytest.mark.parametrize("name", list_datasets())
def test_loads_with_shapes_and_dtype(name):
    ds = load_dataset(name)
    assert isinstance(ds, Dataset) and ds.name == name
    for split in (ds.train, ds.test):
        assert split.dtype == torch.float32
        assert tuple(split.shape[1:]) == ds.shape
        assert torch.isfinite(split).all()
    assert ds.dim == math.prod(ds.shape)
    assert ds.description


@pytest.mark.parametrize("name", TWO_D)
def test_2d_default_sizes_and_continuity(name):
    ds = load_dataset(name)
    assert ds.shape == (2,)
    assert len(ds.train) == 4000 and len(ds.test) == 1000
    assert ds.grid is None and ds.delta is None
    # No data point repeats inside or across splits (continuous draws).
    both = torch.cat([ds.train, ds.test])
    assert len(torch.unique(both, dim=0)) == len(both)


@pytest.mark.parametrize("name", list_datasets())
def test_deterministic_and_seed_dependent(name):
    a, b = load_dataset(name, seed=3), load_dataset(name, seed=3)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    c = load_dataset(name, seed=4)
    assert not torch.equal(a.test, c.test)


def test_global_rng_untouched():
    torch_state = torch.random.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    for name in list_datasets():
        load_dataset(name)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)


def test_2d_splits_are_independent_streams():
    small = load_dataset("gmm", n_train=10, n_test=7)
    big = load_dataset("gmm", n_train=500, n_test=50)
    assert small.train.shape == (10, 2) and small.test.shape == (7, 2)
    # The train stream does not depend on the test size and vice versa.
    assert torch.equal(big.train, load_dataset("gmm", n_train=500, n_test=7).train)
    assert torch.equal(small.test, load_dataset("gmm", n_train=500, n_test=7).test)


def test_digits_grid_and_split():
    ds = load_dataset("digits")
    assert ds.shape == (1, 8, 8)
    assert len(ds.train) == 1497 and len(ds.test) == 300
    assert ds.grid == DIGITS_GRID == (-1.0, 1.0, 17)
    assert ds.delta == pytest.approx(1 / 8)
    both = torch.cat([ds.train, ds.test])
    assert both.min() == -1.0 and both.max() == 1.0
    levels = (both + 1) * 8  # grey levels 0..16
    assert torch.equal(levels, levels.round())
    assert len(torch.unique(levels)) == 17
    # The 1,797 images are pairwise distinct, so row sets tell disjointness.
    assert len(torch.unique(both.flatten(1), dim=0)) == 1797


def test_digits_sizes_and_errors():
    ds = load_dataset("digits", n_train=100, n_test=50)
    assert len(ds.train) == 100 and len(ds.test) == 50
    # Test images depend on the seed only through the permutation.
    assert torch.equal(ds.test, load_dataset("digits", n_test=50).test)
    with pytest.raises(ValueError, match="1797"):
        load_dataset("digits", n_train=1700, n_test=300)


def test_unknown_name_and_bad_arguments():
    with pytest.raises(ValueError) as info:
        load_dataset("mnist")
    for known in list_datasets():
        assert known in str(info.value)
    with pytest.raises(ValueError):
        load_dataset("moons", seed=-1)
    with pytest.raises(ValueError):
        load_dataset("moons", n_train=0)


def test_scg_entropy_analytic_and_monte_carlo():
    ds = load_dataset("scg", n_train=200_000)
    assert round(ds.true_entropy, 4) == 1.2185
    # Not standardised: unit variances, strong negative correlation.
    cov = torch.cov(ds.train.double().T)
    assert torch.allclose(cov, torch.tensor([[1.0, -0.98], [-0.98, 1.0]]).double(), atol=0.02)
    mc = ds.true_nll(ds.train).double().mean().item()  # entropy = E[-log p]
    assert abs(mc - ds.true_entropy) < 0.01


def test_scg_nll_matches_torch_distribution():
    x = load_dataset("scg").test
    cov = torch.tensor([[1.0, -0.495 / 0.505], [-0.495 / 0.505, 1.0]], dtype=torch.float64)
    ref = -torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov).log_prob(x.double())
    assert torch.allclose(scg_nll(x.double()), ref, atol=1e-9)
    assert scg_nll(x).dtype == torch.float32


def _grid_2d(half_width: float, n: int) -> tuple[torch.Tensor, float]:
    """(n*n, 2) float64 grid points on [-h, h]^2 and the cell area."""
    g = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    pts = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    return pts, (g[1] - g[0]).item() ** 2


def test_gmm_density_integrates_to_one_and_entropy():
    pts, area = _grid_2d(6.0, 401)  # spacing 0.03, fine for std >= 0.1
    nll = gmm_nll(pts)
    p = torch.exp(-nll)
    assert (p.sum() * area).item() == pytest.approx(1.0, abs=1e-6)
    entropy = (p * nll).sum().item() * area
    assert entropy == pytest.approx(GMM_ENTROPY, abs=1e-6)
    ds = load_dataset("gmm", n_train=100_000)
    assert ds.true_entropy == GMM_ENTROPY
    assert ds.true_nll(ds.train).double().mean().item() == pytest.approx(GMM_ENTROPY, abs=0.02)


def test_gmm_params_consistent_with_nll():
    means, stds, weights = gmm_params(torch.float64)
    assert means.shape == (8, 2) and stds.shape == (8,) and weights.shape == (8,)
    assert weights.sum().item() == pytest.approx(1.0)
    assert len(torch.unique(stds)) >= 3
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(weights),
        torch.distributions.Independent(
            torch.distributions.Normal(means, stds[:, None].expand(-1, 2)), 1
        ),
    )
    x = load_dataset("gmm").test.double()
    assert torch.allclose(gmm_nll(x), -mix.log_prob(x), atol=1e-9)
    # Fresh tensors each call: callers cannot corrupt the constants.
    means.zero_()
    assert gmm_params()[0].abs().sum() > 0


def test_gmm_nll_broadcasts_leading_dims():
    x = load_dataset("gmm").test[:12].reshape(3, 4, 2)
    assert gmm_nll(x).shape == (3, 4)


def test_square_exact_density():
    ds = load_dataset("square", n_train=20_000)
    assert ds.train.abs().max() <= math.sqrt(3)
    assert ds.true_entropy == pytest.approx(math.log(12))
    assert torch.allclose(ds.true_nll(ds.train), torch.full((20_000,), math.log(12)))
    outside = torch.tensor([[2.0, 0.0], [0.0, -1.8]])
    assert torch.isinf(square_nll(outside)).all()


@pytest.mark.parametrize("name", ["moons", "circles", "swissroll", "digits"])
def test_unknown_densities_are_none(name):
    ds = load_dataset(name)
    assert ds.true_nll is None and ds.true_entropy is None


@pytest.mark.parametrize("name", ["moons", "circles", "square", "swissroll", "scg"])
def test_2d_sets_have_roughly_unit_scale(name):
    std = load_dataset(name, n_train=20_000).train.std(0)
    assert ((std > 0.9) & (std < 1.1)).all()


def test_dataset_is_frozen():
    ds = load_dataset("moons")
    with pytest.raises(AttributeError):
        ds.name = "other"


def test_iterate_batches_in_order():
    x = torch.arange(10.0).reshape(10, 1)
    batches = list(iterate_batches(x, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), x)
    assert [len(b) for b in iterate_batches(x, 4, drop_last=True)] == [4, 4]


def test_iterate_batches_shuffle_is_seeded_permutation():
    x = torch.arange(10.0)
    first = torch.cat(list(iterate_batches(x, 3, shuffle=True, generator=torch.Generator().manual_seed(1))))
    again = torch.cat(list(iterate_batches(x, 3, shuffle=True, generator=torch.Generator().manual_seed(1))))
    assert torch.equal(first, again)
    assert not torch.equal(first, x)
    assert torch.equal(first.sort().values, x)
    with pytest.raises(ValueError):
        next(iterate_batches(x, 3, shuffle=True))
    with pytest.raises(ValueError):
        next(iterate_batches(x, 0))
