"""compare(): the API contract, schedules of adapted denoisers, tables and the ``itd compare`` command."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import itdiffusion as itd
from itdiffusion import baselines as bl
from itdiffusion.cli import main
from itdiffusion.baselines.compare import (default_variance, demo_mixture, denoiser_schedule,
                                 learned_variance_denoiser, mixture_spectrum)
from itdiffusion.denoisers import DiffusersDenoiser, IDDPMDenoiser
from conftest import make_mixture, within


@pytest.fixture(scope="module")
def gmm_table():
    mix, spec = demo_mixture(8, seed=1)
    model = itd.ITDiffusion(mix, spec)
    x = mix.sample(120, torch.Generator().manual_seed(0))
    options = {"vlb": {"steps": 300}, "ode": {"solver": "rk4", "n_steps": 16}}
    table = itd.compare(model, x, methods=("it", "vlb", "vlb-ct", "ode"), generator=torch.Generator().manual_seed(1),
                        options=options)
    return table, -mix.log_prob(x)


def test_api_contract(gmm_table):
    table, exact = gmm_table
    assert list(table) == ["it", "vlb", "vlb-ct", "ode"] and "vlb" in table
    for name in table:
        res = table[name]
        assert res.nll_nats.shape == (120,) and res.nll_nats.dtype == np.float64  # saved records hold numpy
        assert res.seconds >= 0 and res.se > 0
        assert res.bpd == pytest.approx(res.nll / (8 * math.log(2)))
    assert table["it"].calls_per_example == 256 and table["vlb-ct"].calls_per_example == 256
    assert table["vlb"].calls_per_example == 300
    assert table["ode"].calls_per_example == 64 * 9  # rk4: 4 evaluations a step, each with 8 exact-trace passes
    assert np.array_equal(table.exact, exact.numpy())
    with pytest.raises(KeyError):
        table["flow"]


def test_methods_agree_with_the_exact_density(gmm_table):
    table, exact = gmm_table
    within(torch.from_numpy(table["it"].nll_nats), exact)
    within(torch.from_numpy(table["ode"].nll_nats), exact, slack=0.01)
    for bound in ("vlb", "vlb-ct"):
        assert table[bound].error > -3 * table[bound].error_se
    assert table["ode"].rmse < 0.01 < table["it"].rmse  # exact trace, exact denoiser: the ODE is deterministic


def test_markdown_and_json(gmm_table, tmp_path):
    table, _ = gmm_table
    text = table.to_markdown("title")
    assert text.startswith("**title**")
    for label in ("Exact", "IT (I-MMSE)", "Variational bound, discrete time", "Probability-flow ODE"):
        assert f"| {label} |" in text
    data = json.loads(table.to_json(per_example=True))
    assert data["methods"]["vlb"]["calls_per_example"] == 300
    assert len(data["methods"]["ode"]["per_example_nats"]) == 120
    assert data["exact"]["nll_nats"] == pytest.approx(float(table.exact.mean()))
    json_path, md_path = table.save(tmp_path / "cmp.json", meta={"model": "m"})
    assert json.loads(json_path.read_text())["model"] == "m" and md_path.read_text() == table.to_markdown()
    with pytest.raises(ValueError):
        table.save(tmp_path / "cmp.md")


def test_discrete_data_bounds(gen):
    grid = itd.DiscreteGrid(-1.0, 1.0, 17)
    means = torch.tensor([[-0.5, 0.2], [0.4, -0.3], [0.1, 0.6]], dtype=torch.float64)
    law = itd.FiniteDiscrete.discretized_mixture(grid, means, torch.tensor([0.2, 0.35, 0.25]))
    model = itd.ITDiffusion(law, itd.GaussianSpectrum.from_data(law.sample(4000, gen)))
    x = law.sample(150, gen)
    table = itd.compare(model, x, ("it", "vlb"), generator=gen, discrete=grid, options={"vlb": {"steps": 400}})
    assert table.discrete and table["vlb"].settings["clamp"] == [-1.0, 1.0]
    assert table["vlb"].error > -3 * table["vlb"].error_se
    assert "-log P(x) on the data grid" in table.to_markdown()


def test_bad_arguments(gen):
    mix = make_mixture(2)
    model = itd.ITDiffusion(mix, itd.GaussianSpectrum.isotropic((2,)))
    x = mix.sample(4, gen)
    with pytest.raises(ValueError, match="unknown method"):
        itd.compare(model, x, ("it", "flow"), generator=gen)
    with pytest.raises(ValueError, match="options"):
        itd.compare(model, x, ("it",), generator=gen, options={"odes": {}})
    with pytest.raises(ValueError, match="exact"):
        itd.compare(model, x, ("it",), generator=gen, exact=torch.zeros(3))
    with pytest.raises(ValueError):
        itd.compare(model, x[:, :1], ("it",), generator=gen)
    table = itd.compare(model, x, ("it",), seed=0, exact=None, options={"it": {"n_points": 4}})
    assert table.exact is None and math.isnan(table["it"].error) and "error (nats)" not in table.to_markdown()


def test_options_refuse_a_misspelled_key_and_accept_their_dataclass(gen):
    from itdiffusion.baselines.options import ODEOptions, VLBOptions

    mix = make_mixture(2)
    model = itd.ITDiffusion(mix, itd.GaussianSpectrum.isotropic((2,)))
    x = mix.sample(3, gen)
    with pytest.raises(ValueError, match=r"unknown option 'n_calsl' for method 'vlb'; valid options: .*n_calls"):
        itd.compare(model, x, ("vlb",), seed=0, options={"vlb": {"n_calsl": 3}})
    with pytest.raises(ValueError, match="must be a dict or ODEOptions"):
        itd.compare(model, x, ("ode",), seed=0, options={"ode": VLBOptions()})
    as_dict = itd.compare(model, x, ("vlb", "ode"), seed=0,
                          options={"vlb": {"steps": 30, "n_calls": 5}, "ode": {"solver": "euler", "n_steps": 3}})
    typed = itd.compare(model, x, ("vlb", "ode"), seed=0,
                        options={"vlb": VLBOptions(steps=30, n_calls=5), "ode": ODEOptions(solver="euler", n_steps=3)})
    for method in ("vlb", "ode"):
        assert np.array_equal(as_dict[method].nll_nats, typed[method].nll_nats)


def test_mixture_spectrum_is_the_exact_covariance(gen):
    mix, spec = demo_mixture(3, seed=2)
    x = mix.sample(200_000, gen)
    assert torch.allclose(spec.mean, x.mean(0), atol=0.03)
    cov = spec.eigvecs @ torch.diag(spec.log_eigs.exp()) @ spec.eigvecs.T
    assert torch.allclose(cov, torch.cov(x.T), atol=0.1)
    assert mixture_spectrum(mix).entropy() == pytest.approx(spec.entropy())


# ----------------------------------------------------------------------------- adapted denoisers
class StubNet(torch.nn.Module):
    """An IDDPM-shaped network: [0.1 z, v] with a constant variance output v; records its timesteps."""

    in_channels, out_channels = 3, 6

    def __init__(self, v: float = 0.0):
        super().__init__()
        self.v, self.times = v, []

    def forward(self, z, t):
        self.times.append(t.detach().clone())
        return torch.cat([0.1 * z, torch.full_like(z, self.v)], 1)


def stub_model(v: float = 0.0, steps: int = 20):
    denoiser = IDDPMDenoiser(StubNet(v), diffusion_steps=steps)
    return itd.ITDiffusion(denoiser, itd.GaussianSpectrum.isotropic((3, 4, 4), variance=0.3))


def grid_images(n, gen):
    grid = itd.DiscreteGrid(-1.0, 1.0, 256)
    return grid, grid.value(torch.randint(0, 256, (n, 3, 4, 4), generator=gen).float())


def test_vlb_uses_the_denoisers_own_schedule_and_learned_variance(gen):
    model = stub_model()
    assert torch.equal(denoiser_schedule(model.denoiser), model.denoiser.timesteps.alphas_cumprod)
    assert learned_variance_denoiser(model.denoiser) is not None and default_variance(model.denoiser) == "learned"
    grid, x = grid_images(2, gen)
    table = itd.compare(model, x, ("vlb",), seed=0, discrete=grid)
    res = table["vlb"]
    assert res.calls_per_example == 20 and res.settings["variance"] == "learned"
    assert res.settings["schedule"] == "denoiser"
    times = torch.cat(model.denoiser.net.times) * 20 / 1000  # the network was called at the 20 schedule steps
    assert torch.allclose(times.sort().values, torch.arange(20.0).repeat_interleave(2), atol=1e-3)


@pytest.mark.parametrize("v, fixed", [(-1.0, "fixed_small"), (1.0, "fixed_large_beta1")])
def test_learned_variance_ends_are_the_fixed_variances(v, fixed, gen):
    grid, x = grid_images(2, gen)
    learned = itd.compare(stub_model(v), x, ("vlb",), seed=3, discrete=grid)["vlb"].nll_nats
    options = {"vlb": {"variance": fixed}}
    plain = itd.compare(stub_model(v), x, ("vlb",), seed=3, discrete=grid, options=options)["vlb"].nll_nats
    assert np.allclose(learned, plain, rtol=1e-5)


def test_default_schedule_and_variance_without_a_schedule():
    mix = make_mixture(2)
    model = itd.ITDiffusion(mix, itd.GaussianSpectrum.isotropic((2,)))
    assert denoiser_schedule(mix) is None and default_variance(mix) == "fixed_large"
    assert learned_variance_denoiser(mix) is None
    diffusers_like = DiffusersDenoiser(torch.nn.Identity(), {"num_train_timesteps": 10, "variance_type": "fixed_small"})
    assert default_variance(diffusers_like) == "fixed_small"
    x = mix.sample(3, torch.Generator().manual_seed(0))
    res = itd.compare(model, x, ("vlb",), seed=0, options={"vlb": {"steps": 40}})["vlb"]
    assert res.calls_per_example == 40 and res.settings["schedule"].startswith("log-SNR linear")
    abar = bl.logsnr_linear_alphas_cumprod(*model.logsnr_range(), 40)
    assert np.allclose(res.nll_nats, bl.vlb_discrete(model, x, abar, seed=0).nll.numpy())


# ----------------------------------------------------------------------------- the command line
def test_cli_gmm_exact_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "res" / "cmp.json"
    argv = ["compare", "--model", "gmm-exact", "--data", "sample:40", "--dim", "4", "--methods", "it,vlb-ct,ode",
            "--n-points", "32", "--solver", "rk4", "--ode-steps", "8", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Exact |" in printed and "| Probability-flow ODE |" in printed
    data = json.loads(out.read_text())
    assert data["model"] == "gmm-exact" and set(data["methods"]) == {"it", "vlb-ct", "ode"}
    assert data["methods"]["it"]["calls_per_example"] == 32 and data["n_examples"] == 40
    assert out.with_suffix(".md").read_text().startswith("**itd compare")


def test_cli_reads_npy_data(tmp_path, capsys):
    mix, _ = demo_mixture(3)
    path = tmp_path / "x.npy"
    np.save(path, mix.sample(20, torch.Generator().manual_seed(0)).numpy())
    assert main(["compare", "--model", "gmm-exact", "--data", str(path), "--methods", "it", "--n-points", "8",
                 "--limit", "10", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["d"] == 3 and data["n_examples"] == 10 and data["exact"] is not None


@pytest.mark.parametrize("argv, message", [
    (["--data", "sample:5", "--methods", "it,flow"], "unknown method"),
    (["--data", "missing.npy"], "no such file"),
    (["--data", "x.csv"], ".npy"),
    (["--data", "sample:zero"], "positive integer"),
    (["--data", "sample:5", "--out", "t.md"], "JSON path"),
    (["--data", "sample:5", "--n-points", "0"], "positive"),
])
def test_cli_user_errors_exit_2(argv, message, capsys):
    assert main(["compare", "--model", "gmm-exact", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_registry_model(tmp_path, monkeypatch, capsys):
    import itdiffusion.resolve as resolve
    from itdiffusion.core.grid import DiscreteGrid

    real = resolve.resolve_model

    def fake_resolve(spec, **kwargs):  # compare resolves --model as eval does
        if spec != "tiny":
            return real(spec, **kwargs)
        den = IDDPMDenoiser(StubNet(), diffusion_steps=10)
        return resolve.LoadedModel(den, {}, "tiny", (3, 4, 4), DiscreteGrid(-1.0, 1.0, 256))

    monkeypatch.setattr(resolve, "resolve_model", fake_resolve)
    path = tmp_path / "images.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (6, 3, 4, 4), dtype=np.uint8))
    argv = ["compare", "--model", "tiny", "--data", str(path), "--methods", "it,vlb,ode", "--n-points", "8",
            "--solver", "heun", "--ode-steps", "2", "--format", "json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["discrete"] and data["exact"] is None
    assert data["methods"]["vlb"]["calls_per_example"] == 10
    assert data["methods"]["vlb"]["settings"]["variance"] == "learned"
    assert main(["compare", "--model", "nope", "--data", str(path)]) == 2
    assert "not a model name" in capsys.readouterr().err
