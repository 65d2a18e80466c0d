"""One contract for every adapter and network in ``itdiffusion.denoisers`` (as diffusers tests every
scheduler with one suite): ``f(z, logsnr) -> eps_hat`` keeps the input's shape, dtype and device, row i
depends only on row i, and adapters that know their trained log-SNR range expose it."""

import pytest
import torch

from itdiffusion.core.spectrum import GaussianSpectrum
from itdiffusion.denoisers import Denoiser, IDDPMDenoiser, IDDPMUNet
from itdiffusion.denoisers.device import DeviceOptions, OptimizedDenoiser
from itdiffusion.denoisers.nets import GaussianResidual, MLPDenoiser, SmallUNet
from itdiffusion.denoisers.protocol import logsnr_range_of

IMAGE = (3, 8, 8)


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (zero-initialised output layers would hide the network's dependence on z)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module.eval()


def _iddpm(out_channels: int = 3):
    torch.manual_seed(0)
    net = IDDPMUNet(in_channels=3, model_channels=32, out_channels=out_channels, num_res_blocks=1,
                    attention_resolutions=[2], dropout=0.0, channel_mult=[1, 2], num_heads=2,
                    use_scale_shift_norm=True)
    return IDDPMDenoiser(_randomise(net), diffusion_steps=50)


def _diffusers():
    diffusers = pytest.importorskip("diffusers")
    from itdiffusion.denoisers import DiffusersDenoiser

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    return DiffusersDenoiser(_randomise(unet), {"num_train_timesteps": 100})


def _small_unet():
    torch.manual_seed(0)
    return _randomise(SmallUNet(3, base=8, channel_mult=(1, 2), num_res_blocks=1))


def _mlp():
    torch.manual_seed(0)
    return _randomise(MLPDenoiser(5, hidden=16, depth=2, n_freq=4))


def _gaussian_residual():
    torch.manual_seed(0)
    spectrum = GaussianSpectrum.isotropic(IMAGE, variance=0.4)
    return _randomise(GaussianResidual(SmallUNet(3, base=8, channel_mult=(1, 2), num_res_blocks=1, skip=False),
                                       spectrum))


def _optimized():
    return OptimizedDenoiser(_iddpm(), DeviceOptions(channels_last=True))


# name: (builder, example shape, whether it knows its trained log-SNR range)
CASES = {
    "iddpm": (_iddpm, IMAGE, True),
    "iddpm-learned-variance": (lambda: _iddpm(out_channels=6), IMAGE, True),
    "diffusers": (_diffusers, IMAGE, True),
    "small-unet": (_small_unet, IMAGE, False),
    "mlp": (_mlp, (5,), False),
    "gaussian-residual": (_gaussian_residual, IMAGE, False),
    "optimized-iddpm": (_optimized, IMAGE, True),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(shape, n: int, dtype, device, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    logsnr = torch.linspace(-5.0, 7.0, n, dtype=torch.float64).to(dtype=dtype, device=device)
    return z, logsnr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_output_follows_the_input_shape_dtype_and_device(name, dtype, device):
    build, shape, _ = CASES[name]
    denoiser = build().to(device=device, dtype=dtype)
    assert isinstance(denoiser, Denoiser)
    z, logsnr = _inputs(shape, 3, dtype, device)
    with torch.no_grad():
        eps_hat = denoiser(z, logsnr)
    assert eps_hat.shape == z.shape and eps_hat.dtype == dtype and eps_hat.device == z.device
    assert torch.isfinite(eps_hat).all()


@pytest.mark.parametrize("name", sorted(CASES))
def test_rows_are_independent(name):
    build, shape, _ = CASES[name]
    denoiser = build().double()
    z, logsnr = _inputs(shape, 4, torch.float64, "cpu")
    with torch.no_grad():
        full = denoiser(z, logsnr)
        part = denoiser(z[1:3], logsnr[1:3])
        changed = z.clone()
        changed[0] = 3.0 * changed[0] + 1.0
        other = denoiser(changed, logsnr)
    torch.testing.assert_close(part, full[1:3], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(other[1:], full[1:], rtol=1e-9, atol=1e-10)
    assert not torch.allclose(other[0], full[0])  # the output does depend on its own row


@pytest.mark.parametrize("name", sorted(CASES))
def test_logsnr_range_is_exposed_where_known(name):
    build, _, knows = CASES[name]
    got = logsnr_range_of(build())
    if knows:
        assert got is not None and got[0] < got[1]
    else:
        assert got is None
