"""``itd report``: the paper's tables (Markdown, LaTeX) and figures (PNG, PDF)."""

from __future__ import annotations

import argparse
import sys
import warnings


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="tables and figures from itd eval results (and itd finetune runs)",
        description="Tables of every model's continuous, discrete and dequantized estimates (bits/dim with standard "
        "errors) with an ensemble row, as Markdown and LaTeX; figures as PNG and PDF: error curves against the "
        "Gaussian mmse with the shaded gap, raw against rounded curves (discrete data), and, for --runs, the "
        "training loss and test NLL per epoch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("results", nargs="*", metavar="RESULTS", help="results files written by itd eval (.json)")
    p.add_argument("--runs", nargs="+", default=[], metavar="RUN", help="run directories of itd finetune "
                   "(loss curves)")
    p.add_argument("--names", help="comma-separated row names, one per results file (default: their model names)")
    p.add_argument("--layout", choices=["standard", "paper"], default="standard", help="'paper': also write "
                   "table_paper.md/.tex laid out as the paper's table (variational and IT bounds; the paper's "
                   "published CIFAR-10 figures in a separate block)")
    p.add_argument("--bounds", help="with --layout paper: comma-separated itd compare JSON files holding each "
                   "model's variational bound ('vlb'), one per results file in order ('-' for none)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace report files already in OUT")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..reporting.report import RunHistory, write_report
    from ..results import Results

    if not args.results and not args.runs:
        raise ValueError("give results files (itd eval) and/or --runs")
    from ..guard import OutputLock, check_outputs

    from pathlib import Path

    names_out = ["table.md", "table.tex", "estimates.md", "summary.json", "table_paper.md", "table_paper.tex"]
    names_out += [f"{kind}.{ext}" for kind in ("error_curves", "rounded_curves", "loss_curves") for ext in ("png", "pdf")]
    check_outputs([Path(args.out) / n for n in names_out], [*args.results, *args.runs, *(args.bounds or "").split(",")])
    existing = [n for n in names_out if (Path(args.out) / n).exists()]
    if existing and not args.overwrite:
        raise ValueError(f"--out {args.out} already holds {', '.join(existing[:3])}"
                         f"{' ...' if len(existing) > 3 else ''}; pass --overwrite to replace them")
    results = [Results.load(path) for path in args.results]
    runs = [RunHistory.load(path) for path in args.runs]
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    paper = _paper_layout(args, results, names) if args.layout == "paper" else None  # checked before writing
    if paper is None and args.bounds:
        raise ValueError("--bounds is for --layout paper")
    from ..reporting.report import mixed_data_warning, unique_labels

    if results:  # on stderr before the table: rows on different image sets are not comparable
        mixed = mixed_data_warning(results, unique_labels(results, names))
        if mixed:
            print(f"itd report: {mixed}", file=sys.stderr)
    with OutputLock(args.out), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # printed above
        written = write_report(results, args.out, names=names, runs=runs)
        if paper is not None:
            written += _write_paper(args.out, paper)
    if results:
        print((written[0]).read_text(), end="")
    print(f"wrote {len(written)} files to {args.out}: " + ", ".join(p.name for p in written))
    return 0


def _paper_layout(args, results, names) -> tuple[str, str]:
    from ..reporting.paper import paper_tables, read_bounds
    from ..reporting.report import unique_labels

    if not results:
        raise ValueError("--layout paper needs results files (itd eval)")
    files = [f.strip() for f in args.bounds.split(",")] if args.bounds else ["-"] * len(results)
    if len(files) != len(results):
        raise ValueError(f"--bounds: {len(files)} files for {len(results)} results files")
    bounds = [{} if f == "-" else read_bounds(f) for f in files]
    return paper_tables(unique_labels(results, names), results, bounds)


def _write_paper(out, tables: tuple[str, str]) -> list:
    from pathlib import Path

    from .. import fileio as _io

    paths = [Path(out) / "table_paper.md", Path(out) / "table_paper.tex"]
    for path, text in zip(paths, tables):
        _io.write_atomic(path, lambda fh, text=text: fh.write(text.encode()))
    return paths
