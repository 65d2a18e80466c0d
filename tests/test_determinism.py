"""The same seed gives the same numbers: however the examples are batched, and bit for bit on a rerun.

Every example's noise (and log-SNR offsets) comes from its own stream, seeded by the seed
and the example's index, so batching only changes how examples are grouped into network
calls.  A float32 network's outputs then move by rounding (convolutions sum in another
order for another batch size): results agree to 1e-6 relative, not bit for bit.  A rerun
with the same settings is bit-identical.  (One against two processes: ``test_pipeline.py``;
training reruns and resumes: ``test_train.py`` and ``test_interrupted.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import itdiffusion as itd
from itdiffusion.data.images import load_data
from itdiffusion.resolve import resolve_model

RTOL = 1e-6


@pytest.fixture(scope="module")
def setup():
    """A small U-Net on digits whose correction of the Gaussian denoiser is not zero."""
    train = load_data("digits", "train").x
    spectrum = itd.GaussianSpectrum.from_data(train, added_variance=0.125**2 / 12)
    net = resolve_model("small-unet", spectrum=spectrum, seed=1).denoiser
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in net.net.conv_out.parameters():  # zero at initialisation: make the network matter
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model = itd.ITDiffusion(net, spectrum).eval()
    return model, load_data("digits", "test", limit=20).x, itd.DiscreteGrid(-1.0, 1.0, 17)


def _arrays(res: itd.Results) -> dict[str, np.ndarray]:
    out = {f"curve/{k}": v for k, v in res.curves.items()}
    for name, term in res.terms.items():
        for field in ("offset", "nll_nats", "nll_gauss_min", "integrand_mean", "gauss_mean", "integrand", "gauss"):
            if getattr(term, field) is not None:
                out[f"{name}/{field}"] = np.asarray(getattr(term, field), dtype=np.float64)
    out["estimates"] = np.array([[e.nats, e.se_nats] for e in res.estimates.values()])
    return out


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        scale = np.abs(a[key]).max()  # integrands cross zero: compare against the array's scale
        np.testing.assert_allclose(b[key], a[key], rtol=RTOL, atol=RTOL * scale, err_msg=key)


def _identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


KINDS = {
    "discrete": lambda grid: dict(discrete=grid, dequantize=True, soft=True),
    "continuous": lambda grid: dict(),  # antithetic groups of four calls per point
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_evaluate_does_not_depend_on_batching_and_reruns_bit_identical(setup, kind):
    model, x, grid = setup
    kwargs = dict(n_points=16, seed=5, per_sample_curves=True, **KINDS[kind](grid))
    whole = itd.evaluate(model, [x], **kwargs)
    reference = _arrays(whole)
    for split, batch_size in ((7, 5), (1, 64), (20, 333)):
        _close(reference, _arrays(itd.evaluate(model, x.split(split), batch_size=batch_size, **kwargs)))
    _identical(reference, _arrays(itd.evaluate(model, [x], **kwargs)))
    other_seed = itd.evaluate(model, [x], **{**kwargs, "seed": 6})
    assert not np.array_equal(other_seed.terms["continuous"].nll_nats, whole.terms["continuous"].nll_nats)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_nll_does_not_depend_on_batch_size_and_reruns_bit_identical(setup, kind):
    model, x, grid = setup
    discrete = grid if kind == "discrete" else None
    reference = model.nll(x, 16, seed=9, discrete=discrete).numpy()
    for batch_size in (3, 50, 1000):
        np.testing.assert_allclose(model.nll(x, 16, seed=9, discrete=discrete, batch_size=batch_size).numpy(),
                                   reference, rtol=RTOL, atol=RTOL * np.abs(reference).max())
    assert np.array_equal(model.nll(x, 16, seed=9, discrete=discrete).numpy(), reference)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(model.nll(x, 16, generator=g1, discrete=discrete), model.nll(x, 16, generator=g2,
                                                                                    discrete=discrete))
