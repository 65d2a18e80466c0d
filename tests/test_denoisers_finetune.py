"""Fine-tuning pretrained-style denoisers with the information-theoretic loss lowers it."""

import pytest
import torch

from itdiffusion import GaussianSpectrum, ITDiffusion
from itdiffusion.denoisers import DiffusersDenoiser, IDDPMDenoiser, IDDPMUNet


def toy_images(n: int = 16, size: int = 8) -> torch.Tensor:
    """(n, 3, size, size) fixed images in (-1, 1) with spatial and channel correlations."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.randn(n, 1, size, size, generator=g).cumsum(-1).cumsum(-2) / size
    return torch.tanh(smooth.expand(n, 3, size, size) + 0.1 * torch.randn(n, 3, size, size, generator=g))


def mean_loss(model: ITDiffusion, x: torch.Tensor, n_draws: int = 4) -> float:
    """model.loss averaged over fixed generator states (the same before and after training)."""
    with torch.no_grad():
        draws = [model.loss(x, generator=torch.Generator().manual_seed(1000 + i)) for i in range(n_draws)]
    return float(torch.stack(draws).mean())


def finetune(denoiser: torch.nn.Module, x: torch.Tensor, steps: int = 10, lr: float = 1e-3) -> tuple[float, float]:
    """Loss before and after `steps` Adam steps on model.loss(x)."""
    model = ITDiffusion(denoiser, GaussianSpectrum.from_data(x, diagonal=True))
    denoiser.train()
    before = mean_loss(model, x)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model.loss(x, generator=g)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    return before, mean_loss(model, x)


def test_finetuning_a_diffusers_unet_lowers_the_loss():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)  # module initialisation only
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    before, after = finetune(DiffusersDenoiser(unet, {"num_train_timesteps": 1000}), toy_images())
    assert after < 0.8 * before


def test_finetuning_an_iddpm_unet_lowers_the_loss():
    torch.manual_seed(0)  # module initialisation only
    net = IDDPMUNet(
        in_channels=3,
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=[2],
        channel_mult=[1, 2],
        num_heads=2,
        use_scale_shift_norm=True,
    )
    before, after = finetune(IDDPMDenoiser(net, diffusion_steps=1000), toy_images())
    assert after < 0.8 * before
