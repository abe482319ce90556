"""The ``threaddispatch`` command line (also ``python -m threaddispatch``): ``main``, the parser, ``bench``.

The subcommands live in ``_cli_admin`` (jobs, dlq, migrate, serve) and ``_cli_worker``
(worker); what they share is in ``_cli_common``, which imports neither. Bad input gives a
one-line error and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from threaddispatch import _cli_admin, _cli_worker
from threaddispatch._cli_common import CommandError, fail, positive_int

__all__ = ["build_parser", "main"]


def _producer_list(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"expected producer counts >= 1, got {text!r}")
    return counts


def _cmd_bench(args: argparse.Namespace) -> int:
    from threaddispatch import _bench

    contenders = args.contenders.split(",") if args.contenders else list(_bench.CONTENDERS)
    unknown = [c for c in contenders if c not in _bench.CONTENDERS]
    if unknown:
        raise CommandError(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(_bench.CONTENDERS)}")

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    progress(
        f"threaddispatch bench: {args.entries:,} entries per run, producers {args.producers}, "
        f"{args.repeats} fresh-process run(s) each, window 10 ms, batches of 512"
    )
    results = _bench.run_matrix(
        contenders,
        producer_counts=args.producers,
        total_entries=args.entries,
        repeats=args.repeats,
        progress=progress,
    )
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(_bench.format_table(results))
    if args.chart and _bench.write_chart(results, args.chart):
        progress(f"chart written to {args.chart}")
    elif args.chart:
        progress("matplotlib is not installed: no chart (pip install 'threaddispatch[bench]')")
    incomplete = [r.label for r in results if not r.complete]
    if incomplete:
        print(f"threaddispatch bench: entries were lost by: {', '.join(incomplete)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from threaddispatch import __version__

    parser = argparse.ArgumentParser(
        prog="threaddispatch", description="Background and batched dispatching on plain threads."
    )
    parser.add_argument("--version", action="version", version=f"threaddispatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    bench = sub.add_parser("bench", help="run the enqueue benchmark against the peers and print the table")
    bench.add_argument("--entries", type=positive_int, default=200_000, help="entries per run (default 200000)")
    bench.add_argument("--producers", type=_producer_list, default=[1, 4], help="producer counts (default 1,4)")
    bench.add_argument("--repeats", type=positive_int, default=3, help="fresh-process runs per cell (default 3)")
    bench.add_argument("--contenders", default="", help="comma-separated subset (default: all installed)")
    bench.add_argument("--chart", default="threaddispatch-bench.png", help="PNG chart path ('' for none)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of the table")
    bench.add_argument("--quiet", action="store_true", help="no progress lines")
    bench.set_defaults(handler=_cmd_bench)

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
