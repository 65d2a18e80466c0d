"""``itd report``: the paper's tables (Markdown, LaTeX) and figures (PNG, PDF)."""

from __future__ import annotations

import argparse


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
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..reporting.report import RunHistory, write_report
    from ..results import Results

    if not args.results and not args.runs:
        raise ValueError("give results files (itd eval) and/or --runs")
    results = [Results.load(path) for path in args.results]
    runs = [RunHistory.load(path) for path in args.runs]
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    written = write_report(results, args.out, names=names, runs=runs)
    if results:
        print((written[0]).read_text(), end="")
    print(f"wrote {len(written)} files to {args.out}: " + ", ".join(p.name for p in written))
    return 0
