"""Resumable evaluation: saved partial progress gives the same results as an uninterrupted run."""

import numpy as np
import pytest
import torch

import itdiffusion as itd
from itdiffusion.evaluation import EvalConfig, Evaluator


@pytest.fixture(scope="module")
def setup():
    grid = itd.DiscreteGrid(-1.0, 1.0, 17)
    gen = torch.Generator().manual_seed(0)
    means = torch.rand(3, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.7
    law = itd.FiniteDiscrete.discretized_mixture(grid, means, torch.tensor([0.2, 0.35, 0.25]))
    spec = itd.GaussianSpectrum.from_data(law.sample(2000, gen))
    return grid, itd.ITDiffusion(law, spec), law.sample(50, gen)


def _same(a: itd.Results, b: itd.Results):
    assert a.estimates == b.estimates
    for key in a.curves:
        assert np.array_equal(a.curves[key], b.curves[key]), key
    for name in a.terms:
        assert np.array_equal(a.terms[name].nll_nats, b.terms[name].nll_nats), name


def test_interrupted_evaluation_resumes_to_identical_results(setup, tmp_path):
    grid, model, x = setup
    kwargs = dict(n_points=16, discrete=grid, dequantize=True, per_sample_curves=True, seed=3)
    full = itd.evaluate(model, x.split(8), **kwargs)
    path = tmp_path / "progress.npz"
    calls = []

    def stop_after_three(n_done):
        calls.append(n_done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        itd.evaluate(model, x.split(8), checkpoint=path, checkpoint_every=1e9, callback=stop_after_three, **kwargs)
    partial = Evaluator(model, EvalConfig(**{k: v for k, v in kwargs.items()}))
    assert partial.load_progress(path) == 24  # saved on interrupt, three batches of 8
    seen = []
    resumed = itd.evaluate(model, x.split(8), checkpoint=path, callback=seen.append, **kwargs)
    assert seen == [32, 40, 48, 50]  # the first 24 examples were skipped
    _same(resumed, full)
    # the checkpoint now holds everything: a second call evaluates nothing
    again = itd.evaluate(model, x.split(8), checkpoint=path, callback=lambda n: pytest.fail("re-evaluated"), **kwargs)
    _same(again, full)


def test_resume_refuses_other_settings_and_other_meta(setup, tmp_path):
    grid, model, x = setup
    path = tmp_path / "p.npz"
    itd.evaluate(model, x[:8].split(4), n_points=16, discrete=grid, checkpoint=path, checkpoint_meta={"data": "a"})
    with pytest.raises(ValueError, match="n_points"):
        itd.evaluate(model, x[:8].split(4), n_points=32, discrete=grid, checkpoint=path, checkpoint_meta={"data": "a"})
    with pytest.raises(ValueError, match="meta.data"):
        itd.evaluate(model, x[:8].split(4), n_points=16, discrete=grid, checkpoint=path, checkpoint_meta={"data": "b"})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        itd.evaluate(model, x[:8].split(4), n_points=16, discrete=grid, checkpoint=path)


def test_a_failing_batch_leaves_nothing_behind(setup):
    grid, model, x = setup
    ev = Evaluator(model, EvalConfig(n_points=8, discrete=grid))
    ev.add_batch(x[:4])
    before = {k: v.copy() for k, v in ev.state_arrays().items()}
    with pytest.raises(ValueError):
        ev.add_batch(x[:4] + 0.01)  # off the grid
    assert ev.n_done == 4 and ev.next_index == 4
    after = ev.state_arrays()
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_shards_joined_equal_one_pass(setup):
    grid, model, x = setup
    cfg = dict(n_points=16, discrete=grid, dequantize=True, per_sample_curves=True)
    one = Evaluator(model, EvalConfig(**cfg))
    one.run(x.split(10))
    parts = []
    for start, stop in ((0, 23), (23, 50)):
        ev = Evaluator(model, EvalConfig(**cfg), index_offset=start)
        ev.run(x[start:stop].split(10))
        parts.append(ev.state_arrays())
    joined = Evaluator(model, EvalConfig(**cfg))
    joined.load_state_arrays({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    _same(joined.results(), one.results())
