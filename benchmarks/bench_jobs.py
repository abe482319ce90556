"""JobEngine on SQLiteStore side by side with huey's SqliteHuey (thread workers), in one run.

Measures, for N no-op jobs (default 10,000) on a SQLite file in a temp dir:

1. enqueue: jobs/s to enqueue them one call per job (both libraries), and for
   threaddispatch also ``enqueue_many`` (one transaction);
2. run: jobs/s to run them all with 4 worker threads, from worker start to the last
   job done (each handler counts itself; the clock stops when the count reaches N), and
   the process CPU time per job meanwhile (``time.process_time``: every thread, less noisy
   than wall time on a busy machine).

Both stores are files in WAL mode. By default each library keeps its own setting:
threaddispatch ``synchronous=NORMAL`` (no fsync per commit, one at each checkpoint), huey
SQLite's ``FULL`` (an fsync per commit). ``--fsync off`` runs both without fsync, to compare
the code on equal terms.

``--only overhead``: the engine's own cost per call, CPU time (``time.thread_time``) of
``JobEngine.enqueue`` on a store whose ``enqueue`` does nothing (what the engine spends
before and after the store), on MemoryStore and on SQLiteStore, and of ``enqueue_many``
per job; ``--compare DIR`` runs the same rounds, interleaved, on another tree (e.g. ``git
archive HEAD threaddispatch | tar -x -C DIR``) and prints the ratio. Run ``python
benchmarks/bench_jobs.py --help``.

``--only ids``: ``--jobs`` one-at-a-time enqueues on a fresh SQLiteStore file per job id scheme
(uuid4's random hex; the time in nanoseconds then 64 random bits, this engine's ids before
UUIDv7; UUIDv7, its ids now): jobs/s, CPU per job, bytes the process wrote per job (WAL frames
and checkpoints, from ``/proc/self/io``) and the file sizes at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# THREADDISPATCH_TREE: the tree to measure (``--compare`` runs another tree's code in a child process).
sys.path.insert(0, os.environ.get("THREADDISPATCH_TREE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from threaddispatch.jobs import JobEngine
from threaddispatch.stores import MemoryStore, SQLiteStore
from threaddispatch.stores.base import JobRecord

_serial = itertools.count()


class Counter:
    """Counts handler runs; sets ``done`` when ``target`` is reached."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.lock = threading.Lock()
        self.done = threading.Event()

    def hit(self) -> None:
        with self.lock:
            self.count += 1
            if self.count >= self.target:
                self.done.set()


def bench_threaddispatch(
    directory: str, jobs: int, workers: int, *, many: bool, synchronous: str = "NORMAL"
) -> tuple[float, float, float]:
    store = SQLiteStore(os.path.join(directory, f"td-{next(_serial)}.db"), synchronous=synchronous)
    engine = JobEngine(store, concurrency=workers, poll_interval=0.01, max_poll_interval=0.1, heartbeat_interval=5.0)
    counter = Counter(jobs)

    @engine.job("noop", max_retries=0, timeout=None)
    def noop(ctx: object, payload: object) -> None:
        counter.hit()

    start = time.perf_counter()
    if many:
        engine.enqueue_many("noop", [None] * jobs)
    else:
        for _ in range(jobs):
            engine.enqueue("noop")
    enqueue_rate = jobs / (time.perf_counter() - start)

    start = time.perf_counter()
    cpu = time.process_time()
    engine.start()
    if not counter.done.wait(300):
        raise RuntimeError(f"threaddispatch ran only {counter.count} of {jobs} jobs")
    run_rate = jobs / (time.perf_counter() - start)
    run_cpu = (time.process_time() - cpu) / jobs
    engine.stop(10)
    if engine.counts()["completed"] != jobs:
        raise RuntimeError(f"threaddispatch: {engine.counts()}")
    store.close()
    return enqueue_rate, run_rate, run_cpu


def bench_huey(directory: str, jobs: int, workers: int, *, fsync: bool | None) -> tuple[float, float, float]:
    import logging

    from huey import SqliteHuey  # type: ignore[import-untyped]

    logging.getLogger("huey").setLevel(logging.WARNING)
    huey = SqliteHuey("bench", filename=os.path.join(directory, f"huey-{next(_serial)}.db"), fsync=fsync)
    counter = Counter(jobs)

    @huey.task()  # type: ignore[untyped-decorator]
    def noop() -> None:
        counter.hit()

    start = time.perf_counter()
    for _ in range(jobs):
        noop()
    enqueue_rate = jobs / (time.perf_counter() - start)

    consumer = huey.create_consumer(
        workers=workers, worker_type="thread", periodic=False, initial_delay=0.01, max_delay=0.1
    )
    start = time.perf_counter()
    cpu = time.process_time()
    consumer.start()
    if not counter.done.wait(300):
        raise RuntimeError(f"huey ran only {counter.count} of {jobs} jobs")
    run_rate = jobs / (time.perf_counter() - start)
    run_cpu = (time.process_time() - cpu) / jobs
    consumer.stop(graceful=True)
    return enqueue_rate, run_rate, run_cpu


def best_of(repeat: int, fn: Callable[[], tuple[float, float, float]]) -> tuple[float, float, float]:
    """The best of ``repeat`` runs: highest rates, lowest CPU per job."""
    results = [fn() for _ in range(repeat)]
    return max(r[0] for r in results), max(r[1] for r in results), min(r[2] for r in results)


class _NullStore(MemoryStore):
    """A MemoryStore whose ``enqueue`` stores nothing: what remains is the engine's own cost."""

    def enqueue(self, jobs: Sequence[JobRecord]) -> list[str]:
        return [job.id for job in jobs]


def _per_call(calls: int, fn: Callable[[], object]) -> float:
    """CPU microseconds per call of ``fn`` (this thread's), over ``calls`` calls."""
    started = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - started) / calls * 1e6


def bench_overhead(directory: str, calls: int) -> dict[str, float]:
    """CPU µs per job of enqueue on a null store, MemoryStore, SQLiteStore, and of enqueue_many (100 a call)."""
    found: dict[str, float] = {}
    payload = {"user": 42, "action": "welcome"}
    stores: list[tuple[str, Callable[[], Any]]] = [
        ("null store", _NullStore),
        ("MemoryStore", MemoryStore),
        ("SQLiteStore", lambda: SQLiteStore(os.path.join(directory, f"overhead-{next(_serial)}.db"))),
    ]
    for label, make in stores:
        store = make()
        engine = JobEngine(store)
        engine.register("noop", lambda ctx, payload: None)
        count = calls if label != "SQLiteStore" else max(1, calls // 5)
        _per_call(count // 10 + 1, lambda: engine.enqueue("noop", payload))  # warm up
        found[f"enqueue, {label}"] = _per_call(count, lambda: engine.enqueue("noop", payload))
        batch = [payload] * 100
        found[f"enqueue_many per job, {label}"] = (
            _per_call(count // 100 + 1, lambda: engine.enqueue_many("noop", batch)) / 100
        )
        store.close()
    return found


def _overhead_section(args: argparse.Namespace, directory: str) -> None:
    """Rounds of :func:`bench_overhead` on this tree and (``--compare``) another, interleaved."""
    trees = {"this tree": None} if args.compare is None else {"this tree": None, args.compare: args.compare}
    results: dict[str, list[dict[str, float]]] = {tree: [] for tree in trees}
    for _ in range(args.repeat):
        for tree, path in trees.items():
            env = dict(os.environ, THREADDISPATCH_TREE=path or "")
            command = [sys.executable, os.path.abspath(__file__), "--only", "overhead-child", "--jobs", str(args.jobs)]
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            results[tree].append(json.loads(out.splitlines()[-1]))
    names = list(results["this tree"][0])
    print(f"CPU µs per job (thread_time), {args.jobs} calls, median (min) of {args.repeat} rounds")
    header = "".join(f"{tree[-24:]:>26}" for tree in trees)
    print(f"{'':40}{header}{'ratio' if len(trees) > 1 else '':>8}")
    for name in names:
        cells = []
        medians = []
        for tree in trees:
            values = [round_[name] for round_ in results[tree]]
            medians.append(statistics.median(values))
            cells.append(f"{medians[-1]:14.2f} ({min(values):6.2f})    ")
        ratio = f"{medians[1] / medians[0]:7.2f}x" if len(medians) > 1 else ""
        print(f"{name:40}{''.join(f'{cell:>26}' for cell in cells)}{ratio:>8}")


def _written_bytes() -> int | None:
    """Bytes this process has caused to be written to storage (Linux ``/proc/self/io``), or None."""
    try:
        with open("/proc/self/io") as io:
            fields = dict(line.split(": ") for line in io.read().splitlines())
    except OSError:
        return None
    return int(fields["write_bytes"])


def bench_ids(directory: str, jobs: int) -> None:
    """SQLite enqueue rate and write volume by job id scheme (see the module docstring)."""
    import uuid

    from threaddispatch import _job_enqueue

    schemes: dict[str, Callable[[], str]] = {
        "uuid4 hex (random)": lambda: uuid.uuid4().hex,
        "ns time + 64 random bits": lambda: f"{time.time_ns():016x}{os.urandom(8).hex()}",
        "UUIDv7 (now)": _job_enqueue.new_job_id,
    }
    print(f"{jobs:,} enqueues, one per call, SQLiteStore (durability='normal'), one file per scheme")
    print(f"{'job id scheme':28} {'jobs/s':>8} {'CPU us/job':>11} {'written B/job':>14} {'db MB':>7} {'wal MB':>7}")
    real = _job_enqueue.new_job_id
    for label, make_id in schemes.items():
        path = os.path.join(directory, f"ids-{next(_serial)}.db")
        store = SQLiteStore(path)
        engine = JobEngine(store)
        engine.register("noop", lambda ctx, payload: None)
        _job_enqueue.new_job_id = make_id
        try:
            written, cpu, wall = _written_bytes(), time.process_time(), time.perf_counter()
            for _ in range(jobs):
                engine.enqueue("noop", {"user": 42})
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            after = _written_bytes()
        finally:
            _job_enqueue.new_job_id = real
        sizes = [os.path.getsize(p) / 1e6 if os.path.exists(p) else 0.0 for p in (path, path + "-wal")]
        per_job = "n/a" if written is None or after is None else f"{(after - written) / jobs:,.0f}"
        print(f"{label:28} {jobs / wall:8,.0f} {cpu / jobs * 1e6:11.1f} {per_job:>14} {sizes[0]:7.1f} {sizes[1]:7.1f}")
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs (default 3)")
    parser.add_argument(
        "--fsync",
        choices=["default", "off"],
        default="default",
        help="default: each library's own setting (threaddispatch NORMAL, huey FULL); off: neither syncs",
    )
    parser.add_argument("--only", choices=["threaddispatch", "huey", "overhead", "overhead-child", "ids"], default=None)
    parser.add_argument("--compare", default=None, help="--only overhead: also measure this tree (a directory)")
    args = parser.parse_args()
    if args.only == "ids":
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as directory:
            bench_ids(directory, args.jobs)
        return
    if args.only in ("overhead", "overhead-child"):
        with tempfile.TemporaryDirectory() as directory:
            if args.only == "overhead-child":
                print(json.dumps(bench_overhead(directory, args.jobs)))
            else:
                _overhead_section(args, directory)
        return

    fsync = None if args.fsync == "default" else False
    synchronous = "NORMAL" if args.fsync == "default" else "OFF"
    print(
        f"{args.jobs} no-op jobs, {args.workers} worker threads, SQLite {__import__('sqlite3').sqlite_version}, "
        f"best of {args.repeat}"
    )
    with tempfile.TemporaryDirectory() as directory:
        rows = []
        if args.only in (None, "threaddispatch"):
            one = best_of(
                args.repeat,
                lambda: bench_threaddispatch(directory, args.jobs, args.workers, many=False, synchronous=synchronous),
            )
            rows.append(("threaddispatch enqueue()", one))
            many = best_of(
                args.repeat,
                lambda: bench_threaddispatch(directory, args.jobs, args.workers, many=True, synchronous=synchronous),
            )
            rows.append(("threaddispatch enqueue_many()", many))
        if args.only in (None, "huey"):
            huey = best_of(args.repeat, lambda: bench_huey(directory, args.jobs, args.workers, fsync=fsync))
            rows.append((f"huey SqliteHuey (fsync={args.fsync})", huey))
        print(f"{'':36} {'enqueue jobs/s':>15} {'run jobs/s':>12} {'run CPU us/job':>15}")
        for name, (enqueue, run, cpu) in rows:
            print(f"{name:36} {enqueue:15,.0f} {run:12,.0f} {cpu * 1e6:15,.1f}")
        if len(rows) == 3:
            h_enqueue, h_run, _ = rows[2][1]
            print(f"ratio enqueue() / huey:       {rows[0][1][0] / h_enqueue:6.2f}x")
            print(f"ratio enqueue_many() / huey:  {rows[1][1][0] / h_enqueue:6.2f}x")
            print(f"ratio run / huey:             {rows[0][1][1] / h_run:6.2f}x")


if __name__ == "__main__":
    main()
