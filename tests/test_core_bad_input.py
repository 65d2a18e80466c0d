"""Bad input to the core gets a ValueError that names the problem."""

import math

import pytest
import torch

import itdiffusion as itd
from conftest import make_mixture


@pytest.fixture(scope="module")
def model():
    mix = make_mixture(3, seed=0)
    return itd.ITDiffusion(mix, itd.GaussianSpectrum.from_data(mix.sample(500, torch.Generator().manual_seed(0))))


def x3(n=4):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_shape_disagrees_with_spectrum(model):
    with pytest.raises(ValueError, match=r"shape \(4, 5\).*\(3,\)"):
        model.nll(torch.zeros(4, 5), 8, seed=0)


def test_non_finite_data(model):
    x = x3()
    x[1, 2] = math.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.nll(x, 8, seed=0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        itd.evaluate(model, [x], n_points=8)


@pytest.mark.parametrize("n", [0, -1, 1.5])
def test_bad_n_points(model, n):
    with pytest.raises(ValueError, match="n_points"):
        model.nll(x3(), n, seed=0)
    with pytest.raises(ValueError, match="n_points"):
        itd.evaluate(model, [x3()], n_points=n)


def test_denoiser_wrong_shape(model):
    broken = itd.ITDiffusion(lambda z, a: z[:, :2], model.spectrum)
    with pytest.raises(ValueError, match="denoiser returned .*expected the same shape"):
        broken.nll(x3(), 8, seed=0)


def test_denoiser_nan_names_the_logsnr(model):
    def nan_above_two(z, a):
        out = torch.zeros_like(z)
        out[a > 1.0] = math.nan
        return out

    broken = itd.ITDiffusion(nan_above_two, model.spectrum)
    with pytest.raises(ValueError, match=r"NaN or Inf at log-SNR \[1\.\d"):
        broken.nll(x3(), 16, seed=0, placement="midpoint", antithetic=False)


def test_data_off_the_grid(model):
    grid = itd.DiscreteGrid(-1.0, 1.0, 17)
    x = torch.zeros(2, 3)
    x[0, 0] = 0.01
    with pytest.raises(ValueError, match="off the declared grid of 17 levels"):
        model.nll(x, 8, seed=0, discrete=grid)
    with pytest.raises(ValueError, match="outside the grid"):
        model.nll(torch.full((2, 3), 3.0), 8, seed=0, discrete=grid)


def test_full_covariance_with_too_few_samples():
    with pytest.raises(ValueError, match="diagonal=True"):
        itd.GaussianSpectrum.from_data(torch.randn(5, 8))


def test_other_bad_arguments(model):
    with pytest.raises(ValueError, match="rounding"):
        model.nll(x3(), 8, seed=0, rounding="round")
    with pytest.raises(ValueError, match="placement"):
        model.nll(x3(), 8, seed=0, placement="sobol")
    with pytest.raises(ValueError, match="dequantize"):
        itd.evaluate(model, [x3()], n_points=8, dequantize=True)
    with pytest.raises(ValueError, match="no examples"):
        itd.evaluate(model, [], n_points=8)
    with pytest.raises(ValueError, match="levels"):
        itd.DiscreteGrid(-1.0, 1.0, 1)
    with pytest.raises(ValueError, match="scale"):
        itd.ITDiffusion(model.denoiser, model.spectrum, scale=-1.0)
