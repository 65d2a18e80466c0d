"""``itd.metrics.BitsPerDim``: over batches equal to ``evaluate`` at the same seed; 2 processes equal 1."""

import math

import pytest
import torch
import torch.multiprocessing as mp

import itdiffusion as itd
from itdiffusion.metrics import BitsPerDim


def _case():
    gen = torch.Generator().manual_seed(3)
    means = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    mix = itd.GaussianMixture(means, torch.full((3,), 0.3, dtype=torch.float64))
    spectrum = itd.GaussianSpectrum.from_data(mix.sample(2000, gen))
    x = mix.sample(30, gen)
    grid = itd.DiscreteGrid(-3.0, 3.0, 61)
    return itd.ITDiffusion(mix, spectrum), x, grid


@pytest.mark.parametrize("estimate", ["continuous", "discrete", "dequantized"])
def test_batches_give_what_evaluate_gives(estimate):
    model, x, grid = _case()
    discrete = None if estimate == "continuous" else grid
    xq = x if discrete is None else grid.value(grid.round_index(x))
    results = itd.evaluate(model, [xq], 16, discrete=discrete, dequantize=estimate == "dequantized", seed=5)
    want = results.estimates["dequantized_discrete" if estimate == "dequantized" else estimate]
    metric = BitsPerDim(model, 16, discrete=discrete, estimate=estimate, seed=5)
    for batch in xq.split(7):
        metric.update(batch)
    got = metric.compute()
    assert got.nats == pytest.approx(want.nats, rel=1e-12, abs=1e-10)
    assert got.se_nats == pytest.approx(want.se_nats, rel=1e-9)
    assert got.bpd == pytest.approx(want.bpd, rel=1e-12, abs=1e-12)
    metric.reset()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()


def test_bad_arguments_are_refused():
    model, _, grid = _case()
    with pytest.raises(ValueError, match="needs the data grid"):
        BitsPerDim(model, 8, estimate="discrete")
    with pytest.raises(ValueError, match="estimate must be one of"):
        BitsPerDim(model, 8, discrete=grid, estimate="dicsrete")


def _worker(rank: int, size: int, init: str, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        model, x, _ = _case()
        metric = BitsPerDim(model, 16, seed=2)
        first, stop = rank * len(x) // size, (rank + 1) * len(x) // size
        for start in range(first, stop, 4):
            metric.update(x[start : min(start + 4, stop)], first_index=start)
        est = metric.compute()
        out.put((rank, est.nats, est.se_nats))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    model, x, _ = _case()
    one = BitsPerDim(model, 16, seed=2)
    one.update(x)
    want = one.compute()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_worker, args=(r, 2, init, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for _, nats, se in got:
        assert nats == pytest.approx(want.nats, rel=1e-12) and se == pytest.approx(want.se_nats, rel=1e-9)
    assert math.isfinite(want.se_nats)
