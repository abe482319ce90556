"""SQLiteStore's slow paths, measured in one run (issue 14's SQLite rows), with huey side by side.

1. pickup: a second process enqueues one job every ``--gap`` seconds while this process's
   JobEngine idles (default ``max_poll_interval``, 30 s): the time from the enqueue (the
   job's ``created_at``, set in the other process) to its handler starting; p50/p99.
2. delayed: the other process enqueues jobs with ``delay``; how late each starts after its
   ``run_at``; p50/p99. Then the same for delayed jobs this process enqueued.
   released: this process enqueues dependents (on a queue its idle engine serves) of jobs another
   process's engine runs one every ``--gap`` seconds: the time from a dependency's completion
   (its ``finished_at``, in the other process) to the dependent's start; p50/p99 (the ready log).
3. enqueue with a worker running: ``JobEngine.enqueue`` one job at a time while 4 worker
   threads run them, in this process and then in another on the same file; wall and CPU
   (thread_time) per call, p50/p99. ``--against DIR --rounds N``: each round first runs the
   same with the tree in DIR (e.g. ``git archive HEAD~3 threaddispatch benchmarks | tar -x -C DIR``).
4. equal durability against huey: ``SQLiteStore(durability="full")`` and ``SqliteHuey(fsync=True)``
   (both ``synchronous=FULL``, an fsync per commit) with 1 and 4 producer threads (``--producers``): enqueue
   jobs/s, and run jobs/s with 4 worker threads; the ratio in each round (the peers run
   back to back in a round, as the disk's fsync time drifts over seconds on a shared machine),
   and how many enqueues each commit and each WAL fdatasync of ``durability="full"`` covered.
   ``durability="normal"`` is shown for reference. ``--against DIR``: the tree in DIR's
   ``durability="full"`` runs as one more peer in each round (a child process), for a same-run A/B.

The machine may be shared: run it twice to see the spread. ``python benchmarks/bench_sqlite.py --help``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from threaddispatch.jobs import JobContext, JobEngine
from threaddispatch.stores import JobRecord, SQLiteStore, _sqlite_sync

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_serial = itertools.count()


def _quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    if not ordered:
        return "no samples"
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1e3:8.2f} ms   p99 {p99 * 1e3:8.2f} ms   (n={len(ordered)})"


def _producer(path: str, count: int, gap: float, delay: float | None) -> subprocess.Popen[bytes]:
    """Another process enqueuing ``count`` jobs ``record``, one every ``gap`` seconds."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {_ROOT!r})
        from threaddispatch.jobs import JobEngine
        from threaddispatch.stores import JobRecord, SQLiteStore, _sqlite_sync
        store = SQLiteStore({path!r})
        engine = JobEngine(store)
        engine.register("record", lambda ctx, payload: None)
        for _ in range({count}):
            engine.enqueue("record", delay={delay!r})
            time.sleep({gap!r})
        store.close()
        """
    )
    return subprocess.Popen([sys.executable, "-c", script])


class _Starts:
    """Handler ``record``: notes each job's start minus its ``created_at`` (or ``run_at``)."""

    def __init__(self, target: int, *, since_run_at: bool) -> None:
        self.target = target
        self.since_run_at = since_run_at
        self.delays: list[float] = []
        self.lock = threading.Lock()
        self.done = threading.Event()

    def __call__(self, ctx: JobContext, payload: object) -> None:
        started = time.time()
        job = ctx.job
        with self.lock:
            self.delays.append(started - (job.run_at if self.since_run_at else job.created_at))
            if len(self.delays) >= self.target:
                self.done.set()


def bench_cross_process(directory: str, count: int, gap: float, delay: float | None) -> list[float]:
    path = os.path.join(directory, f"pickup-{next(_serial)}.db")
    store = SQLiteStore(path)
    engine = JobEngine(store, concurrency=4)
    starts = _Starts(count, since_run_at=delay is not None)
    engine.register("record", starts, max_retries=0)
    engine.start()
    producer = _producer(path, count, gap, delay)
    try:
        if not starts.done.wait(60 + count * (gap + (delay or 0)) * 2):
            print(f"  only {len(starts.delays)} of {count} jobs started", file=sys.stderr)
    finally:
        producer.wait(60)
        engine.stop(10)
        store.close()
    return starts.delays


def _completer(path: str, count: int, gap: float) -> subprocess.Popen[bytes]:
    """Another process whose engine runs the ``count`` jobs ``first`` (queue a), one every ``gap`` seconds."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {_ROOT!r})
        from threaddispatch.jobs import JobEngine
        from threaddispatch.stores import JobState, SQLiteStore
        store = SQLiteStore({path!r})
        engine = JobEngine(store, queues=["a"], concurrency=1)
        engine.register("first", lambda ctx, payload: time.sleep({gap!r}), queue="a")
        engine.start()
        while store.counts(queue="a").get(JobState.COMPLETED, 0) < {count}:
            time.sleep(0.05)
        engine.stop(10)
        store.close()
        """
    )
    return subprocess.Popen([sys.executable, "-c", script])


def bench_released(directory: str, count: int, gap: float) -> list[float]:
    """Dependents here of jobs another process completes: from each completion to the dependent's start."""
    store = SQLiteStore(os.path.join(directory, f"released-{next(_serial)}.db"))
    engine = JobEngine(store, queues=["b"], concurrency=4)
    engine.register("first", lambda ctx, payload: None, queue="a")
    delays: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def second(ctx: JobContext, payload: object) -> None:
        started = time.time()
        dependency = store.get(ctx.job.depends_on[0]) if ctx.job.depends_on else None
        finished = dependency.finished_at if dependency is not None else None
        with lock:
            delays.append(started - (finished or started))
            if len(delays) >= count:
                done.set()

    engine.register("second", second, queue="b", max_retries=0)
    for _ in range(count):
        engine.enqueue("second", depends_on=[engine.enqueue("first")])
    engine.start()
    completer = _completer(store.path, count, gap)
    try:
        if not done.wait(60 + count * gap * 2):
            print(f"  only {len(delays)} of {count} dependents started", file=sys.stderr)
    finally:
        completer.wait(60)
        engine.stop(10)
        store.close()
    return delays


def bench_own_delayed(directory: str, count: int, gap: float, delay: float) -> list[float]:
    store = SQLiteStore(os.path.join(directory, f"own-{next(_serial)}.db"))
    engine = JobEngine(store, concurrency=4)
    starts = _Starts(count, since_run_at=True)
    engine.register("record", starts, max_retries=0)
    engine.start()
    try:
        for _ in range(count):
            engine.enqueue("record", delay=delay)
            time.sleep(gap)
        starts.done.wait(60 + delay * 2)
    finally:
        engine.stop(10)
        store.close()
    return starts.delays


def _worker_process(path: str) -> subprocess.Popen[bytes]:
    """Another process running a JobEngine (4 worker threads) on ``path`` until its stdin closes;
    it prints one line once its engine runs."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {_ROOT!r})
        from threaddispatch.jobs import JobEngine
        from threaddispatch.stores import SQLiteStore
        store = SQLiteStore({path!r})
        engine = JobEngine(store, concurrency=4, poll_interval=0.01, max_poll_interval=0.1)
        engine.register("noop", lambda ctx, payload: None, max_retries=0)
        engine.start()
        print("running", flush=True)
        sys.stdin.read()
        engine.stop(10)
        store.close()
        """
    )
    return subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def bench_enqueue_with_worker(directory: str, count: int, *, in_process: bool = True) -> dict[str, list[float]]:
    """``JobEngine.enqueue`` one job at a time while 4 worker threads run them (in this process, or in
    another on the same file): wall and CPU per call, the part inside the store's insert (SQLite: its
    busy waits included), and the machine's own floor."""
    path = os.path.join(directory, f"enqueue-{next(_serial)}.db")
    store = SQLiteStore(path)
    inside: list[float] = []
    write_jobs = store._write_jobs

    def timed(requests: Sequence[Sequence[JobRecord]]) -> list[list[str]]:
        started = time.perf_counter()
        try:
            return write_jobs(requests)
        finally:
            inside.append(time.perf_counter() - started)

    store._write_jobs = timed  # type: ignore[method-assign]
    engine = JobEngine(store, concurrency=4, poll_interval=0.01, max_poll_interval=0.1)
    engine.register("noop", lambda ctx, payload: None, max_retries=0)
    worker = None
    if in_process:
        engine.start()
    else:
        worker = _worker_process(path)
        assert worker.stdout is not None
        worker.stdout.readline()
    walls: list[float] = []
    cpus: list[float] = []
    floor: list[float] = []  # the machine's own noise: a GIL hand-off timed in the same loop
    try:
        for index in range(count):
            wall, cpu = time.perf_counter(), time.thread_time()
            engine.enqueue("noop")
            cpus.append(time.thread_time() - cpu)
            walls.append(time.perf_counter() - wall)
            wall = time.perf_counter()
            time.sleep(0)
            floor.append(time.perf_counter() - wall)
            if index % 10 == 9:
                time.sleep(0.001)  # a producer that also does other work
    finally:
        if worker is not None:
            worker.communicate(timeout=60)  # closes its stdin: it stops
        engine.stop(10)
        store.close()
    return {"wall": walls, "cpu": cpus, "inside": inside, "floor": floor}


class _Counter:
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


def _produce(producers: int, jobs: int, enqueue: Callable[[], object]) -> float:
    """Enqueue ``jobs`` in all from ``producers`` threads; jobs/s."""
    per = jobs // producers
    barrier = threading.Barrier(producers + 1)

    def run() -> None:
        barrier.wait()
        for _ in range(per):
            enqueue()

    threads = [threading.Thread(target=run) for _ in range(producers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return per * producers / (time.perf_counter() - start)


_COMMITS: dict[int, list[int]] = {}  # producers -> jobs per enqueue commit of durability='full' runs
_SYNCS: dict[int, list[tuple[int, int]]] = {}  # producers -> (enqueues, WAL fdatasyncs) of those runs
_sync_calls = [0]
_sync_file = _sqlite_sync.sync_file


def _counted_sync(fd: int) -> None:
    _sync_calls[0] += 1
    _sync_file(fd)


_sqlite_sync.sync_file = _counted_sync


def _count_commits(store: SQLiteStore, producers: int) -> None:
    """Note how many enqueues each of ``store``'s commits held (the group commit's yield, whatever the disk)."""
    inner = store._write_jobs
    sizes = _COMMITS.setdefault(producers, [])

    def counted(requests: Sequence[Sequence[JobRecord]]) -> list[list[str]]:
        sizes.append(len(requests))
        return inner(requests)

    store._write_jobs = counted  # type: ignore[method-assign]


def bench_threaddispatch(directory: str, jobs: int, producers: int, durability: str) -> tuple[float, float]:
    store = SQLiteStore(os.path.join(directory, f"td-{next(_serial)}.db"), durability=durability)
    if durability == "full":
        _count_commits(store, producers)
    engine = JobEngine(store, concurrency=4, poll_interval=0.01, max_poll_interval=0.1, heartbeat_interval=5.0)
    counter = _Counter(jobs // producers * producers)
    engine.register("noop", lambda ctx, payload: counter.hit(), max_retries=0, timeout=None)
    synced = _sync_calls[0]
    enqueue_rate = _produce(producers, jobs, lambda: engine.enqueue("noop"))
    if durability == "full":
        _SYNCS.setdefault(producers, []).append((counter.target, _sync_calls[0] - synced))
    start = time.perf_counter()
    engine.start()
    if not counter.done.wait(600):
        raise RuntimeError(f"threaddispatch ran only {counter.count} jobs")
    run_rate = counter.target / (time.perf_counter() - start)
    engine.stop(10)
    store.close()
    return enqueue_rate, run_rate


def bench_huey(directory: str, jobs: int, producers: int) -> tuple[float, float]:
    from huey import SqliteHuey  # type: ignore[import-untyped]

    logging.getLogger("huey").setLevel(logging.WARNING)
    huey = SqliteHuey("bench", filename=os.path.join(directory, f"huey-{next(_serial)}.db"), fsync=True)
    counter = _Counter(jobs // producers * producers)

    @huey.task()  # type: ignore[untyped-decorator]
    def noop() -> None:
        counter.hit()

    enqueue_rate = _produce(producers, jobs, noop)
    consumer = huey.create_consumer(workers=4, worker_type="thread", periodic=False, initial_delay=0.01, max_delay=0.1)
    start = time.perf_counter()
    consumer.start()
    if not counter.done.wait(600):
        raise RuntimeError(f"huey ran only {counter.count} jobs")
    run_rate = counter.target / (time.perf_counter() - start)
    consumer.stop(graceful=True)
    return enqueue_rate, run_rate


def _latency_sections(directory: str, args: argparse.Namespace) -> None:
    print(f"1. cross-process pickup, engine idle (max_poll_interval 30 s), one job every {args.gap}s")
    print(
        f"   SQLiteStore                      {_quantiles(bench_cross_process(directory, args.count, args.gap, None))}"
    )
    print(f"2. delayed jobs (delay={args.delay}s): lateness after run_at")
    lateness = bench_cross_process(directory, args.count, args.gap, args.delay)
    print(f"   enqueued by another process      {_quantiles(lateness)}")
    own = bench_own_delayed(directory, args.count, args.gap, args.delay)
    print(f"   enqueued by this process         {_quantiles(own)}")
    print(f"   released by another's completion {_quantiles(bench_released(directory, args.count, args.gap))}")
    _enqueue_section(directory, args)


def _enqueue_section(directory: str, args: argparse.Namespace) -> None:
    for round_ in range(args.rounds):
        if args.against:
            print(f"-- round {round_ + 1}: the tree in {args.against}", flush=True)
            _run_against(args)
            print(f"-- round {round_ + 1}: this tree", flush=True)
        for in_process in (True, False):
            _enqueue_run(directory, args, in_process=in_process)


def _run_against(args: argparse.Namespace) -> None:
    """The same section with another checkout's code (``git archive REV threaddispatch benchmarks``), in a
    child process, so an A/B is made in one run and each round's peers meet the same noise."""
    script = os.path.join(args.against, "benchmarks", "bench_sqlite.py")
    env = {**os.environ, "PYTHONPATH": args.against}
    command = [sys.executable, script, "--only", "enqueue", "--enqueues", str(args.enqueues)]
    found = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=600)
    print("".join(line + "\n" for line in found.stdout.splitlines() if line.startswith(("3.", "   "))), end="")


def _enqueue_run(directory: str, args: argparse.Namespace, *, in_process: bool) -> None:
    found = bench_enqueue_with_worker(directory, args.enqueues, in_process=in_process)
    walls, inside = found["wall"], found["inside"]
    print(f"3. JobEngine.enqueue with 4 workers running in {'this' if in_process else 'another'} process")
    print(f"   wall                             {_quantiles(walls)}")
    print(f"   CPU (thread_time)                {_quantiles(found['cpu'])}")
    print(f"   inside SQLite (the insert)       {_quantiles(inside)}")
    print(f"   floor: time.sleep(0), same loop  {_quantiles(found['floor'])}")
    slow = [index for index, wall in enumerate(walls) if wall > 0.002]
    stalled_in_sqlite = sum(1 for index in slow if index < len(inside) and inside[index] > 0.002)
    print(f"   calls over 2 ms: {len(slow)}, of which {stalled_in_sqlite} inside SQLite (busy waits, GIL hand-backs)")


def _against_full(directory: str, against: str, jobs: int, producers: int) -> tuple[float, float]:
    """bench_threaddispatch(..., "full") with the tree in ``against``, in a child process: (enqueue, run) jobs/s."""
    directory = os.path.join(directory, f"against-{next(_serial)}")  # the child numbers its files from 0
    os.mkdir(directory)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.join(against, "benchmarks")!r})
        sys.path.insert(0, {against!r})
        import bench_sqlite
        print(*bench_sqlite.bench_threaddispatch({directory!r}, {jobs}, {producers}, "full"))
        """
    )
    env = {**os.environ, "PYTHONPATH": against}
    found = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True, timeout=600
    )
    enqueue_rate, run_rate = found.stdout.split()[-2:]
    return float(enqueue_rate), float(run_rate)


def _durability_section(directory: str, args: argparse.Namespace) -> None:
    print(f"4. equal durability (fsync per commit), {args.jobs} no-op jobs, 4 worker threads, {args.repeat} rounds")
    print("   each round runs the peers back to back (the disk's speed drifts: compare within a round)")
    for producers in args.producers:
        runs: dict[str, Callable[[], tuple[float, float]]] = {
            "threaddispatch durability='full'": lambda: bench_threaddispatch(directory, args.jobs, producers, "full"),
        }
        if args.against:  # the other tree's full durability, in the same rounds, next to this tree's
            runs["durability='full', --against tree"] = lambda: _against_full(
                directory, args.against, args.jobs, producers
            )
        runs["huey SqliteHuey(fsync=True)"] = lambda: bench_huey(directory, args.jobs, producers)
        runs["threaddispatch durability='normal'"] = lambda: bench_threaddispatch(
            directory, args.jobs, producers, "normal"
        )
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for _ in range(args.repeat):  # interleaved, so noise hits every peer alike
            for name, run in runs.items():
                results[name].append(run())
        plural = "s" if producers > 1 else ""
        print(f"   {producers} producer{plural}: {'enqueue jobs/s per round':>40}   {'run jobs/s per round':>30}")
        for name, found in results.items():
            enqueues = " ".join(f"{r[0]:6,.0f}" for r in found)
            runs_ = " ".join(f"{r[1]:6,.0f}" for r in found)
            print(f"   {name:36} {enqueues}   {runs_}")
        full, huey = results["threaddispatch durability='full'"], results["huey SqliteHuey(fsync=True)"]
        enqueue_ratios = [f[0] / h[0] for f, h in zip(full, huey, strict=True)]
        run_ratios = [f[1] / h[1] for f, h in zip(full, huey, strict=True)]
        print(
            f"   ratio full / huey per round: enqueue {' '.join(f'{r:.2f}' for r in enqueue_ratios)} "
            f"(median {statistics.median(enqueue_ratios):.2f}, min {min(enqueue_ratios):.2f}); "
            f"run {' '.join(f'{r:.2f}' for r in run_ratios)} (median {statistics.median(run_ratios):.2f})"
        )
        if args.against:
            other = results["durability='full', --against tree"]
            other_ratios = [o[0] / h[0] for o, h in zip(other, huey, strict=True)]
            print(
                f"   ratio --against tree / huey per round: enqueue {' '.join(f'{r:.2f}' for r in other_ratios)} "
                f"(median {statistics.median(other_ratios):.2f}, min {min(other_ratios):.2f}); "
                f"this tree / --against tree: enqueue median "
                f"{statistics.median(f[0] / o[0] for f, o in zip(full, other, strict=True)):.2f}"
            )
        sizes = _COMMITS.get(producers, [])
        if sizes:
            print(f"   durability='full': {sum(sizes) / len(sizes):.2f} enqueues per commit (huey: 1)", end="")
            syncs = _SYNCS.get(producers, [])
            if syncs and sum(count for _, count in syncs):
                per_sync = sum(jobs for jobs, _ in syncs) / sum(count for _, count in syncs)
                print(f", {per_sync:.2f} per WAL fdatasync", end="")
            print()


def _producer_counts(text: str) -> tuple[int, ...]:
    """``--producers``: "1,4,8" as (1, 4, 8); each a positive integer."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--producers must be comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--producers must be positive, got {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100, help="jobs per pickup/delayed run (default 100)")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between the other process's enqueues")
    parser.add_argument("--delay", type=float, default=0.5, help="delay of the delayed jobs (default 0.5 s)")
    parser.add_argument("--enqueues", type=int, default=5_000, help="enqueues with a worker running")
    parser.add_argument("--jobs", type=int, default=2_000, help="jobs per durability run (default 2,000)")
    parser.add_argument("--repeat", type=int, default=5, help="durability rounds (default 5)")
    parser.add_argument(
        "--producers",
        type=_producer_counts,
        default=(1, 4),
        help="comma-separated producer thread counts of the durability section (default 1,4): a group commit "
        "shares one fsync among at most as many enqueues as there are producers waiting",
    )
    parser.add_argument("--only", choices=["latency", "enqueue", "durability"], default=None)
    parser.add_argument("--rounds", type=int, default=1, help="enqueue-with-a-worker rounds (default 1)")
    parser.add_argument(
        "--against",
        default=None,
        help="a directory holding another tree: with --only enqueue run before each round; in the durability "
        "section its durability='full' runs as one more peer of each round",
    )
    args = parser.parse_args()
    import sqlite3

    print(f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as directory:
        if args.only in (None, "latency"):
            _latency_sections(directory, args)
        elif args.only == "enqueue":
            _enqueue_section(directory, args)
        if args.only in (None, "durability"):
            _durability_section(directory, args)


if __name__ == "__main__":
    main()
