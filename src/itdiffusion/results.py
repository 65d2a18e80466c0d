"""Typed evaluation results: estimates with standard errors, curves, files and tables."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import fileio as _io
from .core.units import bpd
from .tables import Table, number, tex_escape, with_se

FORMAT = "itdiffusion.results"
VERSION = 2  # version 1 named the per-example arrays nll / nll_clamped and the estimates *_clamped
GAUSS_MIN = "_gauss_min"
MIN_ONLY = ("discrete_published_min",)  # terms whose only estimate is the per-point minimum of two curves

# Row order and labels of tables.
ESTIMATE_LABELS = {
    "continuous": "Continuous -log p(x)",
    "continuous_gauss_min": "Continuous, min with Gaussian",
    "discrete": "Discrete -log P(x) (upper bound)",
    "discrete_gauss_min": "Discrete, min with Gaussian",
    "discrete_published_min": "Discrete, min of raw and rounded mean curves (published)",
    "dequantized": "Dequantized -log p(x+u)",
    "dequantized_gauss_min": "Dequantized, min with Gaussian",
    "dequantized_discrete": "Dequantized, discrete limit",
    "dequantized_discrete_gauss_min": "Dequantized, discrete limit, min with Gaussian",
}
_GAUSS_MIN_WORDS = (", the mean error at each log-SNR the lower of the model's and the Gaussian denoiser's "
                    "(chosen on these data: slightly optimistic)")
# What each row measures, in the paper's words (a column of the full table).
ESTIMATE_MEANINGS = {
    "continuous": "density of x as continuous data (on a grid: not comparable with published bits/dim, "
                  "can be negative)",
    "discrete": "upper bound on -log P(x) of the grid values, from the rounded denoiser error (Kong et al., "
                "discrete estimator)",
    "discrete_published_min": "the published code's discrete figure: per-point minimum of the mean raw and "
                              "rounded curves",
    "dequantized": "density of x + u, u uniform in the grid cell (density units: not comparable, see the "
                   "discrete limit)",
    "dequantized_discrete": "upper bound on -log P(x) by uniform dequantization: -log p(x+u) - d log(delta), "
                            "the bits/dim that likelihood papers report",
}
ESTIMATE_MEANINGS.update({k + GAUSS_MIN: f"as '{ESTIMATE_LABELS[k]}'" + _GAUSS_MIN_WORDS
                          for k in ("continuous", "discrete", "dequantized", "dequantized_discrete")})
# The number to report, first found: comparable with the literature for data on a grid.
HEADLINE = ("dequantized_discrete", "discrete", "continuous")


@dataclass(frozen=True)
class Estimate:
    """A mean negative log-likelihood over a data set, with its standard error.

    ``nats`` is per example; ``bpd`` divides by ``d ln 2``.  ``se_nats`` is NaN when it
    cannot be computed (an ensemble without per-sample curves).
    """

    nats: float
    se_nats: float
    d: int

    @property
    def bpd(self) -> float:
        return bpd(self.nats, self.d)

    @property
    def se_bpd(self) -> float:
        return bpd(self.se_nats, self.d)

    def to_dict(self) -> dict:
        return {"nats": self.nats, "se_nats": self.se_nats, "bpd": self.bpd, "se_bpd": self.se_bpd}

    @classmethod
    def from_samples(cls, values: np.ndarray, d: int) -> "Estimate":
        values = np.asarray(values, dtype=np.float64)
        se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
        return cls(float(values.mean()), float(se), d)


@dataclass
class Term:
    """One estimator over a data set of ``N`` examples at ``m`` shared log-SNR points.

    Per example: ``nll_nats = offset + shift + 1/2 sum_i weights_i * integrand_i``.  The
    "min with Gaussian" version replaces, at each point where the data-set mean of
    ``integrand`` exceeds that of ``gauss`` (the Gaussian denoiser's own integrand), the
    integrand by ``gauss``.

    Attributes:
        offset: ``(N,)`` closed-form part, nats.
        integrand_mean, gauss_mean: ``(m,)`` data-set means.
        nll_nats, nll_gauss_min: ``(N,)`` per-example estimates, nats.
        integrand, gauss: ``(N, m)`` per-example curves, or ``None`` if not kept.
        shift: constant added to every example (``-d log delta`` for a discrete limit).
    """

    offset: np.ndarray
    integrand_mean: np.ndarray
    gauss_mean: np.ndarray
    nll_nats: np.ndarray
    nll_gauss_min: np.ndarray
    integrand: np.ndarray | None = None
    gauss: np.ndarray | None = None
    shift: float = 0.0

    @property
    def has_curves(self) -> bool:
        return self.integrand is not None and self.gauss is not None

    def __repr__(self) -> str:  # the arrays' sizes, not their values
        curves = "per-example curves" if self.has_curves else "no per-example curves"
        return f"Term({len(self.nll_nats)} examples x {len(self.integrand_mean)} points, {curves})"


@dataclass
class Results:
    """What :func:`itdiffusion.evaluate` measured on a data set.

    Attributes:
        logsnr, weights: ``(m,)`` shared points and integration weights (sum form).
        shape: shape of one example; ``d = prod(shape)``.
        n_examples: number of examples evaluated.
        config: how it was measured (JSON-able): loc, scale, clip, mode, seed, grid, ...
        curves: ``(m,)`` data-set mean curves for plots: ``mmse`` (the model's raw error),
            ``mmse_gauss`` (the Gaussian denoiser on the same noise), ``mmse_gauss_analytic``
            (the Gaussian's mmse curve), and where measured ``mmse_hard``, ``mmse_soft``,
            ``mmse_dequantized``.
        terms: :class:`Term` per estimator: ``continuous``, ``discrete``, ``dequantized``.
        ids: each example's identity (``itd eval``: its file path relative to the data root, or
            its index into the array or archive), in the order of the per-example arrays; or ``None``.
    """

    logsnr: np.ndarray
    weights: np.ndarray
    shape: tuple[int, ...]
    n_examples: int
    config: dict
    curves: dict[str, np.ndarray]
    terms: dict[str, Term]
    members: list[str] = field(default_factory=list)
    ids: list[str] | None = None

    @property
    def d(self) -> int:
        return int(np.prod(self.shape))

    def __repr__(self) -> str:
        """One line: what was measured and the headline estimates (no arrays)."""
        estimates = self.estimates
        shown = [k for k in ("continuous", "discrete", "dequantized_discrete") if k in estimates]
        text = ", ".join(f"{k}={estimates[k].bpd:.4f}±{estimates[k].se_bpd:.4f}" for k in shown)
        model = self.config.get("model")
        return (f"Results({'' if model is None else repr(model) + ', '}{self.n_examples} examples of shape "
                f"{tuple(self.shape)}, {len(self.logsnr)} points; bits/dim {text}; {len(estimates)} in .estimates)")

    # ----------------------------------------------------------------- estimates
    @property
    def estimates(self) -> dict[str, Estimate]:
        """Every estimate, in table order (see ``ESTIMATE_LABELS``)."""
        out, plain_only = {}, set(self.config.get("no_gauss_min", ()))
        for name, term in self.terms.items():
            if name in MIN_ONLY:
                out[name] = self._estimate(term, gauss_min=True)
                continue
            out[name] = self._estimate(term, gauss_min=False)
            if name not in plain_only:
                out[name + GAUSS_MIN] = self._estimate(term, gauss_min=True)
        if "dequantized" in self.terms:
            shift = -self.d * math.log(self.config["grid"]["delta"])
            for suffix in ("", GAUSS_MIN):
                est = out["dequantized" + suffix]
                out["dequantized_discrete" + suffix] = replace(est, nats=est.nats + shift)
        honest = (self.config.get("standard_errors") or {}).get("values", {})
        out = {k: replace(v, se_nats=honest.get(k.replace("_discrete", "") if k.startswith("dequantized") else k,
                                                  v.se_nats)) for k, v in out.items()}
        return {k: out[k] for k in ESTIMATE_LABELS if k in out}

    def _estimate(self, term: Term, gauss_min: bool) -> Estimate:
        values = term.nll_gauss_min if gauss_min else term.nll_nats
        if np.isfinite(values).all():
            return Estimate.from_samples(values + term.shift, self.d)
        curve = np.minimum(term.integrand_mean, term.gauss_mean) if gauss_min else term.integrand_mean
        nats = term.offset.mean() + term.shift + 0.5 * float((self.weights * curve).sum())
        return Estimate(float(nats), math.nan, self.d)

    @property
    def headline(self) -> str:
        """The name of the estimate to report: on a grid the tightest plain upper bound on ``-log P(x)``
        in order of ``HEADLINE`` (the dequantized one when measured), else the continuous ``-log p(x)``."""
        estimates = self.estimates
        return next(name for name in HEADLINE if name in estimates)

    def headline_text(self) -> str:
        """One line: the headline estimate in bits/dim with its standard error, its name and what it is."""
        name = self.headline
        est = self.estimates[name]
        meaning = ESTIMATE_MEANINGS[name] if name != "continuous" else "-log p(x) of continuous data"
        return (f"{est.bpd:.4f} ± {est.se_bpd:.4f} bits/dim ({est.nats:.4f} nats per example)  "
                f"[estimates[{name!r}]: {meaning}; {self.n_examples} examples, {len(self.logsnr)} log-SNR points]")

    def __getitem__(self, name: str) -> Estimate:
        estimates = self.estimates
        if name not in estimates:
            raise KeyError(f"no estimate {name!r}; have {list(estimates)}")
        return estimates[name]

    def per_example(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per-example ``(nats, se_nats)`` ``(N,)`` arrays of every estimate (names as :attr:`estimates`).

        The standard error of one example's estimate is the spread of its weighted integrand over
        the log-SNR points, ``1/2 std_i(m w_i f_i) / sqrt(m)``: the importance-sampling error for
        i.i.d. points, an upper estimate for midpoint or stratified ones; NaN without per-example
        curves (``per_sample_curves=False``).
        """
        out, m = {}, len(self.weights)
        for name in self.estimates:
            base = name.removesuffix(GAUSS_MIN)
            gauss_min = name.endswith(GAUSS_MIN) or name in MIN_ONLY
            term = self.terms[base.replace("_discrete", "") if base.startswith("dequantized") else base]
            shift = term.shift - (self.d * math.log(self.config["grid"]["delta"]) if "_discrete" in base
                                  and base.startswith("dequantized") else 0.0)
            values = (term.nll_gauss_min if gauss_min else term.nll_nats) + shift
            se = np.full(len(values), math.nan)
            if term.has_curves and m > 1:
                curve = term.integrand
                if gauss_min:
                    curve = np.where(term.integrand_mean > term.gauss_mean, term.gauss, term.integrand)
                spread = m * self.weights * curve
                if np.allclose(term.offset + 0.5 * spread.mean(1) + shift, values, rtol=1e-5, atol=1e-3):  # curves are kept in float32
                    se = 0.5 * spread.std(1, ddof=1) / math.sqrt(m)
            out[name] = (values, se)
        return out

    def write_per_example_csv(self, path) -> None:
        """One row per example: its id (or its position), and bits/dim with standard error of every estimate."""
        import csv
        import io

        rows = self.per_example()
        ids = self.ids if self.ids is not None else [str(i) for i in range(self.n_examples)]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["id"] + [f"{name}_{key}" for name in rows for key in ("bpd", "se_bpd")])
        for i, image in enumerate(ids):
            cells = [image]
            for values, se in rows.values():
                cells += [f"{bpd(values[i], self.d):.6f}", "" if math.isnan(se[i]) else f"{bpd(se[i], self.d):.6f}"]
            writer.writerow(cells)
        _io.write_atomic(path, lambda fh: fh.write(buffer.getvalue().encode()))

    # ----------------------------------------------------------------- tables
    def to_markdown(self, title: str | None = None, meanings: bool = False) -> str:
        """The estimates as a Markdown table (nats and bits/dim with standard errors; ``meanings=True``
        adds a column saying what each row measures)."""
        table = Table(["Estimate", "nats", "± se", "bits/dim", "± se"] + (["what it measures"] if meanings else []),
                      left=(0, 5))
        for name, est in self.estimates.items():
            table.add([ESTIMATE_LABELS[name], f"{est.nats:.4f}", number(est.se_nats), f"{est.bpd:.4f}",
                       number(est.se_bpd)] + ([ESTIMATE_MEANINGS[name]] if meanings else []))
        return table.to_markdown(title)

    def to_latex(self, caption: str | None = None) -> str:
        """The estimates as a LaTeX ``tabular`` (bits/dim with standard errors)."""
        table = Table(["Estimate", "bits/dim"])
        for name, est in self.estimates.items():
            label = re.sub(r"-log (\w)\(([^)]*)\)", r"$-\\log \1(\2)$", tex_escape(ESTIMATE_LABELS[name]))
            table.add([label, with_se(est.bpd, est.se_bpd, latex=True)])
        return table.to_latex(caption, escape=False)

    def summary(self) -> dict:
        """JSON-able estimates: ``{name: {nats, se_nats, bpd, se_bpd}}``."""
        return {name: e.to_dict() for name, e in self.estimates.items()}

    # ----------------------------------------------------------------- files
    def save(self, path) -> None:
        """Write ``path`` (JSON: config and estimates) and its arrays beside it (same name, ``.npz``).

        Both are written atomically and carry no pickle.
        """
        path = Path(path)
        if path.suffix.lower() == ".npz":
            raise ValueError(f"{path}: give the results' .json name; the arrays go beside it in "
                             f"{path.with_suffix('.npz').name}")
        arrays = {"logsnr": self.logsnr, "weights": self.weights}
        arrays.update({f"curve/{k}": v for k, v in self.curves.items()})
        for name, term in self.terms.items():
            for key in ("offset", "integrand_mean", "gauss_mean", "nll_nats", "nll_gauss_min", "integrand", "gauss"):
                value = getattr(term, key)
                if value is not None:
                    arrays[f"term/{name}/{key}"] = np.asarray(value)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "shape": list(self.shape),
            "n_examples": self.n_examples,
            "config": self.config,
            "members": self.members,
            "shifts": {name: term.shift for name, term in self.terms.items()},
            "estimates": self.summary(),
            "headline": self.headline,
        }
        if self.ids is not None:
            if len(self.ids) != self.n_examples:
                raise ValueError(f"{len(self.ids)} ids for {self.n_examples} examples")
            arrays["ids"] = np.asarray([str(i) for i in self.ids], dtype=np.str_)
        arrays["meta"] = np.frombuffer(json.dumps(_io._json_safe(meta)).encode(), dtype=np.uint8)
        _io.save_npz_atomic(_npz_path(path), arrays)
        _io.save_json_atomic(path, meta)

    @classmethod
    def load(cls, path) -> "Results":
        """Read results written by :meth:`save` (give the ``.json`` or the ``.npz`` path).

        The arrays come from the ``.npz``; a ``.json`` path that exists is read too, so a
        truncated or foreign JSON file is refused (``ValueError`` naming it) rather than ignored.
        """
        path = Path(path)
        if not path.exists() and not _npz_path(path).exists():
            raise ValueError(f"{path}: no such file")
        summary = None
        if path.suffix != ".npz" and path.exists():
            summary = _io.load_json(path)
            if summary.get("format") != FORMAT:
                raise ValueError(f"{path}: expected a {FORMAT} file, found {summary.get('format')!r}")
            if summary.get("version") not in (VERSION, 1):
                raise ValueError(f"{path}: {FORMAT} version {summary.get('version')!r} is not supported "
                                 f"(this is version {VERSION})")
        arrays = _io.load_npz(_npz_path(path))
        meta = _io.read_meta(arrays, _npz_path(path), FORMAT, VERSION, older=(1,))
        if summary is not None and summary != meta:  # both are written from one description
            raise ValueError(f"{path} and {_npz_path(path).name} disagree (edited, or written by different runs); "
                             "rerun itd eval or restore the pair")
        names = _V1_NAMES if meta["version"] == 1 else {}
        try:
            real = lambda key: _io.real_array(arrays, key)  # noqa: E731
            terms = {}
            for name, shift in meta["shifts"].items():
                need = lambda key: real(f"term/{name}/{names.get(key, key)}")  # noqa: E731
                maybe = lambda key: need(key) if f"term/{name}/{key}" in arrays else None  # noqa: E731
                terms[name] = Term(
                    offset=need("offset"), integrand_mean=need("integrand_mean"), gauss_mean=need("gauss_mean"),
                    nll_nats=need("nll_nats"), nll_gauss_min=need("nll_gauss_min"), integrand=maybe("integrand"),
                    gauss=maybe("gauss"), shift=float(shift),
                )
            curves = {k.split("/", 1)[1]: real(k) for k in arrays if k.startswith("curve/")}
            return cls(
                logsnr=real("logsnr"), weights=real("weights"), shape=tuple(int(s) for s in meta["shape"]),
                n_examples=int(meta["n_examples"]), config=dict(meta["config"]), curves=curves, terms=terms,
                members=list(meta.get("members", [])), ids=_ids(arrays, int(meta["n_examples"])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{_npz_path(path)}: not a valid results file ({type(err).__name__}: {err})") from None


def _ids(arrays: dict, n: int) -> list[str] | None:
    """The saved example ids (``None`` in files written without them)."""
    if "ids" not in arrays:
        return None
    ids = arrays["ids"]
    if ids.dtype.kind != "U" or ids.shape != (n,):
        raise ValueError(f"ids must be {n} strings, got {ids.dtype} {ids.shape}")
    return ids.tolist()


_V1_NAMES = {"nll_nats": "nll", "nll_gauss_min": "nll_clamped"}  # array names of version-1 files


def _npz_path(path: Path) -> Path:
    return path.with_suffix(".npz")


def ensemble(*results: Results, names: list[str] | None = None) -> Results:
    """Per-point minimum of the members' mean curves, the Gaussian denoiser included.

    The mmse is a minimum over all denoisers, so at every log-SNR the best member still
    gives a valid estimate.  Choosing the minimum on the evaluated data is slightly
    optimistic.  Members must share the log-SNR points, the data and the Gaussian
    reference (their offsets must agree).  Standard errors are computed when every
    member kept per-sample curves (``per_sample_curves=True``), else they are NaN.
    """
    if not results:
        raise ValueError("ensemble needs at least one Results")
    first = results[0]
    for other in results[1:]:
        if other.logsnr.shape != first.logsnr.shape or not np.allclose(other.logsnr, first.logsnr):
            raise ValueError("ensemble members must share the same log-SNR points (same n_points, loc, scale, clip, mode)")
        if other.n_examples != first.n_examples or other.shape != first.shape:
            raise ValueError("ensemble members must be evaluated on the same data")
    common = [name for name in first.terms if all(name in r.terms for r in results)]
    terms = {name: _ensemble_term([r.terms[name] for r in results], first.weights) for name in common}
    curves = {
        key: np.minimum.reduce([r.curves[key] for r in results] + [first.curves["mmse_gauss"]])
        for key in first.curves
        if all(key in r.curves for r in results)
    }
    labels = names or [r.config.get("model", f"member {i}") for i, r in enumerate(results)]
    return replace(first, curves=curves, terms=terms, members=list(labels), config={**first.config, "model": "ensemble"})


def _ensemble_term(members: list[Term], weights: np.ndarray) -> Term:
    offset = members[0].offset
    for m in members[1:]:
        if not np.allclose(m.offset, offset, rtol=1e-6, atol=1e-6):
            raise ValueError("ensemble members use different Gaussian references (spectra) or data")
    gauss_mean = members[0].gauss_mean
    candidates = np.stack([m.integrand_mean for m in members] + [gauss_mean])  # the Gaussian is last
    best = candidates.argmin(0)
    term = Term(offset=offset, integrand_mean=candidates.min(0), gauss_mean=gauss_mean,
                nll_nats=np.full_like(offset, np.nan), nll_gauss_min=np.full_like(offset, np.nan),
                shift=members[0].shift)
    if all(m.has_curves for m in members):
        per = [m.integrand for m in members] + [members[0].gauss]  # (N, m) each; the Gaussian last
        term.integrand = np.take_along_axis(np.stack(per), best[None, None, :].repeat(len(offset), 1), 0)[0]
        term.gauss = members[0].gauss
        # Relative to the member chosen most often, whose float64 estimate is exact: only the
        # points chosen from another curve add their (float32) difference.
        ref = int(np.bincount(best[best < len(members)], minlength=len(members)).argmax())
        change = np.zeros_like(offset)
        for k, curve in enumerate(per):
            pick = (best == k) & (k != ref)
            if pick.any():
                diff = curve[:, pick].astype(np.float64) - per[ref][:, pick].astype(np.float64)
                change += (diff * weights[pick]).sum(-1)
        term.nll_nats = term.nll_gauss_min = members[ref].nll_nats + 0.5 * change
    return term
