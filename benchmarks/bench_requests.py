"""Requests/s through RequestDispatcher with a no-op send, and the deduplication fan-out cost.

Two workloads, each beside a plain ``concurrent.futures.ThreadPoolExecutor.submit``
baseline with the same number of workers (8):

* Throughput: one producer thread adds N requests; ``send`` only counts them. Measured
  from the first ``add``/``submit`` to the moment the N-th send returned (end-to-end
  requests/s) and the caller's time per ``add`` (the loop included). Contenders:
  the executor; the dispatcher in ``concurrent`` mode on one queue key (with a plain
  send, and with an ``async def`` one: the cost of awaiting it on the worker's loop) and
  spread over 1,000 keys; in ``queued`` mode (one at a time, in order) on one key.
* Fan-out: N callers ask for the same thing while it is in flight. With
  ``deduplicate=True`` the dispatcher makes one send and every caller gets the same
  Future; the executor baseline makes N calls. Measured: caller time per request and
  first call to every caller holding its response. ``--latency`` (default 1 ms)
  gives each send a network-like duration, which is what deduplication saves.

* Add cost: the caller's time per ``add`` and the memory each pending request holds,
  beside ``ThreadPoolExecutor.submit`` in the same run. Every worker is held busy, so
  what is measured is the intake alone (no worker competes with the caller) and every
  request stays pending until the memory is read (``tracemalloc``, a separate pass).
* Depth curves: ``queued`` and ``concurrent`` mode on one key, N requests added while
  the queue is paused, then started; the time from ``start`` to the last response, per
  request (wall and process CPU), for N from 10 to 100,000 (``--long``: to 1,000,000),
  and how long the ``start`` call itself blocked. Flat means the per-request cost does
  not grow with the queue's depth.

Every run checks the count of sends and of responses. Median of ``--repeat`` runs.
Prints reStructuredText table fragments for the README. Usage::

    python benchmarks/bench_requests.py [--requests 50000] [--callers 10000] [--latency 1] [--repeat 3]
                                        [--pending 20000] [--long] [--only add,depth]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
import tracemalloc
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


def _run_dispatcher(n: int, keys: int, mode: str, *, asynchronous: bool = False) -> tuple[float, float, int]:
    sink = _Counter(n)
    names = [f"key-{i}" for i in range(keys)]

    async def send_async(request: Any, token: CancellationToken) -> int:
        return sink(request, token)

    send: Callable[[Any, CancellationToken], Any] = send_async if asynchronous else sink
    rd: RequestDispatcher[Any, int] = RequestDispatcher(send, max_workers=WORKERS)
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
    "RequestDispatcher, concurrent, 1 key, async send": lambda n: _run_dispatcher(
        n, 1, "concurrent", asynchronous=True
    ),
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


Cost = tuple[float, float]  # (wall µs, CPU µs) per call or request


def add_cost_executor(n: int, measure_memory: bool) -> Cost:
    """µs per ``submit`` (or bytes per pending task) with every worker held busy."""
    gate = threading.Event()
    pool = ThreadPoolExecutor(WORKERS)
    try:
        for _ in range(WORKERS):
            pool.submit(gate.wait, 60)
        return _intake(lambda: pool.submit(len, REQUEST), n, measure_memory)
    finally:
        gate.set()
        pool.shutdown()


def add_cost_dispatcher(n: int, measure_memory: bool) -> Cost:
    """µs per ``add`` (or bytes per pending request) with every worker held busy."""
    gate = threading.Event()
    rd: RequestDispatcher[Any, Any] = RequestDispatcher(lambda request, token: gate.wait(60), max_workers=WORKERS)
    try:
        for _ in range(WORKERS):
            rd.add(REQUEST, queue_key="busy")
        return _intake(lambda: rd.add(REQUEST, queue_key="k"), n, measure_memory)
    finally:
        gate.set()
        rd.close(60)


def _intake(call: Callable[[], object], n: int, measure_memory: bool) -> Cost:
    """(wall µs, caller-thread CPU µs) per call, or (bytes, 0) per pending call with ``measure_memory``."""
    kept: list[object] = []  # what the caller holds (the Future/handle): pending work stays alive
    gc.collect()
    if measure_memory:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    began, began_cpu = time.perf_counter(), time.thread_time()
    for _ in range(n):
        kept.append(call())
    ended, ended_cpu = time.perf_counter(), time.thread_time()
    if measure_memory:
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        return used / n, 0.0
    return (ended - began) / n * 1e6, (ended_cpu - began_cpu) / n * 1e6


def depth_run(n: int, mode: str = "queued") -> tuple[float, float, float]:
    """(wall, process CPU) µs per request to drain ``n`` requests of ``mode`` on one key, ``start`` to last
    response, and the seconds the ``start`` call itself took (it hands the pool a window, not the queue)."""
    sink = _Counter(n)
    rd: RequestDispatcher[Any, int] = RequestDispatcher(sink, max_workers=WORKERS)
    try:
        rd.pause("k")
        for _ in range(n):
            rd.add(REQUEST, queue_key="k", mode=mode)  # type: ignore[arg-type]
        began, began_cpu = time.perf_counter(), time.process_time()
        rd.start("k")
        started = time.perf_counter() - began
        if not sink.done.wait(max(120.0, n / 2000)):
            raise SystemExit(f"{mode} depth {n}: {sink.count} of {n} sent in time")
        ended, ended_cpu = time.perf_counter(), time.process_time()
    finally:
        rd.close(60)
    return (ended - began) / n * 1e6, (ended_cpu - began_cpu) / n * 1e6, started


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    rule = "  ".join("=" * w for w in widths)
    print(rule)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print(rule)
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(rule)
    print()


def add_table(n: int, repeat: int) -> None:
    rows: list[tuple[str, ...]] = []
    results: dict[str, Cost] = {}
    contenders = (("ThreadPoolExecutor.submit", add_cost_executor), ("RequestDispatcher.add", add_cost_dispatcher))
    runs: dict[str, list[Cost]] = {name: [] for name, _run in contenders}
    for _ in range(repeat):  # interleaved, so both see the same machine load
        for name, run in contenders:
            runs[name].append(run(n, False))
    for name, run in contenders:
        wall = statistics.median(r[0] for r in runs[name])
        cpu = statistics.median(r[1] for r in runs[name])
        memory = run(n, True)[0]
        results[name] = (wall, cpu)
        rows.append((name, f"{n:,} pending", f"{wall:.1f}", f"{cpu:.1f}", f"{memory / 1024:.2f}"))
    add, submit = results["RequestDispatcher.add"], results["ThreadPoolExecutor.submit"]
    ratios = f"{add[0] / submit[0]:.2f} wall, {add[1] / submit[1]:.2f} CPU"
    print(f"Intake with every worker busy; add/submit ratio {ratios}.\n")
    _table(("Call", "Workload", "µs per call", "CPU µs per call", "KB per pending"), rows)


def depth_table(long: bool, repeat: int) -> None:
    depths = [10, 100, 1_000, 10_000, 100_000] + ([1_000_000] if long else [])
    for mode in ("queued", "concurrent"):
        rows: list[tuple[str, ...]] = []
        base = (0.0, 0.0)
        for n in depths:
            runs = [depth_run(n, mode) for _ in range(repeat if n <= 100_000 else 1)]
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            start = max(r[2] for r in runs)
            if n == 1_000:
                base = (wall, cpu)
            vs = (f"{wall / base[0]:.2f}", f"{cpu / base[1]:.2f}") if base[0] else ("", "")
            rows.append((f"{n:,}", f"{wall:.1f}", f"{cpu:.1f}", *vs, f"{start * 1e3:.1f}"))
        print(f"RequestDispatcher {mode} mode, one key: drain cost per request by queue depth (vs 1,000).\n")
        headers = ("Depth", "µs per request", "CPU µs per request", "wall vs 1,000", "CPU vs 1,000", "start() ms")
        _table(headers, rows)


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
    parser.add_argument("--pending", type=int, default=20_000, help="requests held pending in the add-cost workload")
    parser.add_argument("--long", action="store_true", help="extend the depth curve to 1,000,000 requests")
    parser.add_argument(
        "--only", default="throughput,fanout,add,depth", help="comma-separated workloads: throughput,fanout,add,depth"
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    print(f"Python {sys.version.split()[0]}, {WORKERS} workers, median of {args.repeat} runs.\n")
    if "add" in only:
        add_table(args.pending, args.repeat)
    if "depth" in only:
        depth_table(args.long, args.repeat)
    if not only & {"throughput", "fanout"}:
        return

    rows: list[tuple[str, ...]] = []
    for name, run in THROUGHPUT.items() if "throughput" in only else ():
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
    fanouts = (
        ("ThreadPoolExecutor.submit, one call each", fanout_executor, args.callers),
        ("RequestDispatcher, deduplicate=True", fanout_dispatcher, 1),
    )
    for name, fanout, expected in fanouts if "fanout" in only else ():
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

    _table(("Contender", "Workload", "Sends", "Caller µs/request", "End to end"), rows)


if __name__ == "__main__":
    main()
