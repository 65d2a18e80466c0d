"""Per-example noise streams read in bounded chunks equal the same streams drawn at once."""

import pytest
import torch

import itdiffusion as itd
from itdiffusion.core import noise, pipeline
from itdiffusion.core.noise import NoiseStreams, draw_example_noise, point_chunk
from conftest import make_mixture


def _whole(seed, indices, m, shape, dtype=torch.float32):
    """The reference: each stream drawn with one call per quantity (fractions, noise, offsets)."""
    out = []
    for i in indices:
        gen = torch.Generator().manual_seed(noise.example_seed(seed, i))
        frac = torch.rand(m, generator=gen, dtype=torch.float64)
        eps = torch.randn((m, *shape), generator=gen, dtype=dtype)
        deq = torch.rand(shape, generator=gen, dtype=dtype) - 0.5
        out.append((frac, eps, deq))
    return [torch.stack(t) for t in zip(*out)]


@pytest.mark.parametrize("m", [1, 3, 17, 64, 250])
@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (5,), (16,), (1, 3, 3), (3, 8, 8)])
@pytest.mark.parametrize("budget", [1, 40, 1000, 2**22])
def test_chunked_streams_equal_whole_draws(m, shape, budget):
    streams = NoiseStreams(7, [0, 5, 11], m, shape, budget=budget)
    frac, eps, deq = _whole(7, [0, 5, 11], m, shape)
    chunks = list(streams.chunks())
    assert [c[0] for c in chunks] == sorted({c[0] for c in chunks}) and chunks[-1][1] == m
    assert torch.equal(streams.fractions, frac)
    assert torch.equal(torch.cat([c[2] for c in chunks], 1), eps)
    assert torch.equal(streams.dequant(), deq)
    assert torch.equal(torch.cat([c[2] for c in streams.chunks()], 1), eps)  # a second pass reads the same


@pytest.mark.parametrize("d", [1, 3, 16, 3072])
def test_point_chunk_is_bounded_and_whole_blocks(d):
    for m in (1, 10, 1000, 100_000):
        k = point_chunk(m, d, budget=2**16)
        assert 1 <= k <= m and (k == m or (k * d) % 16 == 0)
        assert k * d <= max(2**16, 16 * d)


def test_float64_streams_too():
    streams = NoiseStreams(3, [2], 40, (3,), dtype=torch.float64, budget=16)
    _, eps, _ = _whole(3, [2], 40, (3,), torch.float64)
    assert torch.equal(torch.cat([c[2] for c in streams.chunks()], 1), eps)
    assert torch.equal(draw_example_noise(3, [2], 40, (3,), dtype=torch.float64).eps, eps)


@pytest.mark.parametrize("antithetic", [True, False])
def test_estimates_do_not_depend_on_the_noise_budget(monkeypatch, antithetic):
    mix = make_mixture(6, seed=2)
    gen = torch.Generator().manual_seed(0)
    x = mix.sample(9, gen)
    model = itd.ITDiffusion(mix, itd.GaussianSpectrum.from_data(mix.sample(300, gen)))
    grid = itd.DiscreteGrid(-4.0, 4.0, 33)
    xd = grid.round(x.clamp(-4, 4))
    ref = model.nll(x, 50, seed=1, antithetic=antithetic)
    ref_d = model.nll(xd, 50, seed=1, discrete=grid, rounding="soft", antithetic=antithetic)
    res = itd.evaluate(model, [xd], 30, discrete=grid, soft=True, dequantize=True, seed=2, antithetic=antithetic)
    monkeypatch.setattr(pipeline, "NOISE_BUDGET", 48)  # chunks of a few points, groups of one example
    torch.testing.assert_close(model.nll(x, 50, seed=1, antithetic=antithetic), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.nll(xd, 50, seed=1, discrete=grid, rounding="soft", antithetic=antithetic),
                               ref_d, rtol=1e-12, atol=1e-12)
    small = itd.evaluate(model, [xd], 30, discrete=grid, soft=True, dequantize=True, seed=2, antithetic=antithetic)
    for name, est in res.estimates.items():
        assert small[name].nats == pytest.approx(est.nats, rel=1e-12, abs=1e-12), name
