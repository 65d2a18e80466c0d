import math

import numpy as np
import pytest
import torch

import itdiffusion as itd
from itdiffusion.core.channel import add_noise


def random_gaussian(d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    cov = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=gen, dtype=torch.float64)
    eigs, vecs = torch.linalg.eigh(cov)
    return itd.GaussianSpectrum(mean, vecs, eigs.log(), (d,)), cov


def test_from_data_recovers_covariance():
    spec, cov = random_gaussian(4)
    gen = torch.Generator().manual_seed(1)
    x = spec.mean + torch.randn(200_000, 4, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    est = itd.GaussianSpectrum.from_data(x.float())
    assert torch.allclose(est.mean, spec.mean, atol=0.02)
    assert torch.allclose(est.log_eigs.exp().sort().values, spec.log_eigs.exp().sort().values, rtol=0.03)
    diag = itd.GaussianSpectrum.from_data(x, diagonal=True)
    assert diag.eigvecs is None
    assert torch.allclose(diag.log_eigs.exp(), torch.diagonal(cov), rtol=0.03)


def test_entropy_and_log_prob_match_torch():
    spec, cov = random_gaussian(5)
    mvn = torch.distributions.MultivariateNormal(spec.mean, covariance_matrix=cov)
    x = torch.randn(7, 5, dtype=torch.float64)
    assert spec.entropy() == pytest.approx(mvn.entropy().item(), rel=1e-10)
    assert torch.allclose(spec.log_prob(x), mvn.log_prob(x), atol=1e-10)


@pytest.mark.parametrize("logsnr", [-4.0, 0.0, 3.0])
def test_denoiser_error_is_the_gaussian_mmse(logsnr):
    spec, cov = random_gaussian(6)
    gen = torch.Generator().manual_seed(2)
    n = 100_000
    x = spec.mean + torch.randn(n, 6, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    eps = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    a = torch.full((n,), logsnr, dtype=torch.float64)
    err = ((eps - spec.denoise(add_noise(x, a, eps), a)) ** 2).sum(1)
    assert err.mean().item() == pytest.approx(spec.mmse(torch.tensor(logsnr)).item(), rel=0.01)


def test_error_integral_matches_quadrature():
    spec, _ = random_gaussian(3)
    x = torch.randn(2, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    # expected error at fixed x, by Monte Carlo at one log-SNR, against the closed-form derivative
    a0, n = 0.7, 200_000
    eps = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    xs = x[:1].expand(n, 3)
    a = torch.full((n,), a0, dtype=torch.float64)
    mc = ((eps - spec.denoise(add_noise(xs, a, eps), a)) ** 2).sum(1).mean()
    h = 1e-4
    deriv = (spec.error_integral(x[:1], a0 + h) - spec.error_integral(x[:1], a0 - h)) / (2 * h)
    assert mc.item() == pytest.approx(deriv.item(), rel=0.01)
    # the integral from -inf vanishes far to the left and grows like d*A far to the right
    assert spec.error_integral(x, -60.0).abs().max() < 1e-20
    big = spec.error_integral(x, 60.0)
    maha = -2 * spec.log_prob(x) - spec.log_eigs.sum() - 3 * math.log(2 * math.pi)
    assert torch.allclose(big, 3 * 60.0 + spec.log_eigs.sum() - 3 + maha, rtol=1e-12)


def test_error_integral_in_expectation_is_channel_capacity():
    spec, cov = random_gaussian(4)
    gen = torch.Generator().manual_seed(4)
    x = spec.mean + torch.randn(200_000, 4, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    a_lo = -1.0
    capacity = torch.nn.functional.softplus(a_lo + spec.log_eigs).sum()
    assert spec.error_integral(x, a_lo).mean().item() == pytest.approx(capacity.item(), rel=0.01)


@pytest.mark.parametrize("diagonal", [False, True])
def test_save_load_round_trip(tmp_path, diagonal):
    x = torch.randn(50, 2, 3, generator=torch.Generator().manual_seed(0))
    spec = itd.GaussianSpectrum.from_data(x, diagonal=diagonal)
    path = tmp_path / "spec.npz"
    spec.save(path)
    back = itd.GaussianSpectrum.load(path)
    assert back.shape == (2, 3) and back.diagonal == diagonal
    assert torch.equal(back.mean, spec.mean) and torch.equal(back.log_eigs, spec.log_eigs)
    assert back.loc == spec.loc and back.scale == spec.scale
    with np.load(path, allow_pickle=False) as data:  # plain arrays only
        assert "meta" in data.files
    assert [p.name for p in tmp_path.iterdir()] == ["spec.npz"]  # no temporary left behind


def test_constant_pixels_are_floored():
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
    x[:, 1] = 0.5
    spec = itd.GaussianSpectrum.from_data(x, diagonal=True)
    assert torch.isfinite(spec.log_eigs).all()


def test_bad_input():
    with pytest.raises(ValueError, match="diagonal=True"):
        itd.GaussianSpectrum.from_data(torch.randn(10, 20))
    x = torch.randn(30, 2)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        itd.GaussianSpectrum.from_data(x)
    with pytest.raises(ValueError, match="at least 2"):
        itd.GaussianSpectrum.from_data(torch.randn(1, 2))


def test_load_refuses_garbage(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        itd.GaussianSpectrum.load(bad)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        itd.GaussianSpectrum.load(pickled)
    with pytest.raises(ValueError, match="no such file"):
        itd.GaussianSpectrum.load(tmp_path / "missing.npz")
