"""``protocol="paper"``: the published points, and estimates equal to an independent float64
restatement of the published arithmetic (tests/reference/published_arithmetic.py) fed the same
points and noise, on the trained digits DDPM fixture."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import itdiffusion as itd
from itdiffusion.core.noise import draw_example_noise
from itdiffusion.protocols import PAPER_CLIP, published_loc_scale, published_points

sys.path.insert(0, str(Path(__file__).parent / "reference"))
from published_arithmetic import per_point_errors, published_estimates, published_points_reference  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "digits-ddpm"


def test_points_are_the_published_construction():
    loc, scale = 6.2, 3.1
    want_a, want_w = published_points_reference(1000, loc, scale, PAPER_CLIP)
    state = torch.random.get_rng_state()
    logsnr, weights, order = published_points(1000, loc, scale, PAPER_CLIP, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not touched
    assert torch.equal(logsnr.float(), want_a[order]) and torch.equal(logsnr, want_a[order].double())
    torch.testing.assert_close(weights * 1000, want_w[order].double(), rtol=1e-6, atol=0)
    assert torch.all(logsnr[1:] >= logsnr[:-1])
    assert torch.equal(logsnr[:5].float(), want_a.sort().values[:5])


def test_loc_scale_use_the_unbiased_variance_and_3_over_pi():
    log_eigs = torch.tensor([-4.0, -1.0, 0.5, 2.0])
    loc, scale = published_loc_scale(log_eigs)
    assert loc == pytest.approx(0.625)
    assert scale == pytest.approx(np.sqrt(1 + 3 / np.pi * np.var(log_eigs.numpy(), ddof=1)))


@pytest.fixture(scope="module")
def digits_case():
    pytest.importorskip("diffusers")
    from itdiffusion.data.toy import load_dataset
    from itdiffusion.denoisers import DiffusersDenoiser

    data = load_dataset("digits")
    spectrum = itd.GaussianSpectrum.from_data(data.train)
    grid = itd.DiscreteGrid(-1.0, 1.0, 17)
    model = itd.ITDiffusion(DiffusersDenoiser.from_pretrained(FIXTURE), spectrum)
    return model, data.test[:24].float(), grid


@pytest.mark.parametrize("soft", [True, False])
def test_estimates_equal_an_independent_restatement(digits_case, soft):
    model, x, grid = digits_case
    m, seed = 40, 0
    results = itd.evaluate(model, [x[:10], x[10:]], m, discrete=grid, soft=soft, dequantize=True,
                           protocol="paper", seed=seed)
    loc, scale = published_loc_scale(model.spectrum.log_eigs)
    logsnr, weights = published_points_reference(m, loc, scale)
    logsnr, order = logsnr.sort(stable=True)
    weights = weights[order]
    noise = draw_example_noise(seed, range(len(x)), m, tuple(x.shape[1:]), dequantize=True)
    errors = per_point_errors(model.denoiser, x, logsnr, noise.eps, noise.dequant, grid.lo, grid.hi, grid.delta)
    lo_a, hi_a = loc - PAPER_CLIP * scale, loc + PAPER_CLIP * scale
    want = published_estimates(errors, logsnr, weights, model.spectrum.log_eigs, lo_a, hi_a,
                               grid.lo, grid.hi, grid.delta, rounding="soft" if soft else "hard")
    got = results.estimates
    for name in ("continuous_gauss_min", "dequantized_gauss_min", "discrete_published_min"):
        assert got[name].nats == pytest.approx(want[name], rel=1e-4), name
    np.testing.assert_allclose(results.terms["continuous"].nll_nats, want["continuous_per_image"].numpy(), rtol=1e-4)
    np.testing.assert_allclose(results.terms["discrete"].nll_nats, want["discrete_per_image"].numpy(), rtol=1e-4)
    # the published figure is below (or at) the rounded-only bound, and both are far above the continuous one
    assert got["discrete_published_min"].nats <= got["discrete"].nats + 1e-9


def test_paper_results_carry_both_standard_errors(digits_case):
    model, x, grid = digits_case
    results = itd.evaluate(model, [x], 30, discrete=grid, soft=True, protocol="paper", seed=0)
    se = results.config["standard_errors"]
    assert set(se) == {"method", "values", "published"}
    assert se["values"]["discrete_published_min"] > 0 and se["published"]["discrete"] > 0
    assert results.estimates["discrete_published_min"].se_nats == se["values"]["discrete_published_min"]
    assert results.config["protocol"] == "paper" and results.config["clip"] == PAPER_CLIP
