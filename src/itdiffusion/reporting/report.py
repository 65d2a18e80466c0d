"""The paper's tables and figures from evaluation results and training runs.

:func:`write_report` reads nothing itself: give it loaded :class:`~itdiffusion.results.Results`
(and run histories); it writes

* ``table.md`` / ``table.tex``: bits/dim with standard errors per model and estimator
  (continuous, discrete, dequantized), plus an ensemble row;
* ``estimates.md``: every estimate of every model (nats and bits/dim, clamped variants);
* ``summary.json``: the table's numbers;
* ``error_curves.png/.pdf``: error curves against the Gaussian mmse with the shaded gap;
* ``rounded_curves.png/.pdf`` (discrete data): raw against rounded error curves;
* ``loss_curves.png/.pdf`` (with runs): training loss and test NLL per epoch.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from .. import fileio as _io
from ..core.units import bpd
from ..results import Results, ensemble
from ..tables import Table, literal_text, tex_escape, with_se

COLUMNS = (("continuous", "Continuous"), ("discrete", "Discrete"), ("dequantized_discrete", "Dequantized"))
FIGURE_FORMATS = ("png", "pdf")
ENSEMBLE = "Ensemble"


@dataclass
class RunHistory:
    """Per-epoch numbers of one training run (from its ``history.json`` and ``run.json``)."""

    label: str
    d: int
    test_metric: str
    records: list[dict]

    @classmethod
    def load(cls, folder) -> "RunHistory":
        folder = Path(folder)
        history = folder / "history.json"
        if not history.is_file():
            raise ValueError(f"{folder}: not a run directory (no history.json)")
        records = _check_records(_read_json(history), history)
        info_path = folder / "run.json"
        if info_path.is_file():
            info = _read_json(info_path)
            d = info.get("d") if isinstance(info, dict) else None
            if not (isinstance(d, int) and not isinstance(d, bool) and d > 0):
                raise ValueError(f"{info_path}: damaged: no positive integer 'd' (dimensions) in it")
            return cls(str(info.get("label", folder.name)), d, str(info.get("test_metric", "test")), records)
        return cls(folder.name, _d_from_checkpoint(folder), "continuous", records)

    def curves(self) -> dict:
        val = [r.get("val_nll") for r in self.records]
        return {"label": self.label, "epochs": [r["epoch"] for r in self.records],
                "train_bpd": [bpd(r["train_loss"], self.d) for r in self.records],
                "test_bpd": [None if v is None else bpd(v, self.d) for v in val], "test_metric": self.test_metric}


def _read_json(path: Path):
    try:
        return json.loads(_io.read_bytes(path, _io.JSON_LIMIT).decode("utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None


def _is_number(value, optional: bool = False) -> bool:
    if value is None:
        return optional
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_records(records, path: Path) -> list[dict]:
    """``history.json``'s per-epoch records, each with an integer epoch and numeric losses."""
    if not isinstance(records, list):
        raise ValueError(f"{path}: damaged: expected a list of per-epoch records, got {type(records).__name__}")
    for i, r in enumerate(records):
        ok = (isinstance(r, dict) and isinstance(r.get("epoch"), int) and _is_number(r.get("train_loss"))
              and _is_number(r.get("val_nll"), optional=True))
        if not ok:
            raise ValueError(f"{path}: damaged: record {i + 1} lacks an integer 'epoch', a numeric 'train_loss' "
                             "or a numeric (or null) 'val_nll'")
    return records


def _d_from_checkpoint(folder: Path) -> int:
    from ..training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(folder / "checkpoint.safetensors")
    return int(ckpt.model_state["spectrum_mean"].numel())


def unique_labels(results: list[Results], names: list[str] | None = None) -> list[str]:
    """Row labels: ``names`` if given, else each result's model name, made unique."""
    if names is not None:
        if len(names) != len(results):
            raise ValueError(f"{len(names)} names for {len(results)} results")
        return list(names)
    labels, seen = [], {}
    for i, res in enumerate(results):
        label = str(res.config.get("model") or f"model {i + 1}")
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return labels


def mixed_data_warning(results: list[Results], labels: list[str]) -> str | None:
    """A warning when the rows were measured on different image sets (count, shape or pixels), else ``None``.

    The pixels are compared where ``itd eval`` recorded their SHA-256 (``config["data_sha256"]``), else the
    ``--data`` argument with ``--limit``/``--seed``; rows on different images are not comparable.
    """
    def identity(res: Results):
        cfg = res.config
        drawn = cfg.get("seed") if cfg.get("limit") else None  # --limit images are drawn by the seed
        data = cfg.get("data_sha256") or (cfg.get("data"), cfg.get("limit"), drawn)
        return res.n_examples, tuple(res.shape), data

    protocols = {str(r.config.get("protocol", "ours")) for r in results}
    if len(protocols) > 1:
        return ("warning: these results were estimated under different protocols (" + ", ".join(
            f"{label}: {r.config.get('protocol', 'ours')}" for label, r in zip(labels, results))
            + "), so their rows are not comparable")
    if len({identity(r) for r in results}) <= 1:
        return None
    sets = "; ".join(f"{label}: {r.n_examples} images of shape {tuple(r.shape)} from {r.config.get('data', '?')}"
                     for label, r in zip(labels, results))
    return f"warning: these results are on different image sets, so their rows are not comparable ({sets})"


def try_ensemble(results: list[Results], labels: list[str]) -> tuple[Results | None, str | None]:
    """The ensemble of all results, or ``None`` and the reason it cannot be formed."""
    if len(results) < 2:
        return None, "an ensemble needs at least two results"
    try:
        return ensemble(*results, names=labels), None
    except ValueError as err:
        return None, f"no ensemble: {err}"


def table_rows(rows: list[tuple[str, Results]]) -> list[dict]:
    """``[{model, continuous: {nats, se_nats, bpd, se_bpd} | None, ...}]`` for the table's columns."""
    out = []
    for label, res in rows:
        est = res.estimates
        row = {"model": label, "n_examples": res.n_examples, "d": res.d}
        for key, _ in COLUMNS:
            row[key] = None if est.get(key) is None else est[key].to_dict()
        out.append(row)
    return out


def _table(rows: list[tuple[str, Results]], latex: bool) -> Table:
    table = Table(["Model", *(f"{title} (bits/dim)" if not latex else title for _, title in COLUMNS)])
    for label, res in rows:
        est = res.estimates
        cells = [with_se(e.bpd, e.se_bpd, latex=latex) if e is not None else "–"
                 for e in (est.get(key) for key, _ in COLUMNS)]
        table.add([tex_escape(label) if latex else label, *cells], rule_before=latex and label == ENSEMBLE)
    return table


def markdown_table(rows: list[tuple[str, Results]], note: str | None = None) -> str:
    text = _table(rows, latex=False).to_markdown()
    return text + (f"\n{note}\n" if note else "")


def latex_table(rows: list[tuple[str, Results]], caption: str | None = None) -> str:
    return _table(rows, latex=True).to_latex(caption, escape=False)


CAPTION = ("Test negative log-likelihood in bits/dim with standard errors. Continuous: -log p(x); discrete: the "
           "upper bound on -log P(x) from the rounded error; dequantized: -log p(x+u) - log2(delta) per dim. "
           "The ensemble takes, at every log-SNR, the best mean error of the models and the Gaussian, chosen "
           "on the test data itself (slightly optimistic).")


def write_report(results: list[Results], out, *, names: list[str] | None = None, runs: list[RunHistory] = (),
                 formats=FIGURE_FORMATS) -> list[Path]:
    """Write the tables and figures listed in the module docstring into ``out``; returns the files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if not results and not runs:
        raise ValueError("nothing to report: give results files and/or runs")
    labels = unique_labels(results, names)
    rows = list(zip(labels, results))
    ens, why_not = try_ensemble(results, labels) if results else (None, None)
    mixed = mixed_data_warning(results, labels) if results else None
    if mixed:
        warnings.warn(mixed, stacklevel=2)
        why_not = mixed + ("" if why_not is None else f"\n\n{why_not}")
    if ens is not None:
        rows.append((ENSEMBLE, ens))
    written: list[Path] = []

    def emit(name: str, text: str) -> None:
        _io.write_atomic(out / name, lambda fh: fh.write(text.encode()))
        written.append(out / name)

    out.mkdir(parents=True, exist_ok=True)
    if results:
        emit("table.md", markdown_table(rows, why_not) + "\n" + CAPTION + "\n")
        emit("table.tex", latex_table(rows, CAPTION))
        emit("estimates.md", "\n".join(res.to_markdown(label) for label, res in rows))
        _io.save_json_atomic(out / "summary.json", {"rows": table_rows(rows), "ensemble_note": why_not,
                                                    "data_warning": mixed,
                                                    "caption": CAPTION})
        written.append(out / "summary.json")
        written += _figures(results, [literal_text(label) for label in labels], out, formats)
    if runs:
        from .plots import plot_loss_curves

        paths = [out / f"loss_curves.{f}" for f in formats]
        plot_loss_curves([{**r.curves(), "label": literal_text(r.label)} for r in runs], paths)
        written += paths
    return written


def _figures(results: list[Results], labels: list[str], out: Path, formats) -> list[Path]:
    from .plots import has_rounded, plot_error_curves, plot_rounded_curves

    paths = [out / f"error_curves.{f}" for f in formats]
    plot_error_curves(results, labels, paths)
    written = list(paths)
    if any(has_rounded(r) for r in results):
        paths = [out / f"rounded_curves.{f}" for f in formats]
        plot_rounded_curves(results, labels, paths)
        written += paths
    return written
