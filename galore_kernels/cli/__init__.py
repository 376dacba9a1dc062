"""The ``galore-kernels`` command (also ``python -m galore_kernels``): train, memory, bench.

Each subcommand lives in its own module with ``add_parser(subparsers)``, which registers its arguments
and sets ``run``: a function of the parsed arguments returning the exit status. Heavy imports happen
inside ``run``. A user's mistake raises :class:`CLIError` and is printed as one line, exit status 2;
any other error prints one line too, exit status 1, unless ``--traceback`` (anywhere on the line) asks
for the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["CLIError", "DefaultsHelpFormatter", "main"]

PROG = "galore-kernels"


class CLIError(Exception):
    """A problem with the user's input or environment, said in one line (no traceback).

    >>> str(CLIError("--rank must be >= 1, got 0"))
    '--rank must be >= 1, got 0'
    """


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that states each option's default once: argparse's ``ArgumentDefaultsHelpFormatter`` appends
    "(default: …)" even when the help already says it in words, and for flags and empty lists, where
    "(default: False)" and "(default: [])" say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help or "", action.default
        # identity, not ==: a default of 0 is worth stating, False is not
        if "default" in text or any(default is empty for empty in (None, False, argparse.SUPPRESS)) or default == []:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import bench, memory, train

    parser = _Parser(
        prog=PROG,
        description="GaLore optimizers with Triton kernels: see what they save and cost on your machine.",
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an unexpected error")
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="{train,memory,bench}", parser_class=_Parser
    )
    for module in (train, memory, bench):
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return its exit status."""
    # Output has α, × and user paths: a terminal that cannot encode them gets escapes, not a traceback.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    # bitsandbytes warns at import that its optional 4-bit CPU GEMM is missing: unrelated to AdamW8bit,
    # and a confusing line in the middle of a table or progress bar.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    # --traceback is accepted anywhere on the line, as the error message suggests adding it.
    show_traceback = "--traceback" in argv
    argv = [a for a in argv if a != "--traceback"]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CLIError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as a Unix tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:  # not the user's input: still one line unless asked for the traceback
        if show_traceback:
            raise
        print(
            f"{PROG} {args.command}: unexpected {type(error).__name__}: {error} (rerun with --traceback for details)",
            file=sys.stderr,
        )
        return 1
