import math

import pytest
import torch

from itdiffusion.core.proposal import default_loc_scale, logistic_points, logistic_weights


@pytest.mark.parametrize("mode", ["iid", "stratified", "midpoint"])
def test_weights_integrate_known_functions(mode):
    gen = torch.Generator().manual_seed(0)
    loc, scale, clip = 1.5, 2.0, 6.0
    n = 4000
    a, w = logistic_points(n, loc, scale, clip, placement=mode, generator=gen)
    lo, hi = loc - clip * scale, loc + clip * scale
    # constant: the length of the interval
    tol = 0.05 if mode == "iid" else 1e-3
    assert abs(w.sum().item() - (hi - lo)) / (hi - lo) < tol
    # a Gaussian bump and a logistic density (the mmse derivative of a 1-d Gaussian)
    gauss = torch.exp(-0.5 * (a - 2.0) ** 2)
    assert abs((w * gauss).sum().item() - math.sqrt(2 * math.pi)) < (0.05 if mode == "iid" else 1e-4)
    logistic = torch.sigmoid(a - 1.0) * torch.sigmoid(1.0 - a)
    exact = torch.sigmoid(torch.tensor(hi - 1.0)) - torch.sigmoid(torch.tensor(lo - 1.0))
    assert abs((w * logistic).sum().item() - exact.item()) < (0.02 if mode == "iid" else 1e-5)


def test_points_lie_in_range_and_are_sorted():
    gen = torch.Generator().manual_seed(1)
    a, w = logistic_points(100, 0.0, 1.0, 4.0, placement="stratified", batch_shape=(3,), generator=gen)
    assert a.shape == w.shape == (3, 100)
    assert (a >= -4.0).all() and (a <= 4.0).all() and (w > 0).all()
    assert (a.diff(dim=-1) > 0).all()


def test_randomness_only_from_generator():
    torch.manual_seed(0)
    a1, _ = logistic_points(10, 0.0, 1.0, placement="iid", generator=torch.Generator().manual_seed(5))
    torch.manual_seed(99)
    a2, _ = logistic_points(10, 0.0, 1.0, placement="iid", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2)
    with pytest.raises(ValueError, match="Generator"):
        logistic_points(10, 0.0, 1.0, placement="stratified")


def test_grid_is_deterministic_midpoint_rule():
    a, w = logistic_points(4, 0.0, 1.0, 4.0, placement="midpoint")
    u = torch.sigmoid(torch.tensor(-4.0, dtype=torch.float64)) + (
        torch.tanh(torch.tensor(2.0, dtype=torch.float64))
    ) * (torch.arange(4, dtype=torch.float64) + 0.5) / 4
    assert torch.allclose(a, torch.logit(u))
    assert torch.allclose(w, logistic_weights(a, 0.0, 1.0, 4.0) / 4)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_n_points(bad):
    with pytest.raises(ValueError, match="n_points"):
        logistic_points(bad, 0.0, 1.0)


def test_default_loc_scale_moment_match():
    log_eigs = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)
    loc, scale = default_loc_scale(log_eigs)
    assert loc == pytest.approx(0.0)
    assert scale == pytest.approx(math.sqrt(1 + 3 / math.pi**2 * 8 / 3))
