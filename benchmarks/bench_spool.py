"""What a crash-durable spool costs ``BackgroundDispatcher.enqueue``, beside no spool and JobEngine.enqueue on SQLite.

Rows, each with 1 and with 4 producer threads, in the same run:

* ``no spool``: ``BackgroundDispatcher.enqueue`` (the lock-free path);
* ``spool normal`` / ``spool full``: the same with ``spool=PATH`` and ``spool_sync`` (every
  enqueue returns once its entry is committed; appends of concurrent producers share a commit);
* ``JobEngine sqlite``: ``JobEngine.enqueue`` on a ``SQLiteStore`` (one write per job), not started;
* ``async ...``: ``AsyncDispatcher`` (buffer 1,000) ``Sender.put`` into a no-op ``dispatch``, without
  and with ``spool=PATH``, and ``async+batched spool normal`` into a BatchedDispatcher(10) behind it.
  Here the wall time runs until ``stop()`` returned: every entry dispatched and acknowledged (one
  commit per group of dispatched entries), so the rate is the lossless path end to end.

Per row: entries/s (wall, all producers together), CPU µs per entry on the producers
(``time.thread_time`` summed over them) and over the whole process (``time.process_time``:
the commits, the worker's sends and acknowledgements too), and the ratio of each to
``no spool``. Every row runs in a fresh subprocess on a fresh file; ``--repeat`` runs of the
whole table are interleaved and the median reported with the spread (min-max). Usage::

    python benchmarks/bench_spool.py [--entries 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROWS = (
    "no spool",
    "spool normal",
    "spool full",
    "JobEngine sqlite",
    "async no spool",
    "async spool normal",
    "async spool full",
    "async+batched spool normal",
)
PRODUCERS = (1, 4)


def _target(row: str, path: str) -> tuple[Any, Any]:
    """(enqueue(entry), finish()) for a row."""
    if row.startswith("async"):
        return _async_target(row, path)
    if row == "JobEngine sqlite":
        from threaddispatch.jobs import JobEngine
        from threaddispatch.stores import SQLiteStore

        store = SQLiteStore(path)
        engine = JobEngine(store)
        engine.register("noop", lambda ctx, payload: None)
        return (lambda entry: engine.enqueue("noop", entry)), store.close
    from threaddispatch import BackgroundDispatcher

    options: dict[str, Any] = {}
    if row != "no spool":
        options = {"spool": path, "spool_sync": row.split()[1]}
    dispatcher: BackgroundDispatcher[Any] = BackgroundDispatcher(
        lambda batch: None, 50, max_queue_size=1_000_000, **options
    )
    return dispatcher.enqueue, dispatcher.close


class _NoOp:
    def dispatch(self, message: Any, target: str, *, delay_seconds: int | None = None) -> None:
        return None


def _async_target(row: str, path: str) -> tuple[Any, Any]:
    from threaddispatch import AsyncDispatcher, BatchedDispatcher

    options: dict[str, Any] = {}
    if "spool" in row and "no spool" not in row:
        options = {"spool": path, "spool_sync": row.split()[2]}
    batched: Any = None
    dispatcher: Any = _NoOp()
    if row.startswith("async+batched"):
        batched = dispatcher = BatchedDispatcher(lambda _t, ms: [None] * len(ms), max_batch_size=10)
    face: AsyncDispatcher[Any] = AsyncDispatcher(dispatcher, "bench", **options)
    sender = face.setup(1000)
    face.start()

    def finish() -> None:
        if not face.stop(120):
            raise RuntimeError("AsyncDispatcher did not drain in 120 s")
        if batched is not None:
            batched.close(10)

    return sender.put, finish


def _measure(row: str, producers: int, entries: int, path: str) -> dict[str, float]:
    """Run ``producers`` threads enqueuing ``entries`` each; wall, producers' CPU, process CPU."""
    enqueue, finish = _target(row, path)
    for n in range(50):  # warm up
        enqueue({"warm": n})
    cpu: list[float] = []
    barrier = threading.Barrier(producers + 1)

    def produce(index: int) -> None:
        barrier.wait()
        started = time.thread_time()
        for n in range(entries):
            enqueue({"p": index, "n": n, "body": "x" * 40})
        cpu.append(time.thread_time() - started)

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
    for thread in threads:
        thread.start()
    process_started = time.process_time()
    wall_started = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    drained = row.startswith("async")  # until every entry was dispatched and acknowledged
    if drained:
        finish()
    wall = time.perf_counter() - wall_started
    process = time.process_time() - process_started
    if not drained:
        finish()
    total = producers * entries
    return {"per_s": total / wall, "cpu_us": sum(cpu) / total * 1e6, "process_us": process / total * 1e6}


def _child(row: str, producers: int, entries: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(_measure(row, producers, entries, str(Path(folder) / "bench.db"))))


def _run(row: str, producers: int, entries: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", row, str(producers), str(entries)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def _show(values: list[float]) -> str:
    median = statistics.median(values)
    return f"{median:9.1f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=5000, help="entries per producer thread")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row, producers, entries = args.child
        _child(row, int(producers), int(entries))
        return
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(args.repeat):  # interleaved: every row sees the same machine load
        for producers in PRODUCERS:
            for row in ROWS:
                results.setdefault((row, producers), []).append(_run(row, producers, args.entries))
    print(f"{args.entries} entries per producer, {args.repeat} runs, median (min-max)")
    print(
        f"{'row':<27} {'thr':>3} {'entries/s':>20} {'producer CPU µs/entry':>24} {'process CPU µs/entry':>22}  ratios"
    )
    for producers in PRODUCERS:
        base = results[("no spool", producers)]  # async rows: against "async no spool"
        base_rate = statistics.median(r["per_s"] for r in base)
        base_cpu = statistics.median(r["cpu_us"] for r in base)
        for row in ROWS:
            if row == "async no spool":
                base = results[(row, producers)]
                base_rate = statistics.median(r["per_s"] for r in base)
                base_cpu = statistics.median(r["cpu_us"] for r in base)
            runs = results[(row, producers)]
            rate = [r["per_s"] for r in runs]
            cpu = [r["cpu_us"] for r in runs]
            process = [r["process_us"] for r in runs]
            ratios = f"x{base_rate / statistics.median(rate):.0f} slower, x{statistics.median(cpu) / base_cpu:.0f} CPU"
            print(f"{row:<27} {producers:>3} {_show(rate):>20} {_show(cpu):>24} {_show(process):>22}  {ratios}")


if __name__ == "__main__":
    main()
