"""Enqueue and end-to-end throughput of BackgroundDispatcher against its peers, side by side.

Usage: python benchmarks/bench_enqueue.py [--entries 1000000] [--repeats 5] [--producers 1,4]
       python benchmarks/bench_enqueue.py --send-overhead [--batches 20000] [--repeats 5]

Every cell is the median of ``--repeats`` runs, each in a fresh interpreter; see
``threaddispatch/_bench.py`` for the workload and what is measured. The README's
table comes from this script's output on the reference machine.

``--send-overhead`` instead measures what an ``async def`` send_batch costs per batch
against a plain one: BackgroundDispatcher sends ``--batches`` one-entry batches through
each (the coroutine awaits nothing, so the difference is the calling contract's: making
the coroutine and running it on the worker's private event loop), median of the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from threaddispatch import BackgroundDispatcher, _bench


def _sync_send(entries: list[int]) -> None:
    del entries


async def _async_send(entries: list[int]) -> None:
    del entries


def _per_batch_us(send: object, batches: int) -> float:
    """Microseconds per one-entry batch, from the first enqueue until flush() saw them all sent."""
    dispatcher: BackgroundDispatcher[int] = BackgroundDispatcher(send, ms_delay=1, max_batch_size=1)  # type: ignore[arg-type]
    dispatcher.enqueue(-1)  # start the worker (and, for async, its loop) outside the measurement
    dispatcher.flush(60)
    started = time.perf_counter()
    for i in range(batches):
        dispatcher.enqueue(i)
    dispatcher.flush(600)
    elapsed = time.perf_counter() - started
    sent_batches = dispatcher.stats()["batches"] - 1
    dispatcher.close(60)
    return elapsed / max(sent_batches, 1) * 1e6


def send_overhead(batches: int, repeats: int) -> int:
    results: dict[str, list[float]] = {"sync": [], "async": []}
    for _ in range(repeats):
        results["sync"].append(_per_batch_us(_sync_send, batches))
        results["async"].append(_per_batch_us(_async_send, batches))
    sync_us = statistics.median(results["sync"])
    async_us = statistics.median(results["async"])
    print(f"send_batch per batch (median of {repeats}, {batches} one-entry batches each):")
    print(f"  sync  def send_batch: {sync_us:8.2f} us")
    print(f"  async def send_batch: {async_us:8.2f} us  (+{async_us - sync_us:.2f} us, x{async_us / sync_us:.2f})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--producers", default="1,4")
    parser.add_argument("--chart", default=str(Path(__file__).with_name("enqueue.png")))
    parser.add_argument("--send-overhead", action="store_true", help="async vs sync send_batch cost per batch")
    parser.add_argument("--batches", type=int, default=20_000)
    args = parser.parse_args()
    if args.send_overhead:
        return send_overhead(args.batches, args.repeats)
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
