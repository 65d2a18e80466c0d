"""The ``itd`` command line.

Each subcommand lives in its own module of this package with two functions:
``add_parser(subparsers)`` (declares its arguments and sets ``func``) and a ``run(args)``
that returns an exit status.  Modules are imported when the parser is built; heavy
libraries are imported inside ``run``.

Errors a user can fix (bad input, missing files, unknown names) are raised as
:class:`UsageError` or ``ValueError``/``OSError``: they are printed as one line and the
command exits with status 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("demo", "data", "spectrum", "finetune", "eval", "report", "compare")


class UsageError(Exception):
    """A problem with the user's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="itd", description="Exact log-likelihoods of diffusion models (Information-Theoretic Diffusion)."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"itdiffusion {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            continue  # subcommand not built yet
        module.add_parser(sub)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("itd: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError) as err:
        if args.debug:
            raise
        print(f"itd {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
