"""diffusers adapter: schedules, log-SNR -> timestep, prediction types, save/load, registry."""

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from itdiffusion.denoisers import (  # noqa: E402
    DiffusersDenoiser,
    build_denoiser,
    diffusers_alphas_cumprod,
    eps_from_prediction,
    list_models,
    model_spec,
)

FIXTURES = Path(__file__).parent / "fixtures" / "ddpm-cifar10-32"

TINY_UNET = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}


def tiny_unet(seed: int = 0, **kw):
    torch.manual_seed(seed)  # module initialisation only
    return diffusers.UNet2DModel(**{**TINY_UNET, **kw}).eval()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_same_network(loaded: DiffusersDenoiser, original: DiffusersDenoiser, z, logsnr):
    """Bit-identical weights; outputs equal up to float32 rounding (weights loaded from a
    file sit at other memory alignments, which changes the CPU kernels' summation order)."""
    for (name, a), (_, b) in zip(loaded.unet.state_dict().items(), original.unet.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, logsnr), original(z, logsnr), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- #
# The pretrained architecture
# --------------------------------------------------------------------------- #


def test_ddpm_cifar10_config_parameter_count():
    config = json.loads((FIXTURES / "config.json").read_text())
    unet = diffusers.UNet2DModel(**config)
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307
    registered = model_spec("ddpm-cifar10")
    assert {k: v for k, v in config.items() if not k.startswith("_")} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in registered.config.items()
    }
    scheduler = json.loads((FIXTURES / "scheduler_config.json").read_text())
    assert {k: v for k, v in scheduler.items() if not k.startswith("_")}.items() <= registered.schedule.items()


def test_ddpm_cifar10_logsnr_range():
    denoiser = DiffusersDenoiser(torch.nn.Identity(), json.loads((FIXTURES / "scheduler_config.json").read_text()))
    lo, hi = denoiser.logsnr_range
    assert lo == pytest.approx(-10.12, abs=0.01) and hi == pytest.approx(9.21, abs=0.01)


# --------------------------------------------------------------------------- #
# Schedules and the log-SNR -> timestep map
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_alphas_cumprod_match_diffusers(name):
    config = dict(SCHEDULES[name], num_train_timesteps=1000)
    ours = diffusers_alphas_cumprod(config)
    theirs = diffusers.DDPMScheduler(**config).alphas_cumprod.double()  # float32 there
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)


def test_trained_betas_and_scheduler_objects():
    betas = torch.linspace(1e-3, 0.05, 20).tolist()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=20, trained_betas=betas)
    ours = diffusers_alphas_cumprod(scheduler)  # a scheduler object works as well as a dict
    torch.testing.assert_close(ours, scheduler.alphas_cumprod.double(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="beta_schedule"):
        diffusers_alphas_cumprod({"beta_schedule": "quadratic"})


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("steps", [10, 100, 1000])
def test_logsnr_timestep_round_trip(name, steps):
    denoiser = DiffusersDenoiser(torch.nn.Identity(), dict(SCHEDULES[name], num_train_timesteps=steps))
    tmap = denoiser.timesteps
    t = torch.rand(300, generator=torch.Generator().manual_seed(steps), dtype=torch.float64) * (steps - 1)
    t = torch.cat([t, torch.arange(steps, dtype=torch.float64)])
    logsnr = tmap.logsnr_at(t)
    torch.testing.assert_close(tmap(logsnr), t, atol=1e-4, rtol=0)
    torch.testing.assert_close(tmap(logsnr.float()).float(), t.float(), atol=1e-3, rtol=0)  # float32 inputs
    # the timestep decreases as the log-SNR increases, and is pinned at the ends
    lo, hi = denoiser.logsnr_range
    a = torch.linspace(lo - 3, hi + 3, 1001, dtype=torch.float64)
    mapped = tmap(a)
    assert bool((mapped[1:] <= mapped[:-1]).all())
    assert mapped[0] == steps - 1 and mapped[-1] == 0


class StubUNet(torch.nn.Module):
    """Stands in for a UNet2DModel: returns an object with .sample, records the timestep."""

    def __init__(self, out_factor: int = 1):
        super().__init__()
        self.out_factor = out_factor
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, sample, timestep, class_labels=None):
        self.timestep = timestep
        out = self.scale * sample * (1 + timestep.view(-1, 1, 1, 1) / 1000)
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=torch.cat([out] * self.out_factor, dim=1))


def test_clamping_outside_trained_range():
    stub = StubUNet()
    denoiser = DiffusersDenoiser(stub, {"num_train_timesteps": 1000})
    lo, hi = denoiser.logsnr_range
    z = randn(4, 3, 2, 2)
    denoiser(z, torch.tensor([hi + 10, hi, lo, lo - 10]))
    torch.testing.assert_close(stub.timestep, torch.tensor([0.0, 0.0, 999.0, 999.0]))
    assert stub.timestep.dtype == torch.float32


def test_learned_variance_output_is_split():
    denoiser = DiffusersDenoiser(StubUNet(out_factor=2), {"num_train_timesteps": 100})
    z = randn(2, 3, 4, 4)
    reference = DiffusersDenoiser(StubUNet(out_factor=1), {"num_train_timesteps": 100})
    logsnr = torch.tensor([0.3, -1.0])
    torch.testing.assert_close(denoiser(z, logsnr), reference(z, logsnr))


# --------------------------------------------------------------------------- #
# Prediction types
# --------------------------------------------------------------------------- #


class ConvertedUNet(torch.nn.Module):
    """Wraps an epsilon UNet so that it predicts v or x0 instead, using the schedule's
    own alpha_t, sigma_t at the (fractional) timestep it is called with."""

    def __init__(self, eps_unet, tmap, prediction_type):
        super().__init__()
        self.eps_unet, self.tmap, self.prediction_type = eps_unet, tmap, prediction_type

    def forward(self, sample, timestep):
        eps = self.eps_unet(sample, timestep).sample
        logsnr = self.tmap.logsnr_at(timestep.double())
        alpha = torch.sigmoid(logsnr).sqrt().float().view(-1, 1, 1, 1)
        sigma = torch.sigmoid(-logsnr).sqrt().float().view(-1, 1, 1, 1)
        x0 = (sample - sigma * eps) / alpha
        out = alpha * eps - sigma * x0 if self.prediction_type == "v_prediction" else x0
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=out)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_prediction_types_give_the_same_epsilon(prediction_type, schedule):
    unet = tiny_unet()
    config = dict(SCHEDULES[schedule], num_train_timesteps=1000)
    eps_model = DiffusersDenoiser(unet, config)
    other = DiffusersDenoiser(
        ConvertedUNet(unet, eps_model.timesteps, prediction_type), dict(config, prediction_type=prediction_type)
    )
    z = randn(4, 3, 8, 8, seed=1)
    lo, hi = eps_model.logsnr_range
    logsnr = torch.tensor([lo + 0.5, -2.0, 1.0, hi - 0.5])
    with torch.no_grad():
        torch.testing.assert_close(other(z, logsnr), eps_model(z, logsnr), atol=2e-4, rtol=1e-4)


def test_eps_from_prediction_is_exact_on_synthetic_channel():
    x, eps = randn(3, 2, 4, 4, seed=2), randn(3, 2, 4, 4, seed=3)
    logsnr = torch.tensor([-4.0, 0.0, 5.0])
    alpha = torch.sigmoid(logsnr).sqrt().view(-1, 1, 1, 1)
    sigma = torch.sigmoid(-logsnr).sqrt().view(-1, 1, 1, 1)
    z = alpha * x + sigma * eps
    torch.testing.assert_close(eps_from_prediction(alpha * eps - sigma * x, z, logsnr, "v_prediction"), eps)
    torch.testing.assert_close(eps_from_prediction(x, z, logsnr, "sample"), eps, atol=1e-5, rtol=1e-5)
    assert eps_from_prediction(eps, z, logsnr, "epsilon") is eps
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersDenoiser(StubUNet(), {"prediction_type": "score"})


def test_gradients_flow_through_logsnr():
    denoiser = DiffusersDenoiser(tiny_unet(), {"num_train_timesteps": 1000})
    logsnr = torch.tensor([-3.0, 4.0], requires_grad=True)
    eps_hat = denoiser(randn(2, 3, 8, 8), logsnr)
    eps_hat.square().sum().backward()
    assert torch.isfinite(logsnr.grad).all() and (logsnr.grad != 0).all()


# --------------------------------------------------------------------------- #
# Saving and loading
# --------------------------------------------------------------------------- #


def test_from_pretrained_pipeline_folder(tmp_path):
    unet = tiny_unet(seed=5)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    loaded = DiffusersDenoiser.from_pretrained(tmp_path)
    original = DiffusersDenoiser(unet, scheduler)
    assert not loaded.training
    assert_same_network(loaded, original, randn(2, 3, 8, 8, seed=6), torch.tensor([-1.0, 3.0]))
    assert loaded.logsnr_range == original.logsnr_range


def test_from_pretrained_model_folder(tmp_path):
    unet = tiny_unet(seed=7)
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=500).save_pretrained(tmp_path / "scheduler")
    original = DiffusersDenoiser(unet, {"num_train_timesteps": 500})
    z, logsnr = randn(1, 3, 8, 8, seed=8), torch.tensor([0.5])
    for kwargs in ({"path_or_repo_id": tmp_path / "unet"}, {"path_or_repo_id": tmp_path, "subfolder": "unet"}):
        assert_same_network(DiffusersDenoiser.from_pretrained(**kwargs), original, z, logsnr)
    with pytest.raises(FileNotFoundError):
        DiffusersDenoiser.from_pretrained(tmp_path / "nothing-here")


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #


def test_registry_names_and_specs():
    assert list_models() == ["ddpm-cifar10", "iddpm-cifar10-vlb"]
    for name in list_models():
        spec = model_spec(name)
        assert spec.data_shape == (3, 32, 32) and spec.data_levels == 256 and spec.data_range == (-1.0, 1.0)
        assert spec.data_delta == pytest.approx(2 / 255)
    assert model_spec("iddpm-cifar10-vlb").schedule["diffusion_steps"] == 4000
    with pytest.raises(ValueError, match="ddpm-cifar10.*iddpm-cifar10-vlb"):
        build_denoiser("ddpm-celeba")
    with pytest.raises(ValueError, match="unknown override"):
        build_denoiser("ddpm-cifar10", colour="blue")


def test_build_ddpm_cifar10_from_weights_file_and_folder(tmp_path):
    with pytest.warns(UserWarning, match="randomly initialised"):
        fresh = build_denoiser("ddpm-cifar10", block_out_channels=[32, 32, 32, 32], norm_num_groups=8)
    from safetensors.torch import save_file

    save_file(fresh.unet.state_dict(), tmp_path / "unet.safetensors")
    fresh.unet.save_pretrained(tmp_path / "folder")
    from_file = build_denoiser(
        "ddpm-cifar10", weights=tmp_path / "unet.safetensors", block_out_channels=[32, 32, 32, 32], norm_num_groups=8
    )
    from_folder = build_denoiser(
        "ddpm-cifar10", weights=tmp_path / "folder", block_out_channels=[32, 32, 32, 32], norm_num_groups=8
    )
    with pytest.raises(ValueError, match="not a ddpm-cifar10 network: block_out_channels"):
        build_denoiser("ddpm-cifar10", weights=tmp_path / "folder")
    z, logsnr = randn(2, 3, 32, 32, seed=9), torch.tensor([-5.0, 2.0])
    assert_same_network(from_file, fresh, z, logsnr)
    assert_same_network(from_folder, fresh, z, logsnr)
    assert not from_file.training and from_file.model_spec.config["norm_num_groups"] == 8


def test_build_iddpm_from_pt_file(tmp_path):
    from itdiffusion.denoisers import IDDPMDenoiser

    small = dict(model_channels=32, num_res_blocks=1, channel_mult=[1, 2])
    with pytest.warns(UserWarning, match="cifar10_uncond_vlb_50M_500K.pt"):
        fresh = build_denoiser("iddpm-cifar10-vlb", **small)
    torch.save(fresh.net.state_dict(), tmp_path / "small.pt")
    loaded = build_denoiser("iddpm-cifar10-vlb", weights=tmp_path / "small.pt", **small)
    assert isinstance(loaded, IDDPMDenoiser) and loaded.diffusion_steps == 4000 and not loaded.training
    with pytest.raises(ValueError, match="missing"):
        build_denoiser("iddpm-cifar10-vlb", weights=tmp_path / "small.pt")  # full-size architecture


def test_class_labels_reach_a_class_conditional_unet():
    unet = tiny_unet(num_class_embeds=4)
    with torch.no_grad():
        unet.class_embedding.weight.normal_(generator=torch.Generator().manual_seed(0))
    denoiser = DiffusersDenoiser(unet, {"num_train_timesteps": 1000})
    z, logsnr = randn(2, 3, 8, 8, seed=10), torch.tensor([0.0, 0.0])
    with torch.no_grad():
        a, b = denoiser(z, logsnr, y=torch.tensor([0, 1])), denoiser(z, logsnr, y=torch.tensor([0, 2]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])
