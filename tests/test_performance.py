"""Fast paths equal slow paths: soft rounding, one network call, batching across points, device options."""

import math

import pytest
import torch
from torch import nn

import itdiffusion as itd
from itdiffusion.core import softround
from itdiffusion.core.channel import add_noise, x_from_eps
from itdiffusion.core.errors import soft_rounding_variance
from itdiffusion.core.grid import soft_round_index_dense
from itdiffusion.denoisers.nets import SmallUNet
from itdiffusion.denoisers.device import DeviceOptions, OptimizedDenoiser, optimize_denoiser


# ----------------------------------------------------------------------------- soft rounding
def _dense(levels, t, tau):
    return softround.soft_round_index_dense(levels, t, tau)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_soft_rounding_equals_full_sum_in_every_regime(levels):
    """Rows at every noise level (window, closed form, steep fallback) against the full softmax."""
    gen = torch.Generator().manual_seed(levels)
    taus = torch.tensor([1e-3, 0.05, 0.3, 0.9, 1.7, 2.4, 2.5, 2.6, 3.5, 8.0, 40.0, 127.0, 1e3, 1e5], dtype=torch.float64)
    rows = []
    for tau in taus.tolist():
        reach = 4 * tau + 3
        inside = torch.rand(40, generator=gen, dtype=torch.float64) * (levels + 2) - 1.5
        outside = torch.rand(40, generator=gen, dtype=torch.float64) * (levels + 2 * reach) - reach
        halves = torch.arange(-1, levels + 1, dtype=torch.float64)[:20] + 0.5  # exactly between levels
        rows.append(torch.cat([inside, outside, halves, torch.full((20 - len(halves),), 0.5, dtype=torch.float64)]))
    t = torch.stack(rows)
    fast = softround.soft_round_index(levels, t, taus, max_elements=300)  # tiny chunks
    dense = _dense(levels, t, taus)
    assert torch.isfinite(fast).all()
    assert (fast - dense).abs().max().item() < 1e-6
    # the bulk agrees to far better than the tolerance
    assert (fast - dense).abs().median().item() < 1e-12


def test_soft_rounding_regimes_are_all_exercised():
    t = torch.tensor([[-40.0, 3.2]], dtype=torch.float64)
    _, steep = softround.closed_form_mean(256, t, torch.tensor([[3.0]], dtype=torch.float64))
    assert steep.tolist() == [[True, False]]  # 39.5 steps outside > SLOPE_MAX * 9


def test_grid_soft_round_matches_dense_reference_across_points():
    """A batch mixing log-SNR points (as batching across points produces) equals the full sum."""
    grid = itd.DiscreteGrid(-1.0, 1.0, 256)
    gen = torch.Generator().manual_seed(0)
    logsnr = torch.linspace(-8.0, 20.0, 29, dtype=torch.float64)
    x = torch.randint(0, 256, (29, 3, 4, 4), generator=gen).double() * grid.delta - 1
    x_hat = x + torch.randn(x.shape, generator=gen, dtype=torch.float64) * torch.exp(-0.5 * logsnr).reshape(-1, 1, 1, 1)
    fast = grid.soft_round_index(x_hat, logsnr)
    assert fast.shape == x_hat.shape and fast.dtype == torch.float64
    assert (fast - soft_round_index_dense(grid, x_hat, logsnr)).abs().max().item() < 1e-6


def test_soft_rounding_memory_is_bounded_by_max_elements(monkeypatch):
    """No temporary grows with levels * elements: every exp() sees at most max_elements values."""
    sizes = []
    real_exp = torch.exp

    def spy(x, *a, **k):
        sizes.append(x.numel())
        return real_exp(x, *a, **k)

    levels, n = 256, 4000
    t = torch.rand(8, n, dtype=torch.float64) * 300 - 20
    tau = torch.tensor([1e-2, 0.5, 1.0, 2.0, 3.0, 30.0, 300.0, 3000.0], dtype=torch.float64)
    monkeypatch.setattr(softround.torch, "exp", spy)
    softround.soft_round_index(levels, t, tau, max_elements=20 * n)
    assert max(sizes) <= 20 * n < levels * t.numel()


# ----------------------------------------------------------------------------- one call, batching
class Counting(nn.Module):
    """Counts the examples the wrapped denoiser sees."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0
        self.examples = 0

    def forward(self, z, logsnr):
        self.calls += 1
        self.examples += len(z)
        return self.net(z, logsnr)


def _digits_like_model(seed=0, float64=False):
    torch.manual_seed(seed)
    net = SmallUNet(channels=1, base=16)
    nn.init.normal_(net.conv_out.weight, std=0.05)  # not the zero init: a non-trivial denoiser
    if float64:
        net = net.double()
    gen = torch.Generator().manual_seed(seed)
    grid = itd.DiscreteGrid(-1.0, 1.0, 17)
    data = torch.randint(0, 17, (400, 1, 8, 8), generator=gen).float() * grid.delta - 1
    spec = itd.GaussianSpectrum.from_data(data, diagonal=True)
    return itd.ITDiffusion(Counting(net), spec), grid, data


def test_one_call_gives_raw_and_rounded_errors_equal_to_separate_calls():
    model, grid, data = _digits_like_model(float64=True)
    gen = torch.Generator().manual_seed(1)
    x = data[:6].double()
    logsnr = torch.tensor([-3.0, 0.0, 2.0, 5.0, 8.0, 12.0], dtype=torch.float64)
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    counter = model.denoiser
    errs = model.errors(x, logsnr, eps, discrete=grid, roundings=("hard", "soft"), clamp=(-1.0, 1.0))
    assert counter.calls == 1

    # Separately: the raw error from one call, the rounded errors from a second call on the same noise.
    raw = model.errors(x, logsnr, eps, clamp=(-1.0, 1.0)).raw
    z = add_noise(x, logsnr, eps)
    eps_hat = counter(z, logsnr)
    assert counter.calls == 3
    x_hat = x_from_eps(z, eps_hat, logsnr)
    snr = torch.exp(logsnr).reshape(-1, 1, 1, 1)
    hard = (snr * (x - grid.round(x_hat)) ** 2).flatten(1).sum(1)
    soft_value = grid.value(soft_round_index_dense(grid, x_hat, logsnr, soft_rounding_variance(model.spectrum, logsnr)))
    soft = (snr * (x - soft_value) ** 2).flatten(1).sum(1)
    assert torch.allclose(errs.raw, raw, rtol=1e-12, atol=0)
    assert torch.allclose(errs.hard, hard, rtol=1e-9, atol=1e-9)
    assert torch.allclose(errs.soft, soft, rtol=1e-6, atol=1e-9)


def test_batching_across_points_equals_looping_over_points():
    model, grid, data = _digits_like_model()
    gen = torch.Generator().manual_seed(2)
    x = data[:5]
    logsnr = torch.linspace(-4.0, 12.0, 7, dtype=torch.float64)
    eps = torch.randn(5, 7, 1, 8, 8, generator=gen)
    kwargs = dict(discrete=grid, roundings=("hard", "soft"), clamp=(-1.0, 1.0))
    counter = model.denoiser
    batched = model.point_errors(x, logsnr, eps, batch_size=8, **kwargs)  # chunks mix points
    assert counter.examples == 35 and counter.calls == math.ceil(35 / 8)
    looped = [model.errors(x, logsnr[j].expand(5), eps[:, j], **kwargs) for j in range(7)]
    for field in ("raw", "gauss", "hard", "soft"):
        loop = torch.stack([getattr(e, field) for e in looped], 1)
        assert torch.allclose(getattr(batched, field), loop, rtol=1e-5, atol=1e-6), field


@pytest.mark.parametrize("dequantize", [False, True])
def test_evaluation_calls_per_image_and_point(dequantize):
    """Continuous, hard- and soft-rounded from one call; dequantization is the only second call."""
    model, grid, data = _digits_like_model()
    counter = model.denoiser
    n_points, x = 12, data[:5]
    res = itd.evaluate(model, [x], n_points, discrete=grid, soft=True, dequantize=dequantize, batch_size=16)
    assert counter.examples == len(x) * n_points * (2 if dequantize else 1)
    assert "mmse_soft" in res.curves and "mmse_hard" in res.curves


# ----------------------------------------------------------------------------- device options
def _net_and_input():
    torch.manual_seed(0)
    net = SmallUNet(channels=3, base=16).eval()
    nn.init.normal_(net.conv_out.weight, std=0.05)
    z = torch.randn(6, 3, 8, 8)
    logsnr = torch.linspace(-5, 5, 6)
    return net, z, logsnr


def test_default_options_return_the_denoiser_itself():
    net, _, _ = _net_and_input()
    assert optimize_denoiser(net) is net
    assert optimize_denoiser(net, DeviceOptions()) is net
    with pytest.raises(ValueError, match="dtype"):
        DeviceOptions(dtype="fp8")


@torch.no_grad()
def test_channels_last_and_compile_preserve_fp32_outputs():
    net, z, logsnr = _net_and_input()
    ref = net(z, logsnr)
    for options in (DeviceOptions(channels_last=True), DeviceOptions(compile=True, compile_backend="eager")):
        wrapped = optimize_denoiser(net, options)
        out = wrapped(z, logsnr)
        assert isinstance(wrapped, OptimizedDenoiser)
        assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == z.shape
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_is_close_and_returns_float32(dtype):
    net, z, logsnr = _net_and_input()
    ref = net(z, logsnr)
    try:
        out = optimize_denoiser(net, DeviceOptions(dtype=dtype))(z, logsnr)
    except RuntimeError as err:  # autocast dtype unsupported on this CPU build
        pytest.skip(str(err))
    assert out.dtype == torch.float32
    rel = (out - ref).norm() / ref.norm()
    assert rel < 2e-2


@torch.no_grad()
def test_bf16_errors_are_accumulated_in_float64():
    model, grid, data = _digits_like_model()
    fast = itd.ITDiffusion(optimize_denoiser(model.denoiser.net, DeviceOptions(dtype="bf16")), model.spectrum)
    x = data[:4]
    nll_ref = model.nll(x, 32, seed=0, discrete=grid, rounding="soft")
    nll_bf16 = fast.nll(x, 32, seed=0, discrete=grid, rounding="soft")
    assert nll_bf16.dtype == torch.float64
    assert torch.allclose(nll_bf16, nll_ref, rtol=2e-2)


def test_wrapper_state_dict_is_the_inner_networks():
    net, z, logsnr = _net_and_input()
    spec = itd.GaussianSpectrum.isotropic((3, 8, 8))
    plain = itd.ITDiffusion(net, spec)
    wrapped = itd.ITDiffusion(optimize_denoiser(net, DeviceOptions(channels_last=True)), spec)
    assert list(plain.state_dict()) == list(wrapped.state_dict())
    # A checkpoint written without the wrapper loads into a wrapped model (strictly), and back.
    torch.manual_seed(5)
    other = SmallUNet(channels=3, base=16)
    nn.init.normal_(other.conv_out.weight, std=0.05)
    wrapped.load_state_dict(itd.ITDiffusion(other, spec).state_dict())
    with torch.no_grad():
        assert torch.allclose(wrapped.denoiser(z, logsnr), other(z, logsnr), rtol=1e-5, atol=1e-6)
    plain2 = itd.ITDiffusion(SmallUNet(channels=3, base=16), spec)
    plain2.load_state_dict(wrapped.state_dict())
    # Training through the wrapper reaches the inner parameters.
    params = {id(p) for p in wrapped.parameters()}
    assert all(id(p) in params for p in net.parameters())


def test_wrapper_passes_attributes_and_arguments_through():
    class WithLabels(nn.Module):
        logsnr_range = (-3.0, 3.0)

        def forward(self, z, logsnr, y=None):
            return z * (1.0 if y is None else y.reshape(-1, 1))

    wrapped = optimize_denoiser(WithLabels(), DeviceOptions(dtype="bf16"))
    assert wrapped.logsnr_range == (-3.0, 3.0)
    z = torch.ones(2, 5)
    out = wrapped(z, torch.zeros(2), y=torch.tensor([2.0, 3.0]))
    assert out.dtype == torch.float32 and out[:, 0].tolist() == [2.0, 3.0]


# ----------------------------------------------------------------------------- Gaussian control variate
@pytest.mark.parametrize("diagonal", [False, True])
def test_gaussian_error_in_the_eigenbasis_equals_the_direct_one(diagonal):
    gen = torch.Generator().manual_seed(3)
    data = torch.randn(300, 12, generator=gen, dtype=torch.float64) @ torch.randn(12, 12, generator=gen, dtype=torch.float64)
    spec = itd.GaussianSpectrum.from_data(data + 0.3, diagonal=diagonal)
    x = data[:7]
    eps = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    logsnr = torch.tensor([-30.0, -8.0, -1.0, 0.0, 3.0, 9.0, 30.0], dtype=torch.float64)
    z = add_noise(x, logsnr, eps)
    direct = ((eps - spec.denoise(z, logsnr)) ** 2).sum(1)
    fast = spec.denoise_error(x, logsnr, eps)
    assert torch.allclose(fast, direct, rtol=1e-9, atol=1e-12)
    assert torch.equal(spec.denoise_error(x, logsnr, eps, x_eig=spec.to_eigenbasis(x)), fast)
    assert torch.equal(spec.log_prob(x, x_eig=spec.to_eigenbasis(x)), spec.log_prob(x))


def test_training_loss_matches_the_direct_gaussian_terms():
    """The loss's Gaussian terms, from one rotation of x and eps together, equal the direct formulas."""
    gen = torch.Generator().manual_seed(8)
    data = torch.randn(300, 2, 3, generator=gen, dtype=torch.float64)
    spec = itd.GaussianSpectrum.from_data(data)

    def denoiser(z, a):
        return 0.9 * spec.denoise(z, a)

    model = itd.ITDiffusion(denoiser, spec, train_clip=4.0, train_proposal="uniform")
    x = data[:16]
    value = model.loss(x, torch.Generator().manual_seed(0))
    # The same draws, in the loss's order, and the direct formulas.
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(16, generator=g).double()
    frac = (order + torch.rand(16, generator=g, dtype=torch.float64)) / 16
    lo, hi = model.logsnr_range(4.0)
    logsnr = lo + (hi - lo) * frac
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
    z = add_noise(x, logsnr, eps)
    err = ((eps - denoiser(z, logsnr)) ** 2).flatten(1).sum(1)
    err_g = ((eps - spec.denoise(z, logsnr)) ** 2).flatten(1).sum(1)
    expected = (-spec.log_prob(x) + 0.5 * (hi - lo) * (err - err_g)).mean()
    assert torch.allclose(value, expected, rtol=1e-10)


def test_gaussian_error_in_the_eigenbasis_equals_the_direct_formula():
    gen = torch.Generator().manual_seed(4)
    data = torch.randn(200, 2, 3, generator=gen, dtype=torch.float64)
    spec = itd.GaussianSpectrum.from_data(data)
    model = itd.ITDiffusion(spec, spec)  # the Gaussian as its own denoiser
    x = data[:3]
    logsnr = torch.linspace(-3.0, 3.0, 5, dtype=torch.float64)
    eps = torch.randn(3, 5, 2, 3, generator=gen, dtype=torch.float64)
    errs = model.point_errors(x, logsnr, eps, batch_size=4)
    pairs_x = x.unsqueeze(1).expand(3, 5, 2, 3).reshape(-1, 2, 3)
    a = logsnr.repeat(3)
    z = add_noise(pairs_x, a, eps.reshape(-1, 2, 3))
    direct = ((eps.reshape(-1, 2, 3).double() - spec.denoise(z, a).double()) ** 2).flatten(1).sum(1)
    assert torch.allclose(errs.gauss.reshape(-1), direct, rtol=1e-9)


# ----------------------------------------------------------------------------- the benchmarks' reference loop
def _published_loop():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "published_loop.py"
    spec = importlib.util.spec_from_file_location("published_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_published_loop_reimplementation_estimates_the_same_quantities():
    """The benchmarks' re-implementation of the published loop is a correct (if slower) estimator."""
    loop = _published_loop()
    grid = itd.DiscreteGrid(-1.0, 1.0, 17)
    gen = torch.Generator().manual_seed(6)
    x_hat = torch.randn(3, 10, generator=gen)
    published_var = torch.full((3,), 1.0 / (1.0 + math.exp(2.0)))  # sigmoid(-a), the published kernel
    assert torch.allclose(loop.dense_soft_round(x_hat, 2.0, grid),
                          grid.value(grid.soft_round_index(x_hat, torch.full((3,), 2.0), noise_var=published_var)).float(),
                          atol=1e-5)
    # With the exact denoiser of Gaussian data, the continuous estimate is -log N(x) on average.
    spec = itd.GaussianSpectrum.isotropic((8,), variance=0.2)
    model = itd.ITDiffusion(spec, spec, clip=6.0)
    x = torch.randn(400, 8, generator=gen) * math.sqrt(0.2)
    quad = model.estimator(64, placement="midpoint", clip=6.0, antithetic=False).shared_quadrature()
    logsnr, weights = quad.logsnr, quad.weights
    out = loop.published_evaluation(lambda z, a: spec.denoise(z, a), x, logsnr.float(), weights.float(), grid,
                                    spec, gen)
    err = out["continuous"].double() + spec.log_prob(x)
    assert abs(err.mean().item()) < 4 * err.std().item() / math.sqrt(len(err)) + 0.05
    assert set(out) == {"continuous", "discrete", "dequantized"}
