"""What a Future-bearing hand-off costs: ``submit`` beside ``enqueue`` and ThreadPoolExecutor.submit,
and AsyncDispatcher + BatchedDispatcher end to end beside queue.Queue and SimpleQueue with a thread.

Rows (one producer thread):

* per call: CPU time per call on the producer (``time.thread_time``, the collector off: its
  cost grows with the number of entries held) and bytes per pending entry (``tracemalloc``;
  entries are kept pending: a long window, or a blocked executor).
* end to end, 0 ms sends: N small dicts from first put until the consumer stopped; messages/s
  (wall) and CPU per message over all threads (``time.process_time``).

Each row runs in a fresh subprocess, ``--repeat`` times, median reported. With
``--before DIR`` every row also runs against the package in DIR (e.g. ``git archive HEAD``
unpacked there), alternating with the current tree in the same run, and the table shows
both and their ratio. Usage::

    python benchmarks/bench_submit.py [--calls 100000] [--messages 100000] [--repeat 3] [--before DIR] [--now DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def _per_call(n: int, make: Callable[[], tuple[Callable[[int], object], Callable[[], None]]]) -> dict[str, float]:
    """CPU µs per call, then (a second run, traced) bytes per pending entry, for ``call(i)``.

    ``make`` returns (call, finish); every call's entry stays pending until ``finish``.
    """
    call, finish = make()
    for i in range(1000):  # warm up (threads started, code specialized)
        call(i)
    gc.disable()  # the collector's cost grows with the entries held pending: not the call's own
    try:
        started = time.thread_time()
        for i in range(n):
            call(i)
        cpu = time.thread_time() - started
    finally:
        gc.enable()
    finish()
    call, finish = make()
    call(0)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        call(i)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    finish()
    return {"cpu_us": cpu / n * 1e6, "bytes": held / n}


def _background(method: str) -> Callable[[], tuple[Callable[[int], object], Callable[[], None]]]:
    def make() -> tuple[Callable[[int], object], Callable[[], None]]:
        from threaddispatch import BackgroundDispatcher

        dispatcher: Any = BackgroundDispatcher(
            lambda _batch: None, ms_delay=600_000, max_batch_size=10_000_000, max_queue_size=10_000_000
        )
        return getattr(dispatcher, method), lambda: dispatcher.close(60)

    return make


def _batched_submit() -> tuple[Callable[[int], object], Callable[[], None]]:
    from threaddispatch import BatchedDispatcher

    dispatcher: Any = BatchedDispatcher(
        lambda _t, ms: [None] * len(ms), max_batch_size=10_000_000, flush_interval=600.0
    )
    return (lambda i: dispatcher.submit(i, "bench")), lambda: dispatcher.close(60)


def _executor_submit() -> tuple[Callable[[int], object], Callable[[], None]]:
    gate = threading.Event()
    executor = ThreadPoolExecutor(1, thread_name_prefix="bench-executor")
    executor.submit(gate.wait)  # holds the worker: every later call stays pending

    def finish() -> None:
        gate.set()
        executor.shutdown(wait=True)

    return (lambda i: executor.submit(int, i)), finish


def _thread_queue(n: int, simple: bool) -> tuple[float, int]:
    from bench_buffered import _Sink, run_queue

    sink = _Sink(0.0)
    return run_queue(n, sink, simple=simple), sink.count


def _async(n: int, batch_size: int | None) -> tuple[float, int]:
    from bench_buffered import _Direct, _Sink, run_async

    from threaddispatch import BatchedDispatcher

    sink = _Sink(0.0)
    if batch_size is None:
        return run_async(n, _Direct(sink)), sink.count
    batched: Any = BatchedDispatcher(sink.batch, max_batch_size=batch_size, flush_interval=0.05)
    try:
        return run_async(n, batched), sink.count
    finally:
        batched.close(10)


def _end_to_end(run: Callable[[int], tuple[float, int]]) -> Callable[[int], dict[str, float]]:
    def measure(n: int) -> dict[str, float]:
        started = time.process_time()
        elapsed, count = run(n)
        cpu = time.process_time() - started
        if count != n:
            raise RuntimeError(f"{count} of {n} messages arrived")
        return {"rate": n / elapsed, "cpu_us": cpu / n * 1e6}

    return measure


PER_CALL: dict[str, Callable[[], tuple[Callable[[int], object], Callable[[], None]]]] = {
    "BackgroundDispatcher.enqueue": _background("enqueue"),
    "BackgroundDispatcher.submit": _background("submit"),
    "BatchedDispatcher.submit": _batched_submit,
    "ThreadPoolExecutor.submit": _executor_submit,
}
END_TO_END: dict[str, Callable[[int], dict[str, float]]] = {
    "queue.Queue + thread": _end_to_end(lambda n: _thread_queue(n, simple=False)),
    "SimpleQueue + thread": _end_to_end(lambda n: _thread_queue(n, simple=True)),
    "AsyncDispatcher, direct": _end_to_end(lambda n: _async(n, None)),
    "AsyncDispatcher + BatchedDispatcher(10)": _end_to_end(lambda n: _async(n, 10)),
    "AsyncDispatcher + BatchedDispatcher(100)": _end_to_end(lambda n: _async(n, 100)),
}


def _run_row(tree: Path, row: str, n: int) -> dict[str, float]:
    """One row in a fresh interpreter importing threaddispatch from ``tree``."""
    output = subprocess.run(
        [sys.executable, str(HERE), "--tree", str(tree), "--row", row, "--n", str(n)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(output)
    return result


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=100_000, help="calls per per-call run")
    parser.add_argument("--messages", type=int, default=100_000, help="messages per end-to-end run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row and tree; the median is reported")
    parser.add_argument("--before", type=Path, help="a tree holding the package as it was, to run beside this one")
    parser.add_argument("--now", type=Path, default=HERE.parent.parent, help="the tree to measure (default: this one)")
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:  # a child: one measurement, as JSON
        sys.path.insert(0, str(args.tree))
        import threaddispatch  # noqa: F401 - from the tree asked for, before bench_buffered adds this one

        sys.path.insert(0, str(HERE.parent))
        measure = END_TO_END.get(args.row) or (lambda n: _per_call(n, PER_CALL[args.row]))
        print(json.dumps(measure(args.n)))
        return

    trees = {"now": args.now.resolve()}
    if args.before is not None:
        trees = {"before": args.before.resolve(), **trees}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for row in [*PER_CALL, *END_TO_END]:
        n = args.calls if row in PER_CALL else args.messages
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for _ in range(args.repeat):
            for name, tree in trees.items():  # alternated, so drift in the machine's load hits both
                runs[name].append(_run_row(tree, row, n))  # peers too: their two columns show the spread
        results[row] = {name: _median(found) for name, found in runs.items() if found}
        print(f"  {row}: {results[row]}", file=sys.stderr)
    _print_table(results, list(trees))


def _print_table(results: dict[str, dict[str, dict[str, float]]], trees: list[str]) -> None:
    headers = ["Row"]
    for name in trees:
        headers += [f"CPU µs ({name})", f"bytes or msg/s ({name})"]
    if len(trees) == 2:
        headers.append("CPU before/now")
    rows = []
    for row, by_tree in results.items():
        cells = [row]
        for name in trees:
            found = by_tree.get(name) or by_tree["now"]
            second = found.get("bytes", found.get("rate", 0.0))
            cells += [f"{found['cpu_us']:.2f}", f"{second:,.0f}"]
        if len(trees) == 2:
            before = by_tree.get("before") or by_tree["now"]
            cells.append(f"{before['cpu_us'] / by_tree['now']['cpu_us']:.2f}x")
        rows.append(cells)
    sys.path.insert(0, str(HERE.parent))
    from bench_buffered import print_table

    print_table(headers, rows)
    print(f"\nPython {sys.version.split()[0]}; per-call rows: bytes per pending entry; end-to-end rows: msg/s.")


if __name__ == "__main__":
    main()
