"""The ``threaddispatch`` command line (also ``python -m threaddispatch``): ``main`` and the parser.

The subcommands live in ``_cli_admin`` (jobs, dlq, migrate, serve), ``_cli_worker``
(worker) and ``_bench`` (bench: its options and its run); what they share is in
``_cli_common``, which imports none of them. Bad input gives a one-line error and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from threaddispatch import _bench, _cli_admin, _cli_worker
from threaddispatch._cli_common import CommandError, fail

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from threaddispatch import __version__

    parser = argparse.ArgumentParser(
        prog="threaddispatch", description="Background and batched dispatching on plain threads."
    )
    parser.add_argument("--version", action="version", version=f"threaddispatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    bench = sub.add_parser(
        "bench", help="run the benchmarks (the enqueue race, the scaling curves) and print the tables"
    )
    _bench.add_arguments(bench)
    bench.set_defaults(handler=_bench.run_command)

    _cli_worker.add_parsers(sub)
    _cli_admin.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except CommandError as error:
        return fail(args.command, str(error), 2)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
