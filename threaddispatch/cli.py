"""The ``threaddispatch`` command line (also ``python -m threaddispatch``): ``main`` and the parser.

The subcommands live in ``_cli_admin`` (jobs, dlq, crons, queues, workers, locks, enqueue, stats,
migrate, serve), ``_cli_worker`` (worker) and ``_bench`` (bench: its options and its run);
what they share is in ``_cli_common``, which imports none of them.

``--store URL`` and ``--json`` may come before the subcommand as well as after it
(``threaddispatch --store URL --json jobs list``); given in both places, the
subcommand's own wins. Every error is one line on stderr with exit code 2, never a
traceback (a parse error too: no usage block); output cut short by a closed pipe
(``threaddispatch jobs list | head -1``) ends quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from threaddispatch import _bench, _cli_admin, _cli_worker
from threaddispatch._cli_common import STORE_ENV, CommandError, fail

__all__ = ["build_parser", "main"]

#: The exit code after a closed pipe: a Unix tool's when SIGPIPE ends it (128 + 13).
BROKEN_PIPE_EXIT = 141
_GLOBAL_STORE = "global_store"
_GLOBAL_JSON = "global_json"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``threaddispatch jobs list: MESSAGE``) and exit 2.

    Subparsers are made of the same class (argparse uses the parent parser's class).
    """

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from threaddispatch import __version__

    parser = _Parser(prog="threaddispatch", description="Background and batched dispatching on plain threads.")
    parser.add_argument("--version", action="version", version=f"threaddispatch {__version__}")
    parser.add_argument("--store", dest=_GLOBAL_STORE, metavar="URL", default=None,
                        help=f"store URL for every subcommand that takes one (default: ${STORE_ENV})")  # fmt: skip
    parser.add_argument("--json", dest=_GLOBAL_JSON, action="store_true", help="print JSON for scripts")
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


def _chosen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser that parsed the last subcommand of ``args`` (``jobs list``'s for ``jobs list``)."""
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            return parser
        choice = getattr(args, actions[0].dest, None)
        if choice is None or choice not in actions[0].choices:
            return parser
        parser = actions[0].choices[choice]


def _apply_globals(chosen: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Hand ``--store``/``--json`` given before the subcommand to it; a subcommand without them refuses them."""
    given = {"--store": getattr(args, _GLOBAL_STORE), "--json": getattr(args, _GLOBAL_JSON)}
    for option, value in given.items():
        if not value:
            continue
        dest = option[2:]
        if not hasattr(args, dest):
            chosen.error(f"{option} does not apply to this command")
        if not getattr(args, dest):  # the subcommand's own option wins
            setattr(args, dest, value)


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout's descriptor at /dev/null so the exit flush cannot fail again."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's capture): nothing is flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, descriptor)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = _chosen(parser, args)
    _apply_globals(chosen, args)
    args.command = chosen.prog.partition(" ")[2] or args.command  # "jobs list": what error lines name
    try:
        status = int(args.handler(args))
        sys.stdout.flush()  # here, so that a closed pipe is met inside the try
        return status
    except CommandError as error:
        return fail(args.command, str(error), 2)
    except BrokenPipeError:
        _quiet_stdout()
        return BROKEN_PIPE_EXIT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
