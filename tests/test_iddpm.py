"""IDDPM U-Net: checkpoint compatibility, reference outputs, and the denoiser wrapper."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from itdiffusion.denoisers import IDDPMDenoiser, IDDPMUNet, iddpm_alphas_cumprod
from itdiffusion.denoisers.iddpm import timestep_embedding

FIXTURES = Path(__file__).parent / "fixtures" / "iddpm"


TINY = dict(
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=[2],
    dropout=0.0,
    channel_mult=[1, 2],
    num_heads=2,
    use_scale_shift_norm=True,
)


def perturb_(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> torch.nn.Module:
    """Add Gaussian noise to every parameter, so zero-initialised layers matter."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return module


def tiny_net(seed: int = 0, **kw) -> IDDPMUNet:
    torch.manual_seed(seed)  # module initialisation only; test randomness uses generators
    return perturb_(IDDPMUNet(**{**TINY, **kw}), torch.Generator().manual_seed(seed)).eval()


# --------------------------------------------------------------------------- #
# Checkpoint compatibility
# --------------------------------------------------------------------------- #


def test_cifar10_vlb_config_matches_checkpoint_keys_and_shapes():
    ref = json.loads((FIXTURES / "cifar10_uncond_vlb_state_dict_shapes.json").read_text())
    net = IDDPMUNet(**ref["constructor_args"])
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(shapes) == list(ref["state_dict_shapes"])
    assert shapes == ref["state_dict_shapes"]
    assert sum(p.numel() for p in net.parameters()) == ref["parameter_count"] == 52_546_438


def test_small_net_reproduces_reference_output():
    args = json.loads((FIXTURES / "iddpm_small_config.json").read_text())["constructor_args"]
    net = IDDPMUNet(**args).eval()
    net.load_state_dict(load_file(FIXTURES / "iddpm_small_weights.safetensors"), strict=True)
    io = load_file(FIXTURES / "iddpm_small_io.safetensors")
    with torch.no_grad():
        out = net(io["x"], io["t"])
    assert out.shape == io["out"].shape == (3, 6, 32, 32)
    torch.testing.assert_close(out, io["out"], atol=1e-5, rtol=0)


def test_output_convs_start_at_zero():
    net = IDDPMUNet(**TINY)
    assert net.out[2].weight.abs().sum() == 0
    assert net.input_blocks[1][0].out_layers[3].weight.abs().sum() == 0
    attention = [m for m in net.modules() if hasattr(m, "proj_out")]
    assert len(attention) == 4  # down (1), middle (1), up (2) at factor 2
    assert all(m.proj_out.weight.abs().sum() == 0 for m in attention)


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 3.5])
    emb = timestep_embedding(t, 6)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[:, :3], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, 3:], torch.sin(t[:, None] * freqs))
    assert timestep_embedding(t, 7).shape == (2, 7)


# --------------------------------------------------------------------------- #
# Variants
# --------------------------------------------------------------------------- #


def test_class_conditional_variant():
    g = torch.Generator().manual_seed(1)
    net = tiny_net(num_classes=10)
    assert net.label_emb.weight.shape == (10, 128)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        out_a = net(x, t, torch.tensor([0, 1]))
        out_b = net(x, t, torch.tensor([2, 1]))
    assert out_a.shape == (2, 6, 16, 16)
    assert not torch.allclose(out_a[0], out_b[0])
    torch.testing.assert_close(out_a[1], out_b[1])
    with pytest.raises(ValueError, match="class labels"):
        net(x, t)


def test_checkpointing_gives_same_output_and_gradients():
    g = torch.Generator().manual_seed(2)
    plain, ckpt = tiny_net(seed=3), tiny_net(seed=3, use_checkpoint=True)
    plain.train(), ckpt.train()
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([1.0, 900.0])
    out_p, out_c = plain(x, t), ckpt(x, t)
    torch.testing.assert_close(out_p, out_c)
    out_p.square().sum().backward()
    out_c.square().sum().backward()
    for p, c in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, c.grad)


def test_float64_inputs_follow_dtype():
    net = tiny_net().double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert net(x, torch.tensor([5.0], dtype=torch.float64)).dtype == torch.float64


# --------------------------------------------------------------------------- #
# Schedules and the log-SNR -> timestep map
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("steps", [50, 1000, 4000])
def test_cosine_schedule_matches_closed_form(steps):
    abar = iddpm_alphas_cumprod("cosine", steps)
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    closed = torch.tensor([f((i + 1) / steps) / f(0.0) for i in range(steps)], dtype=torch.float64)
    # identical until betas hit the 0.999 clip, which only happens at the very end
    torch.testing.assert_close(abar[: steps - 2], closed[: steps - 2], rtol=1e-10, atol=0)
    assert abar[-1] > 0 and bool((abar[1:] < abar[:-1]).all())


def test_linear_schedule_scales_with_steps():
    abar = iddpm_alphas_cumprod("linear", 4000)
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    torch.testing.assert_close(betas[[0, -1]], torch.tensor([0.25e-4, 0.005], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown noise_schedule"):
        iddpm_alphas_cumprod("quadratic", 10)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [100, 1000, 4000])
def test_logsnr_timestep_round_trip(schedule, steps):
    denoiser = IDDPMDenoiser(torch.nn.Identity(), diffusion_steps=steps, noise_schedule=schedule)
    tmap = denoiser.timesteps
    g = torch.Generator().manual_seed(steps)
    t = torch.rand(500, generator=g, dtype=torch.float64) * (steps - 1)
    t = torch.cat([t, torch.arange(steps, dtype=torch.float64)])
    torch.testing.assert_close(tmap(tmap.logsnr_at(t)), t, atol=1e-4, rtol=0)
    # on the grid, sigmoid(logsnr) is alpha_bar exactly
    grid = tmap.logsnr_at(torch.arange(steps, dtype=torch.float64))
    torch.testing.assert_close(torch.sigmoid(grid), iddpm_alphas_cumprod(schedule, steps))


def test_logsnr_range_and_clamping():
    denoiser = IDDPMDenoiser(torch.nn.Identity(), diffusion_steps=4000)
    lo, hi = denoiser.logsnr_range
    assert lo < -20 and 11 < hi < 12
    t = denoiser.timesteps(torch.tensor([hi + 5, hi, lo, lo - 5], dtype=torch.float64))
    torch.testing.assert_close(t, torch.tensor([0.0, 0.0, 3999.0, 3999.0], dtype=torch.float64))


class RecordingNet(torch.nn.Module):
    """Returns [z, 7 z] (learned-variance layout) and remembers the timesteps it got."""

    def forward(self, x, t):
        self.t = t
        return torch.cat([x, 7 * x], dim=1)


def test_denoiser_feeds_rescaled_time_and_returns_first_half():
    net = RecordingNet()
    denoiser = IDDPMDenoiser(net, diffusion_steps=4000)
    z = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 1234.5, 3999.0], dtype=torch.float64)
    eps_hat = denoiser(z, denoiser.timesteps.logsnr_at(t).float())
    torch.testing.assert_close(eps_hat, z)
    torch.testing.assert_close(net.t, (t * 1000 / 4000).float(), atol=1e-3, rtol=0)
    assert net.t.dtype == torch.float32
    IDDPMDenoiser(net, diffusion_steps=4000, rescale_timesteps=False)(z, torch.tensor(0.0))
    assert 1000 < float(net.t[0]) < 4000  # scalar logsnr broadcasts; raw timestep


def test_gradients_flow_through_logsnr():
    denoiser = IDDPMDenoiser(tiny_net(), diffusion_steps=4000)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 16, 16, generator=g)
    logsnr = torch.tensor([-3.0, 2.5], requires_grad=True)
    eps_hat = denoiser(z, logsnr)
    assert eps_hat.shape == z.shape
    eps_hat.square().sum().backward()
    assert torch.isfinite(logsnr.grad).all() and (logsnr.grad != 0).all()
    # the timestep map alone: dt/da = -1 / (logsnr_t - logsnr_{t+1}) < 0
    a = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    denoiser.timesteps(a).sum().backward()
    assert a.grad.item() < 0
