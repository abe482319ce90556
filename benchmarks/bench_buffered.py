"""Messages/s through AsyncDispatcher (direct and batched), beside a plain queue.Queue + thread hand-off.

One producer thread puts N small dicts into a bounded buffer (1,000 messages); a
consumer hands each to a "dispatcher". Measured: first put to the moment every
message was handed over and the consumer stopped (end-to-end messages/s), and the
process CPU time per message (every thread), median of ``--repeat`` runs taken
interleaved (each repeat runs every contender once), with ratios to the
queue.Queue baseline of the same run. Two workloads:

* ``0 ms``: the dispatcher does nothing; this is the cost of the hand-off itself.
* ``--latency`` ms per call (default 1 ms, a fast network round trip): one call per
  message for the direct contenders, one call per batch for the batched ones. This is
  what batching behind the same interface buys.

The "async" rows use an ``async def`` dispatch / send_batch (awaited on the worker's
private event loop; the latency is ``asyncio.sleep``): their 0 ms column is the
overhead of running a coroutine per call beside the sync row above each.

Every run checks that exactly N messages arrived. Prints a reStructuredText table
fragment for the README. Usage::

    python benchmarks/bench_buffered.py [--messages 200000] [--latency-messages 3000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from threaddispatch.batched import BatchedDispatcher
from threaddispatch.buffered import AsyncDispatcher

BUFFER = 1000
BASELINE = "queue.Queue + thread (baseline)"
MESSAGE = {"event": "order.created", "id": 1}


class _Sink:
    """Counts messages handed over; sleeps ``latency`` seconds per call (thread-safe)."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.lock = threading.Lock()
        self.count = 0
        self.calls = 0

    def one(self, _message: Any, _target: str, *, delay_seconds: int | None = None) -> str:
        if self.latency:
            time.sleep(self.latency)
        with self.lock:
            self.count += 1
            self.calls += 1
        return "id"

    def batch(self, _target: str, messages: list[Any]) -> list[str | BaseException | None]:
        if self.latency:
            time.sleep(self.latency)
        with self.lock:
            self.count += len(messages)
            self.calls += 1
        return ["id"] * len(messages)

    async def one_async(self, message: Any, target: str, *, delay_seconds: int | None = None) -> str:
        if self.latency:
            await asyncio.sleep(self.latency)
        with self.lock:
            self.count += 1
            self.calls += 1
        return "id"

    async def batch_async(self, _target: str, messages: list[Any]) -> list[str | BaseException | None]:
        if self.latency:
            await asyncio.sleep(self.latency)
        with self.lock:
            self.count += len(messages)
            self.calls += 1
        return ["id"] * len(messages)


class _Direct:
    def __init__(self, sink: _Sink, *, use_async: bool = False) -> None:
        self.dispatch = sink.one_async if use_async else sink.one


def run_queue(n: int, sink: _Sink, *, simple: bool = False) -> float:
    """queue.Queue(maxsize=BUFFER), or an unbounded SimpleQueue, and a consumer thread calling the sink per message."""
    q: Any = queue.SimpleQueue() if simple else queue.Queue(maxsize=BUFFER)
    stop = object()

    def consume() -> None:
        while True:
            item = q.get()
            if item is stop:
                return
            sink.one(item, "bench")

    consumer = threading.Thread(target=consume, name="bench-queue-consumer", daemon=True)
    consumer.start()
    started = time.perf_counter()
    for _ in range(n):
        q.put(MESSAGE)
    q.put(stop)
    consumer.join()
    return time.perf_counter() - started


def run_async(n: int, dispatcher: Any, flush: Callable[[], object] | None = None) -> float:
    """AsyncDispatcher(dispatcher).setup(BUFFER): put n messages, then stop() (which drains)."""
    ad: AsyncDispatcher[Any] = AsyncDispatcher(dispatcher, "bench", max_in_flight=max(BUFFER, 1000))
    send = ad.setup(BUFFER)
    ad.start()
    started = time.perf_counter()
    put = send.put
    for _ in range(n):
        put(MESSAGE)
    if not ad.stop(120):
        raise RuntimeError("AsyncDispatcher did not drain in 120 s")
    elapsed = time.perf_counter() - started
    if flush is not None:
        flush()
    return elapsed


def contenders(latency: float) -> list[tuple[str, Callable[[int], tuple[float, _Sink]]]]:
    def queue_run(simple: bool) -> Callable[[int], tuple[float, _Sink]]:
        def run(n: int) -> tuple[float, _Sink]:
            sink = _Sink(latency)
            return run_queue(n, sink, simple=simple), sink

        return run

    def direct_run(use_async: bool) -> Callable[[int], tuple[float, _Sink]]:
        def run(n: int) -> tuple[float, _Sink]:
            sink = _Sink(latency)
            return run_async(n, _Direct(sink, use_async=use_async)), sink

        return run

    def batched_run(size: int, use_async: bool = False) -> Callable[[int], tuple[float, _Sink]]:
        def run(n: int) -> tuple[float, _Sink]:
            sink = _Sink(latency)
            bd: BatchedDispatcher[Any] = BatchedDispatcher(
                sink.batch_async if use_async else sink.batch,
                max_batch_size=size,
                flush_interval=0.05,
                max_concurrent_sends=4,
                name=f"bench-{size}",
            )
            try:
                return run_async(n, bd), sink
            finally:
                bd.close(10)

        return run

    return [
        (BASELINE, queue_run(False)),
        ("SimpleQueue + thread (unbounded)", queue_run(True)),
        ("AsyncDispatcher, direct", direct_run(False)),
        ("AsyncDispatcher, direct, async dispatch", direct_run(True)),
        ("AsyncDispatcher + BatchedDispatcher(10)", batched_run(10)),
        ("AsyncDispatcher + BatchedDispatcher(10), async send", batched_run(10, True)),
        ("AsyncDispatcher + BatchedDispatcher(100)", batched_run(100)),
    ]


def measure(latency: float, n: int, repeat: int) -> dict[str, tuple[float, int, float, str]]:
    """Per contender: (median msg/s, calls, median process CPU µs per message, ratios per run); runs interleaved.

    Each repeat runs every contender once, so all of them see the same machine load; the
    process CPU time counts every thread (the producer, the loops, the send threads). The
    ratios are each repeat's msg/s over the queue.Queue baseline's in that same repeat.
    """
    runs: dict[str, list[tuple[float, float]]] = {}
    calls: dict[str, int] = {}
    chosen = contenders(latency)
    for _ in range(repeat):
        for name, run in chosen:
            began = time.process_time()
            elapsed, sink = run(n)
            cpu = time.process_time() - began
            if sink.count != n:
                raise RuntimeError(f"{name}: {sink.count} of {n} messages arrived")
            runs.setdefault(name, []).append((n / elapsed, cpu / n * 1e6))
            calls[name] = sink.calls
    results: dict[str, tuple[float, int, float, str]] = {}
    base = runs[BASELINE]
    for name, _run in chosen:
        rate = statistics.median(r[0] for r in runs[name])
        cpu = statistics.median(r[1] for r in runs[name])
        ratios = " ".join(f"{mine[0] / theirs[0]:.2f}" for mine, theirs in zip(runs[name], base, strict=True))
        cpu_ratios = " ".join(f"{mine[1] / theirs[1]:.2f}" for mine, theirs in zip(runs[name], base, strict=True))
        results[name] = (rate, calls[name], cpu, ratios)
        low, high = min(r[0] for r in runs[name]), max(r[0] for r in runs[name])
        print(
            f"  {name:<52} {rate:>12,.0f} msg/s ({low:,.0f}-{high:,.0f})  {cpu:6.2f} CPU µs/msg  "
            f"({calls[name]} calls)  per run: {ratios}  CPU per run: {cpu_ratios}  "
            f"k msg/s per run: {' '.join(f'{r[0] / 1000:.0f}' for r in runs[name])}",
            file=sys.stderr,
        )
    return results


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A reStructuredText simple table."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    rule = "  ".join("=" * w for w in widths)
    print(rule)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print(rule)
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(rule)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=200_000, help="messages per run, 0 ms workload")
    parser.add_argument("--latency-messages", type=int, default=3_000, help="messages per run, latency workload")
    parser.add_argument("--latency", type=float, default=1.0, help="ms per dispatcher call in the second workload")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender; the median is reported")
    args = parser.parse_args(argv)

    print(f"0 ms per call, {args.messages:,} messages:", file=sys.stderr)
    fast = measure(0.0, args.messages, args.repeat)
    print(f"{args.latency:g} ms per call, {args.latency_messages:,} messages:", file=sys.stderr)
    slow = measure(args.latency / 1000.0, args.latency_messages, args.repeat)

    base = fast[BASELINE]
    headers = [
        "Hand-off",
        "msg/s, 0 ms per call",
        "vs queue.Queue",
        "each run",
        "CPU µs/msg, 0 ms",
        "CPU vs queue.Queue",
        f"msg/s, {args.latency:g} ms per call",
        "calls (latency run)",
    ]
    rows = [
        [
            name,
            f"{rate:,.0f}",
            f"{rate / base[0]:.2f}",
            ratios,
            f"{cpu:.2f}",
            f"{cpu / base[2]:.2f}",
            f"{slow[name][0]:,.0f}",
            f"{slow[name][1]:,}",
        ]
        for name, (rate, _calls, cpu, ratios) in fast.items()
    ]
    print_table(headers, rows)
    print(
        f"\nPython {sys.version.split()[0]}, one producer, buffer {BUFFER}, median of {args.repeat} runs "
        f"(each run: its msg/s over queue.Queue's in the same run); "
        f"BatchedDispatcher flush_interval=0.05, max_concurrent_sends=4."
    )


if __name__ == "__main__":
    main()
