"""``itd report --layout paper``: results laid out as the paper's table, its published figures apart.

Rows are models with their training objective; columns the variational bound (continuous and
discrete, from ``itd compare`` files given with ``--bounds``) and the IT estimates (continuous,
discrete, dequantized).  Which IT estimate fills a column depends on the protocol the results
were made with: under ``--protocol paper`` the published code's figures (the data-set mean
curve's minimum with the Gaussian's, the minimum of the mean raw and rounded curves), under
ours this package's estimates (each a valid estimate on its own; see ``docs/protocols.md``).
The paper's own CIFAR-10 figures follow in a separate, labelled block: they are never mixed
with measured ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..results import Results
from ..tables import Table, tex_escape, with_se

HEADER = ["Model", "Objective", "Var. bound (continuous)", "IT (continuous)", "Var. bound (discrete)",
          "IT (discrete)", "IT (dequantized)"]
IT_COLUMNS = {
    "paper": ("continuous_gauss_min", "discrete_published_min", "dequantized_discrete_gauss_min"),
    "ours": ("continuous", "discrete", "dequantized_discrete"),
}
# Kong, Brekelmans & Ver Steeg (ICLR 2023), CIFAR-10 test, bits/dim (their Table; "" = not reported).
PUBLISHED = [
    ("DDPM", "original", "", "", "3.37", "3.68", "3.51"),
    ("IDDPM", "original", "-4.05", "-4.09", "2.94", "3.16", "3.17"),
    ("DDPM", "IT fine-tuned", "", "", "3.45", "3.48", "3.41"),
    ("IDDPM", "IT fine-tuned", "-3.85", "-4.28", "3.14", "3.15", "3.18"),
    ("Ensemble", "", "", "", "", "2.90", "3.16"),
]
PUBLISHED_TITLE = ("Published figures, for reference (Kong et al., ICLR 2023, CIFAR-10 test, bits/dim; "
                   "not measured here)")


def read_bounds(path) -> dict:
    """``{"continuous" | "discrete": (bpd, se_bpd)}`` of the variational bound in an ``itd compare`` JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        vlb = data["methods"]["vlb"]
        kind = "discrete" if data.get("discrete") else "continuous"
        return {kind: (float(vlb["bpd"]), float(vlb.get("se_bpd", float("nan"))))}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an itd compare file with a 'vlb' method ({type(err).__name__}: {err})") from None


def objective(res: Results) -> str:
    """``IT fine-tuned`` for a model from an ``itd finetune`` run, else ``original``."""
    return "IT fine-tuned" if res.config.get("run") else "original"


def _cells(res: Results, bounds: dict, latex: bool) -> list[str]:
    est = res.estimates
    names = IT_COLUMNS[res.config.get("protocol", "ours")]
    it = [with_se(est[n].bpd, est[n].se_bpd, latex=latex) if n in est else "–" for n in names]
    vlb = [with_se(*bounds[k], latex=latex) if k in bounds else "–" for k in ("continuous", "discrete")]
    return [vlb[0], it[0], vlb[1], it[1], it[2]]


def paper_tables(labels: list[str], results: list[Results], bounds: list[dict]) -> tuple[str, str]:
    """The paper-layout table as Markdown (measured block, then the published block) and LaTeX."""
    protocols = sorted({r.config.get("protocol", "ours") for r in results})
    measured_md, measured_tex = Table(list(HEADER)), Table(list(HEADER))
    for label, res, bound in zip(labels, results, bounds):
        measured_md.add([label, objective(res), *_cells(res, bound, latex=False)])
        measured_tex.add([tex_escape(label), objective(res), *_cells(res, bound, latex=True)])
    published = Table(list(HEADER))
    for row in PUBLISHED:
        published.add([cell or "–" for cell in row])
    note = (f"Measured: {', '.join(protocols)} protocol; IT columns are "
            + "; ".join(f"{p}: {', '.join(IT_COLUMNS[p])}" for p in protocols) + ".")
    markdown = (measured_md.to_markdown("Measured (bits/dim ± standard error)") + "\n" + note + "\n\n"
                + published.to_markdown(PUBLISHED_TITLE))
    latex = measured_tex.to_latex("Measured test NLL, bits/dim. " + note, escape=False)
    return markdown, latex
