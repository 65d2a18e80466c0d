"""The test-time protocol, typed results, files and ensembles."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import itdiffusion as itd
from conftest import make_mixture


@pytest.fixture(scope="module")
def discrete_setup():
    grid = itd.DiscreteGrid(-1.0, 1.0, 17)
    gen = torch.Generator().manual_seed(0)
    means = torch.rand(3, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.7
    law = itd.FiniteDiscrete.discretized_mixture(grid, means, torch.tensor([0.2, 0.35, 0.25]))
    spec = itd.GaussianSpectrum.from_data(law.sample(5000, gen))
    x = law.sample(120, gen)
    return grid, law, itd.ITDiffusion(law, spec), x


def test_evaluate_discrete_protocol(discrete_setup, tmp_path):
    grid, law, model, x = discrete_setup
    res = itd.evaluate(model, x.split(32), n_points=64, discrete=grid, dequantize=True, per_sample_curves=True)
    est = res.estimates
    assert set(est) == {
        "continuous", "continuous_gauss_min", "discrete", "discrete_gauss_min", "dequantized", "dequantized_gauss_min",
        "dequantized_discrete", "dequantized_discrete_gauss_min",
    }
    assert res.n_examples == 120 and res.logsnr.shape == res.weights.shape == (64,)
    for e in est.values():
        assert math.isfinite(e.nats) and e.se_nats > 0
        assert e.bpd == pytest.approx(e.nats / (2 * math.log(2)))
    # clamping at the Gaussian can only help
    assert est["discrete_gauss_min"].nats <= est["discrete"].nats + 1e-9
    # hard rounding of the exact denoiser: an upper bound on the exact -log P(x)
    exact = (-law.log_prob(x)).mean().item()
    assert est["discrete"].nats > exact - 3 * est["discrete"].se_nats
    # the dequantized discrete limit is the dequantized density minus d log delta
    shift = -2 * math.log(grid.delta)
    assert est["dequantized_discrete"].nats == pytest.approx(est["dequantized"].nats + shift)
    assert {"mmse", "mmse_gauss", "mmse_hard", "mmse_soft", "mmse_dequantized", "mmse_gauss_analytic"} <= set(res.curves)
    assert res.config["calls_per_example"] == 128

    path = tmp_path / "results.json"
    res.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.npz"]
    back = itd.Results.load(path)
    assert back.estimates == res.estimates
    assert back.to_markdown() == res.to_markdown()
    assert np.array_equal(back.terms["discrete"].integrand, res.terms["discrete"].integrand)
    summary = json.loads(path.read_text())
    assert summary["estimates"]["discrete"]["bpd"] == pytest.approx(est["discrete"].bpd)


def test_tables(discrete_setup):
    grid, _, model, x = discrete_setup
    res = itd.evaluate(model, [x[:40]], n_points=16, discrete=grid)
    md = res.to_markdown(title="toy")
    assert md.count("\n|") >= 5 and "Discrete" in md and "bits/dim" in md
    tex = res.to_latex(caption="toy")
    assert tex.count(r"\\") >= 5 and r"\begin{tabular}" in tex and r"\caption{toy}" in tex


def test_evaluate_does_not_depend_on_batching(discrete_setup):
    grid, _, model, x = discrete_setup
    a = itd.evaluate(model, x.split(7), n_points=20, discrete=grid, soft=True)
    b = itd.evaluate(model, [x], n_points=20, discrete=grid, soft=True, batch_size=13)
    for name in a.terms:
        np.testing.assert_allclose(a.terms[name].nll_nats, b.terms[name].nll_nats, rtol=1e-10)
    # two shards with index offsets equal one pass
    first = itd.evaluate(model, [x[:50]], n_points=20, discrete=grid, soft=True)
    second = itd.evaluate(model, [x[50:]], n_points=20, discrete=grid, soft=True, index_offset=50)
    joined = np.concatenate([first.terms["discrete"].nll_nats, second.terms["discrete"].nll_nats])
    np.testing.assert_allclose(joined, a.terms["discrete"].nll_nats, rtol=1e-10)


def test_continuous_evaluate_recovers_mixture():
    mix = make_mixture(8, seed=11)
    gen = torch.Generator().manual_seed(2)
    model = itd.ITDiffusion(mix, itd.GaussianSpectrum.from_data(mix.sample(4000, gen)))
    x = mix.sample(300, gen)
    res = itd.evaluate(model, x.split(100), n_points=128)
    est = res["continuous"]
    exact = (-mix.log_prob(x)).mean().item()
    assert abs(est.nats - exact) < 4 * est.se_nats
    assert "discrete" not in res.estimates


def test_ensemble_is_no_worse_than_its_best_member(discrete_setup):
    grid, law, model, x = discrete_setup
    # a worse model: the exact denoiser with a bias
    worse = itd.ITDiffusion(lambda z, a: law(z, a) + 0.3, model.spectrum)
    good = itd.evaluate(model, [x], n_points=32, discrete=grid, per_sample_curves=True)
    bad = itd.evaluate(worse, [x], n_points=32, discrete=grid, per_sample_curves=True)
    both = itd.ensemble(good, bad, names=["exact", "biased"])
    for name in ("continuous", "discrete"):
        best = min(good[name + "_gauss_min"].nats, bad[name + "_gauss_min"].nats)
        assert both[name].nats <= best + 1e-9  # the Gaussian is a member too
        assert both[name + "_gauss_min"].nats == pytest.approx(both[name].nats)
        assert math.isfinite(both[name].se_nats)
    assert both.members == ["exact", "biased"]
    # without per-sample curves the standard error is unknown, but the value is the same
    light = itd.ensemble(itd.evaluate(model, [x], n_points=32, discrete=grid),
                         itd.evaluate(worse, [x], n_points=32, discrete=grid))
    assert light["discrete"].nats == pytest.approx(both["discrete"].nats)
    assert math.isnan(light["discrete"].se_nats)
    with pytest.raises(ValueError, match="same log-SNR"):
        itd.ensemble(good, itd.evaluate(model, [x], n_points=16, discrete=grid))


def test_results_file_checks(tmp_path, discrete_setup):
    grid, _, model, x = discrete_setup
    res = itd.evaluate(model, [x[:10]], n_points=8, discrete=grid)
    path = tmp_path / "r.json"
    res.save(path)
    npz = tmp_path / "r.npz"
    arrays = dict(np.load(npz))
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["version"] = 99
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(npz, **arrays)
    with pytest.raises(ValueError, match="version 99"):
        itd.Results.load(path)
    npz.write_bytes(npz.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match="r.npz"):
        itd.Results.load(path)


def test_core_import_is_light():
    code = (
        "import sys, torch; before = set(sys.modules); import itdiffusion;"
        "new = set(sys.modules) - before;"
        "heavy = [m for m in ('matplotlib', 'diffusers', 'sklearn', 'tqdm', 'PIL', 'safetensors', 'scipy') if m in new];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing itdiffusion pulled in {out}"
