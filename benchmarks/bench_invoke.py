"""Overhead of calling user code through threaddispatch._invoke, against calling it directly.

Usage: python benchmarks/bench_invoke.py [--calls 200000] [--timed-calls 20000] [--repeats 5]

Each row is the median, over ``--repeats`` runs, of the wall time per call in
microseconds (and the process CPU time per call beside it). The callables do nothing
(``return x``), so the numbers are the cost of the calling machinery alone:

- ``direct``: ``fn(x)``, the floor.
- ``call`` / ``invoke``: the same function through the shared contract (awaitable check, Outcome).
- ``TimedCaller(timeout=None)``: the no-timeout path (it must equal ``call``).
- ``run_until_complete``: an ``async def`` run on a reused loop by hand, the async floor.
- ``call(async def)``: the same through the contract (the per-thread loop); a coroutine that
  finishes without waiting runs as its Task's first step, with no turn of the loop.
- ``call(async def awaiting sleep(0))``: one that waits once, finished under ``run_until_complete``.
- ``TimedCaller(timeout=5)``: a hand-off to the runner thread and back, sync and async.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

from threaddispatch._invoke import TimedCaller, call, close_thread_loop, invoke


def plain(x: int) -> int:
    return x


async def coro(x: int) -> int:
    return x


async def waits(x: int) -> int:
    await asyncio.sleep(0)  # one turn of the loop: the path a coroutine that waits for I/O takes
    return x


def measure(run: Callable[[int], None], calls: int, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) microseconds per call of ``run(calls)`` over ``repeats`` runs."""
    walls: list[float] = []
    cpus: list[float] = []
    run(min(calls, 1000))  # warm up: loops, runner threads, caches
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run(calls)
        walls.append((time.perf_counter() - wall) / calls * 1e6)
        cpus.append((time.process_time() - cpu) / calls * 1e6)
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--timed-calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    untimed = TimedCaller("bench", timeout=None)
    timed = TimedCaller("bench", timeout=5.0)
    loop = asyncio.new_event_loop()

    def direct(n: int) -> None:
        for i in range(n):
            plain(i)

    def via_call(n: int) -> None:
        for i in range(n):
            call(plain, i)

    def via_invoke(n: int) -> None:
        for i in range(n):
            invoke(plain, i)

    def via_untimed(n: int) -> None:
        for i in range(n):
            untimed.call(plain, i)

    def async_floor(n: int) -> None:
        for i in range(n):
            loop.run_until_complete(coro(i))

    def async_call(n: int) -> None:
        for i in range(n):
            call(coro, i)

    def async_waits(n: int) -> None:
        for i in range(n):
            call(waits, i)

    def timed_sync(n: int) -> None:
        for i in range(n):
            timed.call(plain, i)

    def timed_async(n: int) -> None:
        for i in range(n):
            timed.call(coro, i)

    rows = [
        ("direct fn(x)", direct, args.calls),
        ("call(fn, x)", via_call, args.calls),
        ("invoke(fn, x)", via_invoke, args.calls),
        ("TimedCaller(timeout=None).call", via_untimed, args.calls),
        ("loop.run_until_complete(coro)", async_floor, args.timed_calls),
        ("call(async def, x)", async_call, args.timed_calls),
        ("call(async def awaiting sleep(0), x)", async_waits, args.timed_calls),
        ("TimedCaller(timeout=5).call(fn)", timed_sync, args.timed_calls),
        ("TimedCaller(timeout=5).call(async def)", timed_async, args.timed_calls),
    ]
    try:
        print(f"{'path':42} {'wall us/call':>13} {'cpu us/call':>12}")
        for label, run, calls in rows:
            wall, cpu = measure(run, calls, args.repeats)
            print(f"{label:42} {wall:13.3f} {cpu:12.3f}", flush=True)
    finally:
        timed.close(5)
        untimed.close(5)
        loop.close()
        close_thread_loop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
