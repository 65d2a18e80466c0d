"""Tests for the denoiser networks (itdiffusion.denoisers.nets)."""

import math

import pytest
import torch

from itdiffusion.denoisers.nets import FourierFeatures, LogSNREmbedding, MLPDenoiser, SmallUNet


def _make(cls, **kwargs):
    """Build a module without disturbing the global RNG state."""
    with torch.random.fork_rng():
        return cls(**kwargs)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def mlp():
    return _make(MLPDenoiser, d=2)


@pytest.fixture(scope="module")
def unet():
    return _make(SmallUNet)


def test_mlp_shapes_and_batch_varying_logsnr(mlp):
    z = _randn(7, 2)
    logsnr = torch.linspace(-15, 20, 7)
    eps_hat = mlp(z, logsnr)
    assert eps_hat.shape == (7, 2) and eps_hat.dtype == torch.float32
    # Each example depends only on its own (z, logsnr): batch and one-by-one agree.
    single = torch.cat([mlp(z[i : i + 1], logsnr[i : i + 1]) for i in range(7)])
    assert torch.allclose(eps_hat, single, atol=1e-5)


@pytest.mark.parametrize("d", [1, 3, 16])
def test_mlp_other_dimensions(d):
    net = _make(MLPDenoiser, d=d, hidden=32, depth=1, n_freq=4)
    assert net(_randn(5, d), torch.zeros(5)).shape == (5, d)


@pytest.mark.parametrize("size,channels", [(8, 1), (16, 1), (32, 3)])
def test_unet_shapes(size, channels):
    net = _make(SmallUNet, channels=channels, base=16)
    z = _randn(3, channels, size, size)
    assert net(z, torch.tensor([-15.0, 0.0, 20.0])).shape == z.shape


def test_unet_batch_varying_logsnr(unet):
    z = _randn(4, 1, 8, 8)
    logsnr = torch.tensor([-10.0, -1.0, 3.0, 12.0])
    batched = unet(z, logsnr)
    single = torch.cat([unet(z[i : i + 1], logsnr[i : i + 1]) for i in range(4)])
    assert torch.allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("make,shape", [
    (lambda: _make(MLPDenoiser, d=2), (4, 2)),
    (lambda: _make(SmallUNet, base=16), (4, 1, 8, 8)),
])
def test_dtype_follows_input(make, shape):
    net = make().double()
    out = net(_randn(*shape, dtype=torch.float64), torch.zeros(shape[0], dtype=torch.float64))
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    # float32 logsnr with float64 z is accepted and cast to z's dtype.
    assert net(_randn(*shape, dtype=torch.float64), torch.zeros(shape[0])).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_follows_input():
    net = _make(SmallUNet, base=16).cuda()
    out = net(_randn(2, 1, 8, 8).cuda(), torch.zeros(2).cuda())
    assert out.device.type == "cuda"


def test_scalar_logsnr_is_broadcast(mlp):
    z = _randn(5, 2)
    assert torch.allclose(mlp(z, 3.0), mlp(z, torch.full((5,), 3.0)))
    assert mlp(z, torch.tensor(3.0)).shape == (5, 2)


def test_bad_shapes_raise(mlp, unet):
    with pytest.raises(ValueError):
        mlp(_randn(5, 3), torch.zeros(5))
    with pytest.raises(ValueError):
        mlp(_randn(5, 2), torch.zeros(4))
    with pytest.raises(ValueError):
        unet(_randn(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError):
        unet(_randn(2, 1, 7, 7), torch.zeros(2))


@pytest.mark.parametrize("make,shape", [
    (lambda: _make(MLPDenoiser, d=2, hidden=32), (6, 2)),
    (lambda: _make(SmallUNet, base=16), (3, 1, 8, 8)),
])
def test_gradients_reach_every_parameter(make, shape):
    net = make()
    # Perturb the zero-initialised output layer so gradients flow to all layers.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * _randn(*p.shape, seed=p.numel()))
    z = _randn(*shape).requires_grad_()
    logsnr = torch.linspace(-5, 5, shape[0]).requires_grad_()
    net(z, logsnr).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert z.grad.abs().sum() > 0 and logsnr.grad.abs().sum() > 0


@pytest.mark.parametrize("make,shape", [
    (lambda: _make(MLPDenoiser, d=2), (5, 2)),
    (lambda: _make(SmallUNet, base=16), (5, 1, 8, 8)),
])
def test_untrained_output_is_gaussian_skip(make, shape):
    """Zero-initialised output: eps_hat = sqrt(sigmoid(-a)) z, optimal for N(0, I)."""
    net = make()
    z = _randn(*shape)
    logsnr = torch.tensor([-20.0, -2.0, 0.0, 2.0, 20.0])
    expected = torch.sigmoid(-logsnr).sqrt().view(-1, *[1] * (len(shape) - 1)) * z
    assert torch.allclose(net(z, logsnr), expected, atol=1e-6)


def test_skip_can_be_disabled():
    net = _make(MLPDenoiser, d=2, skip=False)
    assert torch.equal(net(_randn(3, 2), torch.zeros(3)), torch.zeros(3, 2))


def test_parameter_counts_in_sane_range(mlp, unet):
    assert 50_000 < _n_params(mlp) < 300_000
    assert 200_000 < _n_params(unet) < 1_000_000
    assert _n_params(_make(SmallUNet, channels=3)) < 1_000_000


def test_construction_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    _make(MLPDenoiser, d=2)
    _make(SmallUNet, base=16)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_embeddings_shapes_and_range():
    emb = LogSNREmbedding(n_freq=8)
    out = emb(torch.linspace(-20, 20, 11))
    assert out.shape == (11, emb.dim) == (11, 17)
    assert out.abs().max() <= 1.0 + 1e-6
    # Distinct log-SNR values one unit apart get distinct embeddings.
    near = emb(torch.tensor([3.0, 4.0]))
    assert (near[0] - near[1]).norm() > 0.5
    ff = FourierFeatures(n_freq=4)
    assert ff(_randn(3, 2)).shape == (3, 2 * 2 * 4)
    assert ff.freqs[0].item() == pytest.approx(0.5) and ff.freqs[-1].item() == pytest.approx(32.0)


def test_unet_three_levels_needs_divisible_size():
    net = _make(SmallUNet, base=16, channel_mult=(1, 2, 2))
    assert net(_randn(2, 1, 8, 8), torch.zeros(2)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(_randn(2, 1, 6, 6), torch.zeros(2))


def test_state_dict_has_no_buffers_to_save(mlp):
    # Fixed frequency tables are recomputed, not stored in checkpoints.
    assert all("freqs" not in key for key in mlp.state_dict())
    clone = _make(MLPDenoiser, d=2)
    clone.load_state_dict(mlp.state_dict())
    z = _randn(4, 2)
    assert torch.equal(clone(z, torch.zeros(4)), mlp(z, torch.zeros(4)))
    assert math.isfinite(clone(z, torch.full((4,), 20.0)).abs().max().item())
