"""Likelihood methods side by side on one model and one data set.

``table = compare(model, x, methods=("it", "vlb", "ode"), generator=g)`` runs each method
on the same denoiser and returns a :class:`Comparison`: per method a :class:`MethodResult`
with per-example ``nll_nats`` ``(B,)``, the standard error of their mean, network calls
per example and wall time; with an analytic denoiser (one with ``log_prob``) the exact
value per example as well.

Methods:

- ``"it"``: the information-theoretic estimate, :meth:`ITDiffusion.nll`.
- ``"vlb"``: the discrete-time variational bound (:func:`baselines.vlb_discrete`) on the
  denoiser's own schedule when it has one (the ``Denoiser`` protocol's ``alphas_cumprod``,
  :mod:`itdiffusion.denoisers.protocol`), else on a log-SNR-linear schedule of
  ``baselines.DEFAULT_STEPS = 1000`` steps spanning the model's integration range.
- ``"vlb-ct"``: the continuous-time variational bound (:func:`baselines.vlb_continuous`).
- ``"ode"``: the probability-flow ODE likelihood (:func:`baselines.ode_nll`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .. import fileio as _io
from ..core.units import bpd as _bpd
from .. import baselines
from ..core.grid import DiscreteGrid
from ..core.noise import seed_from
from .options import ITOptions, ODEOptions, VLBCTOptions, VLBOptions, given_options  # noqa: F401
from ..denoisers.protocol import alphas_cumprod_of, eps_and_variance_of, variance_type_of

METHODS = ("it", "vlb", "vlb-ct", "ode")
LABELS = {
    "exact": "Exact",
    "it": "IT (I-MMSE)",
    "vlb": "Variational bound, discrete time",
    "vlb-ct": "Variational bound, continuous time",
    "ode": "Probability-flow ODE",
}


@dataclass
class MethodResult:
    """One method's estimates on a data set of ``B`` examples.

    Attributes:
        method: ``"it"``, ``"vlb"``, ``"vlb-ct"`` or ``"ode"``.
        nll_nats: ``(B,)`` float64 numpy array, per-example negative log-likelihood (or bound), nats.
        calls_per_example: network passes per example (forward, plus backward passes for
            the ODE's divergence).
        seconds: wall time of the method on the whole data set.
        d: dimension of one example.
        exact: ``(B,)`` float64 numpy array of the exact values when known, else ``None``.
        settings: what was run (JSON-able).
    """

    method: str
    nll_nats: np.ndarray
    calls_per_example: float
    seconds: float
    d: int
    exact: np.ndarray | None = None
    settings: dict = field(default_factory=dict)

    @property
    def nll(self) -> float:
        """Mean over examples, nats."""
        return float(self.nll_nats.mean())

    @property
    def se(self) -> float:
        """Standard error of :attr:`nll`, nats (NaN for a single example)."""
        return _se(self.nll_nats)

    @property
    def bpd(self) -> float:
        return _bpd(self.nll, self.d)

    @property
    def se_bpd(self) -> float:
        return _bpd(self.se, self.d)

    @property
    def error(self) -> float:
        """Mean of ``nll - exact`` in nats (NaN without an exact value)."""
        return math.nan if self.exact is None else float((self.nll_nats - self.exact).mean())

    @property
    def error_se(self) -> float:
        """Standard error of :attr:`error` (paired with the exact values), nats."""
        return math.nan if self.exact is None else _se(self.nll_nats - self.exact)

    @property
    def rmse(self) -> float:
        """Root mean square per-example error against the exact values, nats."""
        return math.nan if self.exact is None else float(np.sqrt(((self.nll_nats - self.exact) ** 2).mean()))

    def summary(self) -> dict:
        """JSON-able figures (no per-example arrays)."""
        return {
            "nll_nats": self.nll, "se_nats": self.se, "bpd": self.bpd, "se_bpd": self.se_bpd,
            "error_nats": self.error, "error_se_nats": self.error_se, "rmse_nats": self.rmse,
            "calls_per_example": self.calls_per_example, "seconds": self.seconds, "settings": self.settings,
        }


def _se(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else math.nan


@dataclass
class Comparison:
    """What :func:`compare` measured: ``table["vlb"]`` is that method's :class:`MethodResult`.

    A saved result record: its arrays (``exact``, each method's ``nll_nats``) are float64 numpy.
    """

    results: dict[str, MethodResult]
    d: int
    n_examples: int
    exact: np.ndarray | None = None
    discrete: bool = False

    def __getitem__(self, method: str) -> MethodResult:
        if method not in self.results:
            raise KeyError(f"no method {method!r}; have {list(self.results)}")
        return self.results[method]

    def __contains__(self, method: str) -> bool:
        return method in self.results

    def __iter__(self):
        return iter(self.results)

    def to_dict(self, per_example: bool = False) -> dict:
        """JSON-able: the exact value (if known) and every method's figures."""
        out = {"d": self.d, "n_examples": self.n_examples, "discrete": self.discrete, "exact": None, "methods": {}}
        if self.exact is not None:
            mean = float(self.exact.mean())
            out["exact"] = {"nll_nats": mean, "se_nats": _se(self.exact), "bpd": _bpd(mean, self.d)}
        for name, res in self.results.items():
            out["methods"][name] = res.summary()
            if per_example:
                out["methods"][name]["per_example_nats"] = res.nll_nats.tolist()
        if per_example and self.exact is not None:
            out["exact"]["per_example_nats"] = self.exact.tolist()
        return _io._json_safe(out)

    def to_json(self, per_example: bool = False) -> str:
        return json.dumps(self.to_dict(per_example), indent=2) + "\n"

    def to_markdown(self, title: str | None = None) -> str:
        """One row per method: NLL and bits/dim with standard errors, error against the exact
        value (when known), network calls per example and seconds."""
        has_exact = self.exact is not None
        head = ["Method", "NLL (nats)", "± se", "bits/dim", "± se"]
        head += ["error (nats)", "± se", "RMSE (nats)"] if has_exact else []
        head += ["calls/example", "seconds"]
        lines = [f"**{title}**", ""] if title else []
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        if has_exact:
            nats, se = float(self.exact.mean()), _se(self.exact)
            lines.append(f"| {LABELS['exact']} | {nats:.4f} | {_f(se)} | {_bpd(nats, self.d):.4f} | {_f(_bpd(se, self.d))} "
                         "| 0 | – | 0 | – | – |")
        for name, r in self.results.items():
            cells = [LABELS.get(name, name), f"{r.nll:.4f}", _f(r.se), f"{r.bpd:.4f}", _f(r.se_bpd)]
            if has_exact:
                cells += [f"{r.error:+.4f}", _f(r.error_se), f"{r.rmse:.4f}"]
            cells += [f"{r.calls_per_example:.0f}", f"{r.seconds:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        kind = "-log P(x) on the data grid" if self.discrete else "-log p(x)"
        lines += ["", f"{self.n_examples} examples, d = {self.d}; {kind}; se = standard error over examples."]
        return "\n".join(lines) + "\n"

    def save(self, path, *, title: str | None = None, meta: dict | None = None,
             per_example: bool = False) -> tuple[Path, Path]:
        """Write ``path`` (JSON, with ``meta`` merged in) and the Markdown table beside it
        (same name, ``.md``), each atomically.  Returns both paths."""
        path = Path(path)
        if path.suffix == ".md":
            raise ValueError(f"{path}: give the JSON path; the Markdown table is written beside it")
        md_path = path.with_suffix(".md")
        _io.save_json_atomic(path, {**(meta or {}), **self.to_dict(per_example)})
        text = self.to_markdown(title)
        _io.write_atomic(md_path, lambda fh: fh.write(text.encode()))
        return path, md_path


def _numpy(values: torch.Tensor) -> np.ndarray:
    """A ``(B,)`` tensor as the float64 numpy array a result record holds."""
    return values.detach().double().cpu().numpy()


def _f(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.4f}"


# ============================================================================ schedules and variances
def denoiser_schedule(denoiser) -> torch.Tensor | None:
    """The denoiser's own ``alphas_cumprod`` ``(T,)`` (the :class:`~itdiffusion.denoisers.protocol.Denoiser`
    protocol's optional schedule), or ``None``."""
    return alphas_cumprod_of(denoiser)


def learned_variance_denoiser(denoiser) -> Callable | None:
    """``f(z, logsnr) -> (eps_hat, v)`` for denoisers with a learned variance output (the protocol's
    ``eps_and_variance``), else ``None``.  The same network call yields both halves."""
    return eps_and_variance_of(denoiser)


def default_variance(denoiser) -> str:
    """The denoiser's ``variance_type`` when it states one (``"learned"`` only with ``eps_and_variance``),
    else ``"fixed_large"``."""
    if learned_variance_denoiser(denoiser) is not None:
        return "learned"
    kind = variance_type_of(denoiser)
    return kind if kind in ("fixed_small", "fixed_large") else "fixed_large"


# ============================================================================ methods
def _run_it(model, x, seed, discrete, opts) -> tuple[torch.Tensor, float, dict]:
    n_points = int(opts.get("n_points", 256))
    kwargs = {k: opts[k] for k in ("clip", "placement", "antithetic", "batch_size", "clamp") if k in opts}
    if discrete is not None:
        kwargs["rounding"] = opts.get("rounding", "hard")
    nll = model.nll(x, n_points, seed=seed, discrete=discrete, **kwargs)
    return nll, n_points, {"n_points": n_points, **kwargs}


def _run_vlb(model, x, seed, discrete, opts) -> tuple[torch.Tensor, float, dict]:
    abar = opts.get("alphas_cumprod")
    source = "given"
    if abar is None:
        abar = denoiser_schedule(model.denoiser)
        source = "denoiser"
    if abar is None:
        steps = int(opts.get("steps", baselines.DEFAULT_STEPS))
        abar = baselines.logsnr_linear_alphas_cumprod(*model.logsnr_range(opts.get("clip")), steps)
        source = f"log-SNR linear over the model's range, {steps} steps"
    variance = opts.get("variance", "auto")
    variance = default_variance(model.denoiser) if variance == "auto" else variance
    denoiser = learned_variance_denoiser(model.denoiser) if variance == "learned" else model
    if denoiser is None:
        raise ValueError("variance='learned' needs a network with a variance output (IDDPM, out_channels = 2C)")
    clamp = opts.get("clamp", "auto")
    if isinstance(clamp, str) and clamp == "auto":
        clamp = None if discrete is None else (discrete.lo, discrete.hi)
    terms = baselines.vlb_discrete(denoiser, x, abar, seed=seed, variance=variance, discrete=discrete,
                                   n_calls=opts.get("n_calls"), clamp=clamp, batch_size=opts.get("batch_size"))
    settings = {"schedule": source, "steps": len(abar), "variance": variance, "n_calls": opts.get("n_calls"),
                "clamp": None if clamp is None else list(clamp), **_term_means(terms)}
    return terms.nll, terms.calls_per_example, settings


def _run_vlb_ct(model, x, seed, discrete, opts) -> tuple[torch.Tensor, float, dict]:
    kwargs = {k: opts[k] for k in ("clip", "control_variate", "antithetic", "batch_size") if k in opts}
    n_points = int(opts.get("n_points", 256))
    terms = baselines.vlb_continuous(model, x, n_points, seed=seed, discrete=discrete, **kwargs)
    lo, hi = model.logsnr_range(opts.get("clip"))
    return terms.nll, terms.calls_per_example, {"n_points": n_points, "logsnr_range": [lo, hi], **kwargs,
                                                **_term_means(terms)}


def _run_ode(model, x, seed, discrete, opts) -> tuple[torch.Tensor, float, dict]:
    keys = ("solver", "n_steps", "rtol", "atol", "trace", "n_probes", "clip")
    kwargs = {k: opts[k] for k in keys if k in opts}
    result = baselines.ode_nll(model, x, seed=seed, discrete=discrete, **kwargs)
    settings = {**kwargs, "nfe": result.nfe, "vjps_per_call": result.vjps_per_call, "steps": result.steps,
                "rejected_steps": result.rejected}
    return result.nll, result.calls_per_example, settings


def _term_means(terms: baselines.BoundTerms) -> dict:
    return {"prior_nats": terms.prior.mean().item(), "diffusion_nats": terms.diffusion.mean().item(),
            "decoder_nats": terms.decoder.mean().item()}


_RUNNERS = {"it": _run_it, "vlb": _run_vlb, "vlb-ct": _run_vlb_ct, "ode": _run_ode}


def exact_nll(model, x: torch.Tensor) -> torch.Tensor | None:
    """``-log p(x)`` from an analytic denoiser's ``log_prob`` (``GaussianMixture``, ``FiniteDiscrete``,
    ``GaussianSpectrum``), else ``None``."""
    log_prob = getattr(model.denoiser, "log_prob", None)
    if not callable(log_prob):
        return None
    with torch.no_grad():
        return -log_prob(x).double().to(x.device)


def compare(
    model,
    x: torch.Tensor,
    methods: Sequence[str] = ("it", "vlb", "ode"),
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    discrete: DiscreteGrid | None = None,
    exact: torch.Tensor | str | None = "auto",
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Comparison:
    """Run several likelihood methods on one model and data set.

    Args:
        model: an :class:`itdiffusion.ITDiffusion`.
        x: data ``(B, *shape)`` on the model's device.
        methods: any of ``"it"``, ``"vlb"``, ``"vlb-ct"``, ``"ode"`` (run in this order).
        generator / seed: randomness; one run seed is drawn and every method uses it
            (each with its own per-example streams).
        discrete: the data grid: every method then bounds ``-log P(x)`` (the ODE through
            uniform dequantization).
        exact: ``(B,)`` exact ``-log p(x)`` in nats, ``None``, or ``"auto"`` (the denoiser's
            ``log_prob`` when it has one).
        options: per-method settings, each a dict or the method's dataclass of
            :mod:`itdiffusion.baselines.options` (:class:`ITOptions`, :class:`VLBOptions`,
            :class:`VLBCTOptions`, :class:`ODEOptions`), e.g. ``{"it": {"n_points": 512},
            "vlb": VLBOptions(variance="fixed_small", steps=4000), "ode": {"solver": "rk4",
            "n_steps": 32, "n_probes": 4}}``.  A key that is not a field raises ``ValueError``.

    Returns:
        :class:`Comparison`; ``table["it"].nll_nats`` is a ``(B,)`` float64 numpy array, nats.
    """
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    options = dict(options or {})
    bad = [k for k in options if k not in METHODS]
    if bad:
        raise ValueError(f"options given for unknown method(s) {bad}; methods are {', '.join(METHODS)}")
    options = {name: given_options(name, value) for name, value in options.items()}
    model.check_data(x, discrete)
    seed = seed_from(generator) if seed is None else int(seed)
    if isinstance(exact, str):
        if exact != "auto":
            raise ValueError(f"exact must be a tensor, None or 'auto', got {exact!r}")
        exact = exact_nll(model, x)
    elif exact is not None:
        exact = torch.as_tensor(exact, dtype=torch.float64).reshape(-1)
        if len(exact) != len(x):
            raise ValueError(f"exact has {len(exact)} values for {len(x)} examples")
    exact = None if exact is None else _numpy(exact)
    results = {}
    for name in methods:
        start = time.perf_counter()
        nll, calls, settings = _RUNNERS[name](model, x, seed, discrete, options.get(name, {}))
        seconds = time.perf_counter() - start
        results[name] = MethodResult(method=name, nll_nats=_numpy(nll), calls_per_example=float(calls),
                                     seconds=seconds, d=model.d, exact=exact, settings={"seed": seed, **settings})
    return Comparison(results=results, d=model.d, n_examples=len(x), exact=exact, discrete=discrete is not None)


# ============================================================================ demonstration model
def demo_mixture(d: int, k: int = 5, seed: int = 0):
    """The built-in Gaussian mixture of ``itd compare --model gmm-exact`` and the benchmark.

    ``k`` isotropic components in ``d`` dimensions: means ``N(0, 36/d I)`` (norm about 6),
    standard deviations uniform in [0.3, 1.3], weights uniform in [0.5, 1.5] (normalised),
    all drawn from ``seed``.  Returns ``(mixture, spectrum)`` with the mixture's exact mean
    and covariance as the Gaussian reference.
    """
    from ..core.analytic import GaussianMixture

    gen = torch.Generator().manual_seed(int(seed))
    means = torch.randn(k, d, generator=gen, dtype=torch.float64) * 6.0 / math.sqrt(d)
    stds = torch.rand(k, generator=gen, dtype=torch.float64) + 0.3
    weights = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    mixture = GaussianMixture(means, stds, weights)
    return mixture, mixture_spectrum(mixture)


def mixture_spectrum(mixture):
    """The exact mean and covariance of an isotropic :class:`GaussianMixture` as a :class:`GaussianSpectrum`."""
    from ..core.spectrum import GaussianSpectrum

    w = mixture.log_weights.exp()
    means, variances = mixture.means, mixture.log_vars.exp()
    mean = w @ means
    centred = means - mean
    cov = (centred.T * w) @ centred + (w @ variances) * torch.eye(mixture.d, dtype=torch.float64)
    eigs, vecs = torch.linalg.eigh(0.5 * (cov + cov.T))
    return GaussianSpectrum(mean=mean, eigvecs=vecs, log_eigs=eigs.clamp_min(1e-12).log(), shape=mixture.shape)
