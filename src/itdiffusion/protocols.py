"""The published test protocol (``protocol="paper"``): its points, estimators, tails and standard errors.

Kong, Brekelmans & Ver Steeg's evaluation code (``utilsitd/diffusionmodel.py::test_nll`` and
``utilsitd/utils.py::logistic_integrate`` in ``kxh001/ITdiffusion``), restated:

- **points**: ``n`` uniforms drawn once for all images, ``torch.manual_seed(seed)`` then
  ``torch.rand(n)`` in float32, mapped to ``[sigmoid(-clip), sigmoid(clip)]`` and by the logistic
  quantile ``a = loc + scale * logit(u)``; weights ``scale * tanh(clip/2) / (sigmoid(v) sigmoid(-v))``,
  ``v = (a - loc) / scale``, all in float32; the integral is the *mean* of ``w f(a)``; clip 4;
  ``loc = -mean(log lambda)``, ``scale = sqrt(1 + 3/pi var(log lambda))`` with the unbiased variance;
- **continuous** (and **dequantized**, on ``x + delta u`` without clamping): ``h_g + 1/2 mean_i w_i
  min(mse_i - mmse_g(a_i), 0)`` on the data-set mean curve ``mse`` (the raw pass clamps ``x_hat``
  to the data range); per image here: ``h_g + 1/2 mean_i w_i (mse_i - mmse_g(a_i))``, and the
  published figure is its "min with the Gaussian" version;
- **discrete**: ``1/2 mean_i w_i mse_round_i`` plus the tails ``L = 1/2 sum_k log(1 + e^(a_lo) lambda_k)``
  and ``R = 4 d sum_{j=1}^{J} exp(-(j - 1/2)^2 delta^2 e^(a_hi))``, ``J = int(range / delta)``
  (R misses a factor 1/2 in its exponent: it is not a bound, and is zero at the ranges used);
  soft rounding is a softmax over the grid with variance ``1 / (1 + e^a) = sigmoid(-a)``;
- **headline discrete figure** ``discrete_published_min``: the same with the per-point minimum of the
  mean raw and mean rounded curves;
- **standard error**: ``sqrt(var(v) / (N m))`` over all ``N x m`` (image, point) values ``v`` as if they
  were independent, though the points are shared.  Here, beside it, an honest one: the spread of
  the estimate over ``GROUPS`` disjoint groups of the (independent) points, at fixed images.

The published code draws fresh noise for each of its three calls per image and point; here the
raw and the rounded errors come from one call (same expectation, see docs/performance.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .core.errors import ErrorOptions
from .core.grid import DiscreteGrid
from .core.pipeline import Estimator, Pass, Sampling
from .core.proposal import LogisticProposal, Quadrature
from .core.spectrum import GaussianSpectrum

PAPER_CLIP = 4.0
GROUPS = 10  # groups of points for the honest standard error


def published_loc_scale(log_eigs: torch.Tensor) -> tuple[float, float]:
    """``loc = -mean(log lambda)`` and ``scale = sqrt(1 + 3/pi var(log lambda))`` (unbiased variance)."""
    log_eigs = log_eigs.double()
    var = log_eigs.var().item() if log_eigs.numel() > 1 else 0.0
    return -log_eigs.mean().item(), math.sqrt(1.0 + 3.0 / math.pi * var)


def published_points(n: int, loc: float, scale: float, clip: float = PAPER_CLIP, seed: int = 0):
    """The published points, sorted: ``(logsnr, weights, order)``.

    ``logsnr`` and ``weights`` ``(n,)`` float64 hold the float32 values of the published
    construction (weights already divided by ``n``: the published integral is a mean);
    ``order`` ``(n,)`` is each sorted point's position in the draw (used to group points).
    """
    loc32, scale32, clip32 = (torch.tensor(float(v), dtype=torch.float32) for v in (loc, scale, clip))
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.rand(int(n), generator=gen, dtype=torch.float32)
    u = torch.sigmoid(-clip32) + (torch.sigmoid(clip32) - torch.sigmoid(-clip32)) * u
    logsnr = loc32 + scale32 * torch.logit(u)
    v = (logsnr - loc32) / scale32
    weights = scale32 * torch.tanh(clip32 / 2) / (torch.sigmoid(v) * torch.sigmoid(-v))
    logsnr, order = logsnr.sort(stable=True)
    return logsnr.double(), weights[order].double() / n, order


def published_tails(spectrum: GaussianSpectrum, grid: DiscreteGrid, lo: float, hi: float) -> float:
    """The published discrete estimate's left and right tails, in nats (see module docstring)."""
    left = 0.5 * torch.log1p(torch.exp(lo + spectrum.log_eigs)).sum().item()
    j_max = int((grid.hi - grid.lo) / grid.delta)
    right = 4 * spectrum.d * sum(math.exp(-((j - 0.5) ** 2) * grid.delta**2 * math.exp(hi))
                                 for j in range(1, j_max + 1))
    return left + right


class PaperProtocol:
    """The published protocol for :class:`itdiffusion.evaluation.Evaluator` (``protocol="paper"``)."""

    def __init__(self, model, config, batch_size: int | None):
        self.model, self.config = model, config
        self.clip = PAPER_CLIP if config.clip is None else float(config.clip)
        loc, scale = published_loc_scale(model.spectrum.log_eigs)
        proposal = LogisticProposal(loc, scale, self.clip)
        logsnr, weights, self.order = published_points(config.n_points, loc, scale, self.clip, config.seed)
        self.quadrature = Quadrature(logsnr, weights, proposal)
        rounding = "soft" if config.soft else "hard"
        self.estimator = Estimator(proposal, Sampling(config.n_points, False, "midpoint"), config.discrete,
                                   rounding, None, loc, batch_size)
        self.batch_size = batch_size

    def passes(self) -> tuple[Pass, ...]:
        """The raw pass clamped to the data range (both roundings from its call) and the
        dequantized pass unclamped."""
        grid, batch = self.config.discrete, self.batch_size
        if grid is None:
            return (Pass("data", False, ErrorOptions(None, (), self.config.clamp, batch)),)
        data = Pass("data", False, ErrorOptions(grid, ("hard", "soft"), (grid.lo, grid.hi), batch,
                                                soft_variance="channel"))
        if not self.config.dequantize:
            return (data,)
        return data, Pass("dequantized", True, ErrorOptions(None, (), None, batch))

    def chunk_arrays(self, measured) -> dict[str, np.ndarray]:
        """Per-example arrays of a batch for the published estimators (see module docstring)."""
        spec, quad, cfg = self.model.spectrum, measured.quadrature, self.config
        logsnr = quad.logsnr.to(spec.log_eigs.device)
        mmse_g = spec.mmse(logsnr).to(quad.weights.device)
        h_g, arrays = spec.entropy(), {}
        for name, errs in measured.errors.items():
            arrays[f"{name}/gauss"] = _f32(errs.gauss)
            term = "continuous" if name == "data" else name
            _term(arrays, term, torch.full_like(errs.raw[:, 0], h_g), errs.raw - mmse_g, quad)
        if cfg.discrete is not None:
            errs = measured.errors["data"]
            tails = published_tails(spec, cfg.discrete, quad.lo, quad.hi)
            offset = torch.full_like(errs.raw[:, 0], tails)
            rounding, other = ("soft", "hard") if cfg.soft else ("hard", "soft")
            _term(arrays, "discrete", offset, errs.rounded(rounding), quad)
            _term(arrays, "discrete_published_min", offset, errs.raw, quad)
            arrays[f"data/{other}"] = _f32(errs.rounded(other))
        return arrays

    def mmse_g(self) -> np.ndarray:
        spec = self.model.spectrum
        return spec.mmse(self.quadrature.logsnr.to(spec.log_eigs.device)).cpu().numpy()

    def config_dict(self) -> dict:
        quad = self.quadrature
        return {"protocol": "paper", "loc": quad.proposal.loc, "scale": quad.proposal.scale, "clip": self.clip,
                "logsnr_range": [quad.lo, quad.hi], "n_strata": quad.n_points, "antithetic": False,
                "placement": "published iid points (seed {})".format(self.config.seed), "soft_variance": "channel",
                "no_gauss_min": ["discrete"]}  # the published discrete bound has no Gaussian part


def _f32(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy().astype(np.float32)


def _term(arrays: dict, name: str, offset: torch.Tensor, integrand: torch.Tensor, quad: Quadrature) -> None:
    arrays[f"{name}/offset"] = offset.detach().double().cpu().numpy()
    arrays[f"{name}/nll"] = (offset + 0.5 * quad.integrate(integrand)).detach().double().cpu().numpy()
    arrays[f"{name}/integrand"] = _f32(integrand)


def standard_errors(results, order: torch.Tensor, chunks) -> dict:
    """Honest (groups of points) and published (``sqrt(var / (N m))``) standard errors, nats.

    ``chunks``: the evaluation's rows (for the published formula's variance over all values).
    """
    groups = (order.cpu().numpy() % GROUPS)
    honest, published = {}, _published_variances(results, chunks)
    for name, term in results.terms.items():
        variants = (("", True),) if name == "discrete_published_min" else \
            (("", False),) if name == "discrete" else (("", False), ("_gauss_min", True))
        for suffix, gauss_min in variants:
            curve = np.minimum(term.integrand_mean, term.gauss_mean) if gauss_min else term.integrand_mean
            per_group = [term.offset.mean() + term.shift + 0.5 * (results.weights * curve)[groups == g].sum()
                         * len(curve) / max(1, (groups == g).sum()) for g in range(GROUPS)]
            honest[name + suffix] = float(np.std(per_group, ddof=1) / math.sqrt(GROUPS))
    return {"method": f"spread over {GROUPS} groups of the shared points, images fixed",
            "values": honest, "published": published}


def _published_variances(results, chunks) -> dict:
    """The published standard errors: continuous-type terms over the points where the mean curve
    is below the Gaussian's, the discrete term over all points."""
    m, w = len(results.weights), results.weights * len(results.weights)  # published weights (mean form)
    below_gauss = results.terms["continuous"].integrand_mean < 0  # its dequantized error uses these points too
    use = {name: below_gauss if name in ("continuous", "dequantized") else np.ones(m, bool) for name in results.terms}
    sums = {name: [0.0, 0.0, 0] for name in results.terms}
    for chunk in chunks:
        for name in results.terms:
            v = 0.5 * w * chunk.arrays[f"{name}/integrand"].astype(np.float64)
            v = v[:, use[name]]
            sums[name][0] += v.sum()
            sums[name][1] += (v * v).sum()
            sums[name][2] += v.size
    out = {}
    for name, (s1, s2, k) in sums.items():
        var = (s2 - s1 * s1 / k) / (k - 1) if k > 1 else math.nan
        out[name] = math.sqrt(max(var, 0.0) / (results.n_examples * m))
    if "discrete_published_min" in out:  # the published figure states the rounded curve's error
        out["discrete_published_min"] = out["discrete"]
    return out
