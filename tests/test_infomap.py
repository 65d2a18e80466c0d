"""Per-dimension information maps (issue 18): they sum to nll at the same seed, and their
per-dimension means match the exact per-dimension -log P(x_i) of a product law."""

import pytest
import torch

import itdiffusion as itd
from itdiffusion.core.analytic import ProductDiscrete

from conftest import make_mixture


def product_law():
    grid = itd.DiscreteGrid(-1, 1, 5)
    probs = torch.softmax(torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.5, 1)
    law = ProductDiscrete(grid, probs)
    x = law.sample(2000, torch.Generator().manual_seed(0))
    return grid, probs, law, x


@pytest.mark.parametrize("rounding", ["none", "hard", "soft"])
@pytest.mark.parametrize("diagonal", [True, False])
def test_discrete_map_sums_to_nll(rounding, diagonal):
    grid, _, law, x = product_law()
    model = itd.ITDiffusion(law, itd.GaussianSpectrum.from_data(x, diagonal=diagonal))
    xb = x[:12]
    nll_map = model.nll_map(xb, 24, seed=5, discrete=grid, rounding=rounding)
    assert nll_map.shape == xb.shape
    nll = model.nll(xb, 24, seed=5, discrete=grid, rounding=rounding)
    torch.testing.assert_close(nll_map.sum(1), nll, rtol=0, atol=1e-10)


@pytest.mark.parametrize("diagonal,antithetic", [(True, True), (False, True), (False, False)])
def test_continuous_map_sums_to_nll(diagonal, antithetic):
    mix = make_mixture(12, seed=2)
    x = mix.sample(300, torch.Generator().manual_seed(0)).reshape(300, 3, 4)
    model = itd.ITDiffusion(mix, itd.GaussianSpectrum.from_data(x, diagonal=diagonal))
    nll_map = model.nll_map(x[:7], 32, seed=1, antithetic=antithetic)
    assert nll_map.shape == (7, 3, 4)
    torch.testing.assert_close(nll_map.flatten(1).sum(1), model.nll(x[:7], 32, seed=1, antithetic=antithetic),
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("diagonal", [True, False])
def test_product_law_map_matches_exact_per_dimension(diagonal):
    """Also with a full spectrum, whose eigenvectors (of a nearly diagonal sample covariance)
    mix the coordinates: the Gaussian part is assigned so that it cancels per dimension."""
    grid, probs, law, xs = product_law()
    model = itd.ITDiffusion(law, itd.GaussianSpectrum.from_data(xs, diagonal=diagonal))
    x = xs[:1].expand(2000, -1).clone()  # one point, 2000 independent estimates of its map
    nll_map = model.nll_map(x, 64, seed=2, discrete=grid, rounding="none")
    exact = -probs.log()[torch.arange(4), grid.round_index(x[0]).long()]
    err = nll_map.mean(0) - exact
    se = nll_map.std(0) / len(x) ** 0.5
    print(f"\nper-dimension map: exact {exact.numpy().round(3)}, error {err.numpy().round(4)}, se {se.numpy().round(4)}")
    assert (err.abs() < 4 * se).all()


def test_mi_map_sums_to_mi():
    law = itd.ClassMixture(torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 0.8)
    x, labels = law.sample_labelled(10, torch.Generator().manual_seed(1))
    model = itd.ITDiffusion(law, itd.GaussianSpectrum.from_data(x, diagonal=False))
    mi_map = model.mi_map(x, labels, 16, seed=0)
    torch.testing.assert_close(mi_map.sum(1), model.mi(x, labels, 16, seed=0), rtol=0, atol=1e-10)
    nll_map = model.nll_map(x, 16, seed=0, y=labels)
    torch.testing.assert_close(nll_map.sum(1), model.nll(x, 16, seed=0, y=labels), rtol=0, atol=1e-10)
