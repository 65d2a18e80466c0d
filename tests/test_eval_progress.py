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


def _close(a: itd.Results, b: itd.Results, rtol: float = 1e-12):
    """Equal up to the last bits that batched arithmetic may change when batches differ."""
    for name, est in a.estimates.items():
        assert b[name].nats == pytest.approx(est.nats, rel=rtol), name
        assert b[name].se_nats == pytest.approx(est.se_nats, rel=1e-9), name
    for key in a.curves:
        np.testing.assert_allclose(b.curves[key], a.curves[key], rtol=1e-6, err_msg=key)  # float32 curves
    for name in a.terms:
        np.testing.assert_allclose(b.terms[name].nll_nats, a.terms[name].nll_nats, rtol=rtol, err_msg=name)


def test_interrupted_evaluation_resumes_to_identical_results(setup, tmp_path):
    grid, model, x = setup
    kwargs = dict(n_points=16, discrete=grid, dequantize=True, per_sample_curves=True, seed=3)
    full = itd.evaluate(model, x.split(8), **kwargs)
    path = tmp_path / "progress"
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
    path = tmp_path / "p"
    itd.evaluate(model, x[:8].split(4), n_points=16, discrete=grid, checkpoint=path, checkpoint_meta={"data": "a"})
    with pytest.raises(ValueError, match="n_points"):
        itd.evaluate(model, x[:8].split(4), n_points=32, discrete=grid, checkpoint=path, checkpoint_meta={"data": "a"})
    with pytest.raises(ValueError, match="meta.data"):
        itd.evaluate(model, x[:8].split(4), n_points=16, discrete=grid, checkpoint=path, checkpoint_meta={"data": "b"})
    chunk = sorted(path.glob("rows-*.npz"))[-1]
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        itd.evaluate(model, x[:8].split(4), n_points=16, discrete=grid, checkpoint=path, checkpoint_meta={"data": "a"})


def test_a_failing_batch_leaves_nothing_behind(setup):
    grid, model, x = setup
    ev = Evaluator(model, EvalConfig(n_points=8, discrete=grid))
    ev.add_batch(x[:4])
    before = ev.results()
    with pytest.raises(ValueError):
        ev.add_batch(x[:4] + 0.01)  # off the grid
    assert ev.n_done == 4 and ev.next_index == 4 and ev.covered == [(0, 4)]
    _same(ev.results(), before)


def test_shards_joined_equal_one_pass(setup, tmp_path):
    grid, model, x = setup
    cfg = dict(n_points=16, discrete=grid, dequantize=True, per_sample_curves=True)
    one = Evaluator(model, EvalConfig(**cfg))
    one.run(x.split(10))
    for start, stop in ((23, 50), (0, 23)):  # two "processes" sharing one progress folder
        ev = Evaluator(model, EvalConfig(**cfg), index_offset=start)
        ev.run(x[start:stop].split(10), checkpoint=tmp_path / "p")
    joined = Evaluator(model, EvalConfig(**cfg))
    assert joined.attach(tmp_path / "p") == 50
    _same(joined.results(), one.results())


@pytest.mark.parametrize("before, after", [(4, 2), (2, 1), (1, 3), (3, 4)])
def test_resume_on_another_number_of_processes(setup, tmp_path, before, after):
    """Shards of `before` processes, the run cut short, finished by `after` processes: the same numbers."""
    grid, model, x = setup
    cfg = dict(n_points=12, discrete=grid, soft=True, per_sample_curves=True)
    whole = Evaluator(model, EvalConfig(**cfg))
    whole.run(x.split(7))
    folder = tmp_path / "p"

    def shards(n):
        edges = [round(i * len(x) / n) for i in range(n + 1)]
        return list(zip(edges, edges[1:]))

    for start, stop in shards(before):  # each of the first processes stops after its first batch
        ev = Evaluator(model, EvalConfig(**cfg), index_offset=start)
        with pytest.raises(KeyboardInterrupt):
            ev.run(x[start:stop].split(5), checkpoint=folder,
                   callback=lambda n: (_ for _ in ()).throw(KeyboardInterrupt))
    for start, stop in shards(after):
        Evaluator(model, EvalConfig(**cfg), index_offset=start).run(x[start:stop].split(6), checkpoint=folder)
    joined = Evaluator(model, EvalConfig(**cfg))
    joined.attach(folder)
    _close(joined.results(), whole.results())  # other batch sizes: the denoiser's batched sums differ in the last bits


def test_an_error_partway_keeps_the_rows_done(setup, tmp_path):
    grid, model, x = setup
    bad = x.clone()
    bad[30] += 0.01  # off the grid: the batch holding it fails
    with pytest.raises(ValueError, match="off the declared grid"):
        itd.evaluate(model, bad.split(8), n_points=8, discrete=grid, checkpoint=tmp_path / "p",
                     checkpoint_every=1e9)
    ev = Evaluator(model, EvalConfig(n_points=8, discrete=grid))
    assert ev.attach(tmp_path / "p") == 24  # the three batches before it were saved


def test_incomplete_rows_are_refused(setup, tmp_path):
    grid, model, x = setup
    ev = Evaluator(model, EvalConfig(n_points=8, discrete=grid))
    ev.add_batch(x[:4], 0)
    ev.add_batch(x[8:12], 8)
    with pytest.raises(ValueError, match="rows 4-8 are missing"):
        ev.results()
    with pytest.raises(ValueError, match="already evaluated"):
        ev.add_batch(x[2:6], 2)
