"""Requests/s through RequestDispatcher with a no-op send, and the deduplication fan-out cost.

Two workloads, each beside a plain ``concurrent.futures.ThreadPoolExecutor.submit``
baseline with the same number of workers (8):

* Throughput: one producer thread adds N requests; ``send`` only counts them. Measured
  from the first ``add``/``submit`` to the moment the N-th send returned (end-to-end
  requests/s) and the caller's time per ``add`` (the loop included). Contenders:
  the executor; the dispatcher in ``concurrent`` mode on one queue key and spread over
  1,000 keys; in ``queued`` mode (one at a time, in order) on one key.
* Fan-out: N callers ask for the same thing while it is in flight. With
  ``deduplicate=True`` the dispatcher makes one send and every caller gets the same
  Future; the executor baseline makes N calls. Measured: caller time per request and
  first call to every caller holding its response. ``--latency`` (default 1 ms)
  gives each send a network-like duration, which is what deduplication saves.

Every run checks the count of sends and of responses. Median of ``--repeat`` runs.
Prints a reStructuredText table fragment for the README. Usage::

    python benchmarks/bench_requests.py [--requests 50000] [--callers 10000] [--latency 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from threaddispatch.requests import CancellationToken, RequestDispatcher

WORKERS = 8
REQUEST = {"method": "GET", "endpoint": "/users", "query": {"page": 1}}


class _Counter:
    """A send that counts calls and sets ``done`` at ``target``; optionally sleeps ``latency`` s."""

    def __init__(self, target: int, latency: float = 0.0) -> None:
        self.target = target
        self.latency = latency
        self.lock = threading.Lock()
        self.count = 0
        self.done = threading.Event()

    def __call__(self, request: Any, token: CancellationToken | None) -> int:
        if self.latency:
            time.sleep(self.latency)
        with self.lock:
            self.count += 1
            if self.count >= self.target:
                self.done.set()
            return self.count


Run = Callable[[int], tuple[float, float, int]]  # -> (seconds end to end, seconds in the caller loop, sends)


def run_executor(n: int) -> tuple[float, float, int]:
    sink = _Counter(n)
    with ThreadPoolExecutor(WORKERS) as pool:
        began = time.perf_counter()
        for _ in range(n):
            pool.submit(sink, REQUEST, None)
        added = time.perf_counter()
        sink.done.wait(120)
        ended = time.perf_counter()
    return ended - began, added - began, sink.count


def _run_dispatcher(n: int, keys: int, mode: str) -> tuple[float, float, int]:
    sink = _Counter(n)
    names = [f"key-{i}" for i in range(keys)]
    rd: RequestDispatcher[Any, int] = RequestDispatcher(sink, max_workers=WORKERS)
    try:
        began = time.perf_counter()
        for i in range(n):
            rd.add(REQUEST, queue_key=names[i % keys], mode=mode)  # type: ignore[arg-type]
        added = time.perf_counter()
        sink.done.wait(120)
        ended = time.perf_counter()
    finally:
        rd.close(30)
    return ended - began, added - began, sink.count


THROUGHPUT: dict[str, Run] = {
    "ThreadPoolExecutor.submit": run_executor,
    "RequestDispatcher, concurrent, 1 key": lambda n: _run_dispatcher(n, 1, "concurrent"),
    "RequestDispatcher, concurrent, 1,000 keys": lambda n: _run_dispatcher(n, 1000, "concurrent"),
    "RequestDispatcher, queued, 1 key": lambda n: _run_dispatcher(n, 1, "queued"),
}


def fanout_executor(callers: int, latency: float) -> tuple[float, float, int]:
    """Every caller submits its own call: N sends."""
    sink = _Counter(callers, latency)
    with ThreadPoolExecutor(WORKERS) as pool:
        began = time.perf_counter()
        futures = [pool.submit(sink, REQUEST, None) for _ in range(callers)]
        added = time.perf_counter()
        wait_all(futures, timeout=300)
        ended = time.perf_counter()
    return ended - began, added - began, sink.count


def fanout_dispatcher(callers: int, latency: float) -> tuple[float, float, int]:
    """Every caller adds the same request with deduplicate=True: one send, one shared Future."""
    release = threading.Event()
    sink = _Counter(1, latency)

    def send(request: Any, token: CancellationToken) -> int:
        release.wait(60)  # keep the first call in flight until every caller joined it
        return sink(request, token)

    rd: RequestDispatcher[Any, int] = RequestDispatcher(send, max_workers=WORKERS)
    try:
        began = time.perf_counter()
        handles = [rd.add(REQUEST, deduplicate=True) for _ in range(callers)]
        added = time.perf_counter()
        release.set()
        futures: set[Future[int]] = {handle.future for handle in handles}
        wait_all(futures, timeout=300)
        ended = time.perf_counter()
        assert len(futures) == 1 and all(handle.future.result(0) == 1 for handle in handles)
    finally:
        rd.close(30)
    return ended - began, added - began, sink.count


def _median(runs: list[tuple[float, float, int]]) -> tuple[float, float, int]:
    return (
        statistics.median(r[0] for r in runs),
        statistics.median(r[1] for r in runs),
        runs[0][2],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--callers", type=int, default=10_000)
    parser.add_argument("--latency", type=float, default=1.0, help="ms per send in the fan-out workload")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    rows: list[tuple[str, str, str, str, str]] = []
    for name, run in THROUGHPUT.items():
        total, loop, sends = _median([run(args.requests) for _ in range(args.repeat)])
        if sends != args.requests:
            raise SystemExit(f"{name}: {sends} sends for {args.requests} requests")
        rows.append(
            (
                name,
                f"{args.requests:,} requests",
                f"{sends:,}",
                f"{loop / args.requests * 1e6:.1f}",
                f"{args.requests / total:,.0f} requests/s",
            )
        )
    latency = args.latency / 1000.0
    for name, fanout, expected in (
        ("ThreadPoolExecutor.submit, one call each", fanout_executor, args.callers),
        ("RequestDispatcher, deduplicate=True", fanout_dispatcher, 1),
    ):
        total, loop, sends = _median([fanout(args.callers, latency) for _ in range(args.repeat)])
        if sends != expected:
            raise SystemExit(f"{name}: {sends} sends, expected {expected}")
        rows.append(
            (
                name,
                f"{args.callers:,} callers, {args.latency:g} ms send",
                f"{sends:,}",
                f"{loop / args.callers * 1e6:.1f}",
                f"all answered in {total * 1000:,.1f} ms",
            )
        )

    headers = ("Contender", "Workload", "Sends", "Caller µs/request", "End to end")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    rule = "  ".join("=" * w for w in widths)
    print(f"Python {sys.version.split()[0]}, {WORKERS} workers, median of {args.repeat} runs.\n")
    print(rule)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print(rule)
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(rule)


if __name__ == "__main__":
    main()
