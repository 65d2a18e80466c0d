"""``itd demo``: the first thing to run."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small denoiser on built-in data and measure its likelihood",
        description="Train a small denoiser with the information-theoretic objective on a built-in data set "
        "(no download), then estimate its test likelihood, compare with the exact value where known, "
        "and write metrics and figures.",
    )
    p.add_argument("--dataset", default=None, help="moons (default), circles, square, swissroll, scg, gmm, digits")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 30 for 2-D sets, 15 for digits)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for the 2-D sets, whose "
                   "tensors are too small to gain from more and lose much on a busy machine; torch's default for "
                   "digits)")
    p.add_argument("--out", default=None, help="output directory (default: runs/demo-DATASET)")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, initialisation and training")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument("--quick", action="store_true", help="a few seconds' smoke test on a small sample (numbers not meaningful)")
    p.add_argument("--conditional", action="store_true", help="digits only: a class-conditional network, its "
                   "information and mutual-information maps and zero-shot accuracy beside the exact Bayes classifier "
                   "of a class-conditional Gaussian mixture (default --out runs/demo-digits-conditional)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Claim the output folder (a fresh one by default), hold its lock, run the demo."""
    from ..guard import OutputLock

    args.out = str(claim_out(args.out, _default_out(args), args.overwrite))
    with OutputLock(args.out):
        return _run(args)


def _default_out(args) -> Path:
    from ..demo import DEFAULT_DATASET

    name = args.dataset or DEFAULT_DATASET
    return Path("runs") / (f"demo-{name}-conditional" if args.conditional else f"demo-{name}")


def claim_out(out: str | None, default: Path, overwrite: bool) -> Path:
    """The demo's folder: ``out``, refused if it holds files (unless ``overwrite``); without ``out``,
    ``default`` or, if that holds files, the first free ``default-2``, ``default-3``, ..."""
    from ..guard import check_outputs

    def busy(path: Path) -> bool:
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {path} is a file; give a folder")
        return path.is_dir() and any(path.iterdir())

    if out is None:
        path, k = default, 1
        while busy(path):
            k += 1
            path = default.with_name(f"{default.name}-{k}")
    else:
        path = Path(out)
        if busy(path) and not overwrite:
            shown = ", ".join(sorted(p.name for p in path.iterdir())[:3])
            raise ValueError(f"--out {path} already holds files ({shown}, ...); pass --overwrite or choose another "
                             "folder")
    check_outputs([path], [])
    return path


def _run(args: argparse.Namespace) -> int:
    from ..data.toy import list_datasets
    from ..demo import DEFAULT_DATASET, run_demo

    name = args.dataset or DEFAULT_DATASET
    if args.conditional:
        if args.dataset != "digits":
            raise ValueError("--conditional needs --dataset digits (the only built-in set with class labels)")
        from ..demo_conditional import run_conditional_demo

        run_conditional_demo(epochs=args.epochs, out=args.out, seed=args.seed, quick=args.quick,
                             log=(lambda *a, **k: None) if args.quiet else print)
        return 0
    if name not in list_datasets():
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(list_datasets())}")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be a positive integer, got {args.epochs}")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise ValueError(f"--threads must be a positive integer of at most 1024, got {args.threads}")
    threads = args.threads or (None if name == "digits" else 1)
    if threads:
        import torch

        torch.set_num_threads(threads)
    run_demo(name, epochs=args.epochs, out=args.out, seed=args.seed, progress=not args.quiet,
             verbose=not args.quiet, quick=args.quick)
    return 0
