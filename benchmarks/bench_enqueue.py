"""Enqueue and end-to-end throughput of BackgroundDispatcher against its peers, side by side.

Usage: python benchmarks/bench_enqueue.py [--entries 1000000] [--repeats 5] [--producers 1,4]

Every cell is the median of ``--repeats`` runs, each in a fresh interpreter; see
``threaddispatch/_bench.py`` for the workload and what is measured. The README's
table comes from this script's output on the reference machine.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from threaddispatch import _bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--producers", default="1,4")
    parser.add_argument("--chart", default=str(Path(__file__).with_name("enqueue.png")))
    args = parser.parse_args()
    results = _bench.run_matrix(
        list(_bench.CONTENDERS),
        producer_counts=[int(p) for p in args.producers.split(",")],
        total_entries=args.entries,
        repeats=args.repeats,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(_bench.format_table(results))
    if _bench.write_chart(results, args.chart):
        print(f"chart: {args.chart}", file=sys.stderr)
    for r in results:
        print(asdict(r), file=sys.stderr)
    return 0 if all(r.complete for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
