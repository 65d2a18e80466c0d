"""``itd demo --dataset digits --conditional``: its model starts as the fitted class-conditional
mixture (a consistent conditional/unconditional pair), and the quick demo's network uses the label."""

import json

import pytest
import torch

from itdiffusion import GaussianSpectrum, ITDiffusion
from itdiffusion.demo_conditional import (NULL, N_CLASSES, ConditionalResidual, LabelledUNet, fit_class_mixture,
                                          load_labelled_digits)


@pytest.fixture(scope="module")
def fresh():
    (x, y), _ = load_labelled_digits(0)
    law = fit_class_mixture(x, y)
    torch.manual_seed(0)
    return law, ConditionalResidual(LabelledUNet(N_CLASSES, skip=False), law).eval(), x


def test_fresh_model_is_the_mixture_label_by_label(fresh):
    law, model, x = fresh
    z, a = torch.randn(6, 1, 8, 8), torch.linspace(-4, 4, 6)
    y = torch.tensor([0, NULL, 3, NULL, 9, 1])
    with torch.no_grad():
        out = model(z, a, y=y)
        labelled = y != NULL
        torch.testing.assert_close(out[labelled], law(z[labelled], a[labelled], y=y[labelled]))
        torch.testing.assert_close(out[~labelled], law(z[~labelled], a[~labelled]))
        torch.testing.assert_close(model(z, a), law(z, a))


@pytest.mark.slow
def test_fresh_model_mi_is_the_mixtures_exact_pointwise_mi(fresh):
    law, model, x = fresh
    xs, ys = law.sample_labelled(64, torch.Generator().manual_seed(1))
    xs = xs.float()
    itd = ITDiffusion(model, GaussianSpectrum.from_data(x, diagonal=True))
    with torch.no_grad():
        mi, se = itd.mi(xs, ys, 128, seed=0, return_se=True)
    exact = law.pointwise_mi(xs, ys)
    bias = float((mi.double() - exact).mean())
    assert abs(bias) < 4 * float((se.double() ** 2).sum().sqrt()) / len(se) + 1e-3, bias


@pytest.mark.slow
def test_quick_conditional_demo_uses_the_label(tmp_path):
    from itdiffusion.cli import main

    assert main(["demo", "--dataset", "digits", "--conditional", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("info_maps.png", "mi_maps.png", "confusion.png", "maps.npz"):
        assert (tmp_path / name).is_file()
    assert m["mi_nats_mean"] > 2 * m["mi_nats_se"] and m["zero_shot_accuracy"] > 0.5, m  # 30 images, 16 points
