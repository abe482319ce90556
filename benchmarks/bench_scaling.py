"""The keys/depth curves and the hand-off costs, peers side by side in one run (issue 14's table).

Curves (CPU ns per operation as the size grows; flat is the goal):

* EndpointBatchDispatcher per job by number of endpoints (10 to 100k; ``--jobs`` jobs
  round-robin, at least one per endpoint), and by depth on one endpoint (10 to 1M);
* the same with equal batches at every size (10 jobs per endpoint added together, batches of
  10), so that what grows with the number of endpoints alone shows, apart from the per-batch
  cost that dominates when round-robin batches hold 1-2 jobs;
* EndpointBatchDispatcher ``add_job`` with one job per endpoint while the in-flight limit is
  reached (the slowest call is the figure, beside the longest garbage collection of the run
  and the objects the collector tracks per endpoint), and the same after ``gc.freeze()``
  once the jobs are built (the slowest call without the full collections over them);
* the peer of the endpoints curve where every batch is one job (100k endpoints, 2 jobs
  each): ``queue.Queue`` and a thread making one sink call per job;
* RequestDispatcher per request by depth on one key, ``queued`` mode (1k to 1M) and
  ``concurrent`` mode.

Hand-offs (CPU ns per call in the calling threads, with 1 and 4 producers):
BackgroundDispatcher.enqueue with each overflow policy, BackgroundDispatcher.submit,
BatchedDispatcher.submit and RequestDispatcher.add, beside queue.Queue.put,
queue.SimpleQueue.put and ThreadPoolExecutor.submit.

Every point runs in a fresh interpreter, round-robin over the points for each of
``--repeats`` rounds (a change of load on the machine then hits every point alike); each
figure is the median. A point past ``--timeout`` seconds is reported as not finished, with
its cost over all its operations as a lower bound; a point whose child fails says why and the
others still run (exit code 1). What is measured is described in
``threaddispatch/_bench_curves.py``. Usage::

    python benchmarks/bench_scaling.py [--repeats 3] [--timeout 120] [--jobs 200000]
        [--only endpoints,depth,...] [--handoff-ops 200000] [--producers 1,4] [--short] [--n 10,100] [--json]

``--short`` stops the depth curves at 100k and the endpoints curve at 10k (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from threaddispatch import _bench_curves

FULL: dict[str, list[int]] = {
    "endpoints": [10, 100, 1_000, 10_000, 100_000],
    "endpoints-equal": [10, 1_000, 10_000, 100_000],
    "endpoints-limit": [1_000, 10_000, 30_000, 100_000],
    "endpoints-limit-frozen": [1_000, 10_000, 30_000, 100_000],
    "depth": [10, 1_000, 10_000, 100_000, 1_000_000],
    "requests-queued": [1_000, 10_000, 100_000, 1_000_000],
    "requests-concurrent": [1_000, 10_000, 100_000, 1_000_000],
    "peer-per-job": [10, 100_000],
}
SHORT_LIMIT = {
    "endpoints": 10_000,
    "endpoints-equal": 10_000,
    "endpoints-limit": 10_000,
    "endpoints-limit-frozen": 10_000,
    "peer-per-job": 10_000,
}
SHORT_DEPTH = 100_000


def _sizes(short: bool) -> dict[str, list[int]]:
    if not short:
        return FULL
    return {name: [n for n in sizes if n <= SHORT_LIMIT.get(name, SHORT_DEPTH)] for name, sizes in FULL.items()}


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per point (default 3)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a point may take (default 120)")
    parser.add_argument("--jobs", type=int, default=200_000, help="jobs of the endpoints curve (default 200000)")
    parser.add_argument("--handoff-ops", type=int, default=200_000, help="calls per hand-off point (default 200000)")
    parser.add_argument("--producers", default="1,4", help="hand-off producer counts (default 1,4)")
    parser.add_argument("--only", default="", help="comma-separated curve and hand-off names (default: all)")
    parser.add_argument("--short", action="store_true", help="depth to 100k, endpoints to 10k")
    parser.add_argument("--n", default="", help="comma-separated sizes for every curve instead of its own")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    args = parser.parse_args(argv)
    only = set(_names(args.only))
    unknown = only - set(_bench_curves.CURVES) - set(_bench_curves.HANDOFFS)
    if unknown:
        parser.error(f"unknown name(s) {', '.join(sorted(unknown))}")
    sizes = [int(n) for n in _names(args.n)]
    curves = {name: sizes or own for name, own in _sizes(args.short).items() if not only or name in only}
    handoffs = [name for name in _bench_curves.HANDOFFS if not only or name in only]

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    curve_points = _bench_curves.run_curves(
        curves, repeats=args.repeats, timeout=args.timeout, jobs=args.jobs, progress=progress
    )
    handoff_points = _bench_curves.run_handoffs(
        handoffs,
        producer_counts=[int(p) for p in _names(args.producers)],
        ops=args.handoff_ops,
        repeats=args.repeats,
        timeout=args.timeout,
        progress=progress,
    )
    failed = any(p.error for p in [*curve_points, *handoff_points])
    if args.json:
        report = {"curves": [asdict(p) for p in curve_points], "handoffs": [asdict(p) for p in handoff_points]}
        print(json.dumps(report, indent=2))
        return 1 if failed else 0
    if curve_points:
        print(_bench_curves.format_curves(curve_points))
        print()
        print(_bench_curves.sparkbars(curve_points))
        print()
    if handoff_points:
        print(_bench_curves.format_handoffs(handoff_points))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
