"""Parametrisation adapters against closed forms.

The exact denoiser of a Gaussian mixture is written, independently, in each other
parametrisation (an EDM ``D(x_noisy, sigma)``, a flow-matching velocity in both
conventions, epsilon / v / sample networks behind diffusers scheduler configurations, an
EDM-preconditioned network, a VE score network).  Each adapter must give back the
mixture's own ``E[eps | z]``, and the IT estimate must equal the plain exact denoiser's at
the same seed (continuous adapters: to 1e-6 relative) and the mixture's exact ``-log p(x)``.
"""

import math

import pytest
import torch

import itdiffusion as itd
from itdiffusion.baselines.compare import demo_mixture
from itdiffusion.denoisers import DiffusersDenoiser, FlowDenoiser, KarrasDenoiser, denoiser_for_scheduler
from itdiffusion.denoisers.schedulers import scheduler_family

D = 6


@pytest.fixture(scope="module")
def mixture():
    return demo_mixture(D, 3, seed=1)


def ve_posterior_mean(mix, x_noisy, sigma):
    """E[x | x + sigma eps = x_noisy] of the mixture, written from its components (not its forward)."""
    y = x_noisy.reshape(len(x_noisy), -1).double()
    s2 = sigma.double().reshape(-1, 1) ** 2  # (B, 1)
    var = torch.exp(mix.log_vars) + s2  # (B, K)
    sq = ((y.unsqueeze(1) - mix.means) ** 2).sum(-1)  # (B, K)
    logits = mix.log_weights - 0.5 * (sq / var + mix.d * torch.log(2 * math.pi * var))
    r = torch.softmax(logits, 1)
    shrink = torch.exp(mix.log_vars) / var  # (B, K)
    comp = mix.means + shrink.unsqueeze(-1) * (y.unsqueeze(1) - mix.means)  # (B, K, d)
    return (r.unsqueeze(-1) * comp).sum(1).reshape(x_noisy.shape)


def exact_edm(mix):
    return lambda x_noisy, sigma: ve_posterior_mean(mix, x_noisy, sigma)


def exact_velocity(mix, data_at):
    def v(x_t, t):
        tt = t.double().reshape(-1, *([1] * (x_t.ndim - 1)))
        if data_at == 0:  # x_t = (1 - t) x + t eps: x_t / (1 - t) = x + t / (1 - t) eps
            x0 = ve_posterior_mean(mix, x_t / (1 - tt), (tt / (1 - tt)).flatten())
            eps = (x_t - (1 - tt) * x0) / tt
            return eps - x0
        x0 = ve_posterior_mean(mix, x_t / tt, ((1 - tt) / tt).flatten())
        eps = (x_t - tt * x0) / (1 - tt)
        return x0 - eps
    return v


def channel(mix, n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = mix.sample(n, gen)
    a = torch.rand(n, generator=gen, dtype=torch.float64) * 16 - 8
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    z = torch.sigmoid(a).sqrt()[:, None] * x + torch.sigmoid(-a).sqrt()[:, None] * eps
    return x, z, a


ADAPTERS = {
    "karras": lambda mix: KarrasDenoiser(exact_edm(mix)),
    "flow-data-at-0": lambda mix: FlowDenoiser(exact_velocity(mix, 0), data_at=0),
    "flow-data-at-1": lambda mix: FlowDenoiser(exact_velocity(mix, 1), data_at=1),
}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_continuous_adapters_are_exact_changes_of_variables(mixture, name):
    mix, spectrum = mixture
    den = ADAPTERS[name](mix)
    x, z, a = channel(mix)
    torch.testing.assert_close(den(z, a), mix(z, a), rtol=1e-9, atol=1e-9)
    x = x[:16]
    direct = itd.ITDiffusion(mix, spectrum).nll(x, 128, seed=3)
    adapted = itd.ITDiffusion(den, spectrum).nll(x, 128, seed=3)
    torch.testing.assert_close(adapted, direct, rtol=1e-6, atol=0)
    exact = -mix.log_prob(x)
    assert abs(float((adapted - exact).mean())) < 4 * float((adapted - exact).std()) / math.sqrt(len(x)) + 0.05


def test_adapters_accept_images_and_report_trained_ranges(mixture):
    mix, _ = mixture
    den = KarrasDenoiser(lambda x, s: 0.5 * x, sigma_range=(0.002, 80.0))
    z = torch.randn(3, 2, 3, 1, dtype=torch.float64)
    assert den(z, torch.zeros(3, dtype=torch.float64)).shape == z.shape
    assert den.logsnr_range == pytest.approx((-2 * math.log(80.0), -2 * math.log(0.002)))
    flow = FlowDenoiser(lambda x, t: x, data_at=0, t_range=(0.001, 1.0))
    lo, hi = flow.logsnr_range
    assert lo == -math.inf and hi == pytest.approx(2 * math.log(0.999 / 0.001))
    assert FlowDenoiser(lambda x, t: x, data_at=1, t_range=(0.0, 0.999)).logsnr_range[0] == -math.inf
    with pytest.raises(ValueError, match="data_at"):
        FlowDenoiser(lambda x, t: x, data_at=2)


class ExactVPNet(torch.nn.Module):
    """A 'UNet' that predicts, at a diffusers timestep, the mixture's exact epsilon, v or x0."""

    def __init__(self, mix, timesteps, prediction_type):
        super().__init__()
        self.mix, self.timesteps, self.prediction_type = mix, timesteps, prediction_type

    def forward(self, z, t):
        a = self.timesteps.logsnr_at(t.double())
        eps = self.mix(z.double(), a)
        alpha, sigma = torch.sigmoid(a).sqrt()[:, None], torch.sigmoid(-a).sqrt()[:, None]
        x0 = (z - sigma * eps) / alpha
        return {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[self.prediction_type],


VP_SCHEDULES = {
    "linear": {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012},
    "cosine": {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"_class_name": "PNDMScheduler", "trained_betas": torch.linspace(1e-4, 0.05, 200).tolist()},
}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", list(VP_SCHEDULES))
def test_vp_networks_behind_scheduler_configs_are_exact(mixture, schedule, prediction_type):
    mix, spectrum = mixture
    config = {"num_train_timesteps": 1000, **VP_SCHEDULES[schedule], "prediction_type": prediction_type}
    probe = DiffusersDenoiser(torch.nn.Identity(), config)
    den = denoiser_for_scheduler(ExactVPNet(mix, probe.timesteps, prediction_type), config)
    assert isinstance(den, DiffusersDenoiser) and den.prediction_type == prediction_type
    lo, hi = den.logsnr_range
    x, z, _ = channel(mix)
    a = torch.linspace(lo + 0.01, hi - 0.01, len(z), dtype=torch.float64)
    torch.testing.assert_close(den(z, a), mix(z, a), rtol=1e-6, atol=1e-6)
    x = x[:16]
    est = itd.ITDiffusion(den, spectrum).nll(x, 128, seed=3)
    if lo < -10 and hi > 9:  # the range holds the points that matter: the plain exact denoiser's numbers
        torch.testing.assert_close(est, itd.ITDiffusion(mix, spectrum).nll(x, 128, seed=3), rtol=1e-5, atol=0)
    else:  # short schedules: outside the trained range the network is clamped (measured <= 0.11 nats)
        assert abs(float((est + mix.log_prob(x)).mean())) < 0.25


def edm_network(mix, sigma_data, prediction_type):
    """The raw EDM network F with D = c_skip x + c_out F(c_in x, c_noise) exact (inverted preconditioning)."""
    sign = 1.0 if prediction_type == "epsilon" else -1.0

    def F(x_in, c_noise):
        sigma = torch.exp(4 * c_noise.double()).reshape(-1, *([1] * (x_in.ndim - 1)))
        norm = torch.sqrt(sigma**2 + sigma_data**2)
        x_noisy = x_in * norm
        x0 = ve_posterior_mean(mix, x_noisy, sigma.flatten())
        return (x0 - sigma_data**2 / norm**2 * x_noisy) / (sign * sigma * sigma_data / norm),

    return _Call(F)


def score_network(mix):
    def score(x_noisy, sigma):
        s = sigma.double().reshape(-1, *([1] * (x_noisy.ndim - 1)))
        return (ve_posterior_mean(mix, x_noisy, sigma) - x_noisy) / s**2,

    return _Call(score)


def velocity_network(mix, n_steps):
    v = exact_velocity(mix, 0)
    return _Call(lambda x_t, timestep: (v(x_t, timestep.double() / n_steps),))


class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@pytest.mark.parametrize("config, net", [
    ({"_class_name": "EDMEulerScheduler", "sigma_data": 0.5, "prediction_type": "epsilon"},
     lambda mix: edm_network(mix, 0.5, "epsilon")),
    ({"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_data": 0.7, "prediction_type": "v_prediction"},
     lambda mix: edm_network(mix, 0.7, "v_prediction")),
    ({"_class_name": "ScoreSdeVeScheduler", "sigma_min": 0.01, "sigma_max": 50.0}, score_network),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
     lambda mix: velocity_network(mix, 1000)),
])
def test_diffusers_edm_ve_and_flow_schedulers_are_exact(mixture, config, net):
    mix, spectrum = mixture
    den = denoiser_for_scheduler(net(mix), config)
    assert isinstance(den, (KarrasDenoiser, FlowDenoiser))
    x, z, a = channel(mix)
    torch.testing.assert_close(den(z, a), mix(z, a), rtol=1e-8, atol=1e-8)
    x = x[:8]
    direct = itd.ITDiffusion(mix, spectrum).nll(x, 64, seed=5)
    torch.testing.assert_close(itd.ITDiffusion(den, spectrum).nll(x, 64, seed=5), direct, rtol=1e-6, atol=0)
    lo, hi = den.logsnr_range  # flow matching trains t = 1 (pure noise): log-SNR -inf
    assert lo < 0 < hi and math.isfinite(hi) and (math.isfinite(lo) or isinstance(den, FlowDenoiser))


def test_flow_shift_sets_the_trained_range():
    base = denoiser_for_scheduler(_Call(lambda x, t: (x,)), {"_class_name": "FlowMatchEulerDiscreteScheduler"})
    shifted = denoiser_for_scheduler(_Call(lambda x, t: (x,)), {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                                 "shift": 3.0})
    t_min = 3 * 0.001 / (1 + 2 * 0.001)
    assert shifted.logsnr_range[1] == pytest.approx(2 * math.log((1 - t_min) / t_min))
    assert base.logsnr_range[1] > shifted.logsnr_range[1]


@pytest.mark.parametrize("config, message", [
    ({"_class_name": "DDPMWuerstchenScheduler"}, "DDPMWuerstchenScheduler' is not supported; supported:"),
    ({"_class_name": "CMStochasticIterativeScheduler"}, "not supported"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True}, "flow-matching"),
    ({"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous"}, "KarrasDenoiser"),
    ({"_class_name": "EDMEulerScheduler", "prediction_type": "sample"}, "EDM prediction_type"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "use_dynamic_shifting"),
])
def test_other_schedulers_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        denoiser_for_scheduler(torch.nn.Identity(), config)


def test_diffusers_denoiser_refuses_non_vp_scheduler_objects():
    diffusers = pytest.importorskip("diffusers")
    for scheduler in (diffusers.ScoreSdeVeScheduler(), diffusers.EDMEulerScheduler(),
                      diffusers.FlowMatchEulerDiscreteScheduler()):
        with pytest.raises(ValueError, match="not a variance-preserving"):
            DiffusersDenoiser(torch.nn.Identity(), scheduler)
        assert scheduler_family(scheduler) in {"ve", "edm", "flow"}


def test_zero_terminal_snr_schedule_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from itdiffusion.denoisers import diffusers_alphas_cumprod

    scheduler = diffusers.DDIMScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012)
    abar = diffusers_alphas_cumprod(scheduler)
    assert abar[-1] == 0
    torch.testing.assert_close(abar, scheduler.alphas_cumprod.double(), rtol=0, atol=1e-6)
    den = DiffusersDenoiser(torch.nn.Identity(), scheduler)
    assert den.timesteps.zero_terminal_snr and den.timesteps.num_steps == 999
    assert math.isfinite(den.logsnr_range[0])


def test_missing_class_defaults_come_from_diffusers():
    pytest.importorskip("diffusers")
    from itdiffusion.denoisers.schedulers import full_config

    cfg = full_config({"_class_name": "LCMScheduler"})  # LCM's defaults are scaled_linear 0.00085..0.012
    assert cfg["beta_schedule"] == "scaled_linear" and cfg["beta_start"] == 0.00085
