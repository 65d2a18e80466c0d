"""The ``itd`` command line.

Each subcommand lives in its own module of this package with two functions:
``add_parser(subparsers)`` (declares its arguments and sets ``func``) and a ``run(args)``
that returns an exit status.  Modules are imported when the parser is built; heavy
libraries are imported inside ``run``.

Errors a user can fix (bad input, missing files, unknown names, a diverging run) are raised as
:class:`UsageError`, ``ValueError``, ``OSError`` or ``FloatingPointError``: they are printed as one line and the
command exits with status 2 (``--debug`` shows the traceback instead); so is a missing
optional dependency (diffusers), with the ``pip install`` line that adds it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_OPTIONAL = ("diffusers", "huggingface_hub")  # modules of the [diffusers] extra
SUBCOMMANDS = ("demo", "data", "spectrum", "finetune", "eval", "report", "compare", "infomap", "mi", "classify")


class UsageError(Exception):
    """A problem with the user's input; printed without a traceback."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (usage is left to ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` once, and only where it says something.

    Not for flags (``store_true``/``store_false``: the help says what they switch), an unset
    default (``None``), or a help text that already names its default.
    """

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or isinstance(default, bool) or default == argparse.SUPPRESS or default == []
        if unset or "default" in text or action.nargs == 0:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    for command in sub.choices.values():  # one help style for every command (defaults shown once)
        command.formatter_class = HelpFormatter
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    for token in argv:  # argparse drops a '--' value and hands the option an empty list
        if token.startswith("--") and token.endswith("=--"):
            print(f"itd: error: argument {token[:-3]}: expected a value, got '--'", file=sys.stderr)
            return 2
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as stop:  # --help, --version, or a bad argument (already printed on one line)
        return stop.code if isinstance(stop.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    if extra:
        print(f"itd {args.command}: error: unrecognized arguments: {' '.join(extra)} (see itd {args.command} --help)",
              file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("itd: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError, FloatingPointError) as err:
        if args.debug:
            raise
        print(f"itd {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # an optional dependency (diffusers) that is not installed
        if args.debug or err.name not in _OPTIONAL:
            raise
        print(f"itd {args.command}: error: {err.name} is not installed; install it with "
              f"pip install \"itdiffusion[diffusers]\"", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
