"""The ``relux`` command line. Each subcommand lives in its own module with ``register(subparsers)``.

Exit status: 0 success, 1 a failed run (e.g. an extraction that fresh queries contradict),
2 bad input (missing/corrupt/unsupported file, malformed argument, unreachable URL).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from relux.errors import BudgetExhausted, ExtractionFailed, InputError, OracleError, ReluxError

#: Subcommand modules, in the order ``relux --help`` lists them.
SUBCOMMANDS = ("extract", "verify", "convert", "serve", "zoo", "bench", "demo")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as a one-line message with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"relux: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="relux",
        description="Recover the weights of a ReLU network from black-box query access.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"relux.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"relux.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``relux`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        code = args.func(args)
        return int(code or 0)
    except KeyboardInterrupt:
        print("relux: interrupted", file=sys.stderr)
        return 130
    except (InputError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if args.debug:
            raise
        print(f"relux: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (ExtractionFailed, BudgetExhausted, OracleError, ReluxError) as exc:
        if args.debug:
            raise
        print(f"relux: failed: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
