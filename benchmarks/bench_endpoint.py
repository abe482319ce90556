"""Jobs/s through 1,000 endpoints: EndpointBatchDispatcher beside the seed's algorithm and a hand-off floor.

The workload, the same for every contender: ``--jobs`` DispatchJobs (built before the clock
starts, so only the dispatching is measured) spread round-robin over 1,000 endpoints with
priorities 0-2, added by ``--producers`` threads; a no-op ``send_batch`` that only counts;
batches of at most 100 jobs, the default 5 s window, at most 10 batches in flight; once the
producers are done the contender drains what is left (``shutdown()`` for the dispatcher).
Every job must arrive exactly once, in single-endpoint batches (checked). Measured from the
first add to the last job handed to the sender:

* ``jobs/s``: end to end;
* ``CPU ns/job``: process CPU time (all threads) over the same span, per job;
* ``add ns``: wall time of the producers' add loop, per job (the caller's cost);
* ``calls``: send_batch calls (200 jobs per endpoint make 2,000 full batches at best).

Contenders:

* ``EndpointBatchDispatcher``: the defaults (priority lanes, batches sent on a pool of 10
  threads); then without prioritization; then with a ``job_added`` listener (the announced
  path, which orders that event before the job's batch); then with an ``async def``
  send_batch (awaited on each sending thread's private event loop: its overhead per batch
  against the plain one); then with ``send_timeout=5`` (each send on a runner thread the
  sending thread waits for, to bound it).
* ``seed algorithm``: k-msg's ``BatchDispatcher`` ported to threads: per-endpoint lists under
  one lock with insertion by priority, a full queue sent on the adding thread, a timer thread
  every window, the same limit of 10 active batches. No retries, no events, no records.
* ``SimpleQueue + thread``: one C-level put per job, one consumer grouping by endpoint and
  sending at 100. No priority, no window, no limit: a floor for the hand-off itself.

Each cell is the median of ``--repeats`` runs, each in a fresh interpreter. Prints a
reStructuredText table for the README. Usage::

    python benchmarks/bench_endpoint.py [--jobs 200000] [--producers 1,4] [--repeats 3] [--latency-ms 0]

``--latency-ms`` makes every send_batch call take that long (a network round trip): then
what counts is how many batches are in flight at once, not the per-job overhead.

``--curves`` instead runs the scaling curves of :mod:`threaddispatch._bench_curves` (one
fresh interpreter per point and round, round-robin): the per-job cost by number of endpoints
(10 -> 100k, ``--jobs`` jobs round-robin, at least one per endpoint), the same with equal
batches at every size (``endpoints-equal``), by depth on one endpoint (10 -> 1M jobs queued
behind a sender holding every in-flight slot), and the slowest ``add_job`` with one job per
endpoint while the in-flight limit is reached, without and with ``gc.freeze()`` after the
jobs are built. ``--before DIR``
runs every point against another copy of the package too (``git archive HEAD threaddispatch
| tar -x -C DIR``), so the before/after ratios come from one run::

    python benchmarks/bench_endpoint.py --curves [--before DIR] [--jobs 100000] [--repeats 3] [--timeout 60]
"""

from __future__ import annotations

import argparse
import bisect
import json
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from threaddispatch import _bench_curves  # noqa: E402
from threaddispatch.endpoint import DispatchJob, EndpointBatchDispatcher  # noqa: E402

ENDPOINTS = 1000
BATCH = 100
WINDOW = 5.0  # the default batch_timeout
LIMIT = 10


class Counter:
    """The sender: counts jobs and calls, checks batch size and endpoint, signals when all arrived.

    With ``latency`` it waits that long per call first, as a network round trip would.
    """

    def __init__(self, expected: int, latency: float = 0.0) -> None:
        self.expected = expected
        self.latency = latency
        self.lock = threading.Lock()
        self.jobs = 0
        self.calls = 0
        self.max_batch = 0
        self.mixed = 0
        self.done = threading.Event()
        self.finished_at = 0.0

    def __call__(self, endpoint_id: Any, jobs: list[Any]) -> None:
        if self.latency:
            time.sleep(self.latency)
        n = len(jobs)
        mixed = jobs[0].endpoint_id != endpoint_id or jobs[-1].endpoint_id != endpoint_id
        with self.lock:
            self.jobs += n
            self.calls += 1
            self.max_batch = max(self.max_batch, n)
            self.mixed += mixed
            if self.jobs >= self.expected and not self.done.is_set():
                self.finished_at = time.perf_counter()
                self.done.set()


# -- contenders: each returns (add, finish); finish() stops its threads ---------------------


class AsyncCounter:
    """The same sender as an ``async def`` function."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    async def __call__(self, endpoint_id: Any, jobs: list[Any]) -> None:
        self.counter(endpoint_id, jobs)


def endpoint_dispatcher(counter: Counter, **options: Any) -> tuple[Callable[[Any], Any], Callable[[], None]]:
    listener = options.pop("listener", False)
    send: Any = AsyncCounter(counter) if options.pop("async_send", False) else counter
    d = EndpointBatchDispatcher(
        send,
        max_batch_size=BATCH,
        batch_timeout=WINDOW,
        max_concurrent_batches=LIMIT,
        # Room for every job: the first batches go only at ~99k jobs (200 per endpoint, 100 a
        # batch), so the default bound (100k, "raise") would refuse the adds of a busy machine.
        max_pending_jobs=counter.expected + 1,
        **options,
    )
    if listener:
        d.on("job_added", lambda payload: None)

    def finish() -> None:
        d.shutdown(60)

    return d.add_job, finish


class SeedPort:
    """k-msg's BatchDispatcher algorithm on threads (see the module docstring)."""

    def __init__(self, send: Callable[[Any, list[Any]], None]) -> None:
        self.send = send
        self.lock = threading.Lock()
        self.pending: dict[Any, list[Any]] = {}
        self.active = 0
        self.stop = threading.Event()
        self.timer = threading.Thread(target=self._tick, daemon=True)
        self.timer.start()

    def add_job(self, job: Any) -> None:
        with self.lock:
            jobs = self.pending.setdefault(job.endpoint_id, [])
            bisect.insort_right(jobs, job, key=_neg_priority)  # FIFO within a priority
            full = len(jobs) >= BATCH
        if full:
            self.process(job.endpoint_id)

    def process(self, endpoint_id: Any) -> None:
        with self.lock:
            jobs = self.pending.get(endpoint_id)
            if not jobs or self.active >= LIMIT:
                return  # skipped: stays queued for the next tick
            batch = jobs[:BATCH]
            del jobs[:BATCH]
            if not jobs:
                del self.pending[endpoint_id]
            self.active += 1
        try:
            self.send(endpoint_id, batch)
        finally:
            with self.lock:
                self.active -= 1

    def _tick(self) -> None:
        while not self.stop.wait(WINDOW):
            with self.lock:
                endpoints = list(self.pending)
            for endpoint_id in endpoints:
                self.process(endpoint_id)

    def close(self) -> None:
        self.stop.set()
        self.timer.join(5)
        while self.pending:  # the drain
            for endpoint_id in list(self.pending):
                self.process(endpoint_id)


def _neg_priority(job: Any) -> int:
    return -int(job.priority)


def seed_port(counter: Counter) -> tuple[Callable[[Any], Any], Callable[[], None]]:
    port = SeedPort(counter)
    return port.add_job, port.close


def simple_queue(counter: Counter) -> tuple[Callable[[Any], Any], Callable[[], None]]:
    q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    end = object()

    def consume() -> None:
        groups: dict[Any, list[Any]] = {}
        while True:
            job = q.get()
            if job is end:
                break
            group = groups.setdefault(job.endpoint_id, [])
            group.append(job)
            if len(group) >= BATCH:
                del groups[job.endpoint_id]
                counter(job.endpoint_id, group)
        for endpoint_id, group in groups.items():
            counter(endpoint_id, group)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()

    def finish() -> None:
        q.put(end)
        consumer.join(30)

    return q.put, finish


CONTENDERS: dict[str, Callable[[Counter], tuple[Callable[[Any], Any], Callable[[], None]]]] = {
    "EndpointBatchDispatcher": endpoint_dispatcher,
    "... enable_prioritization=False": lambda c: endpoint_dispatcher(c, enable_prioritization=False),
    "... with a job_added listener": lambda c: endpoint_dispatcher(c, listener=True),
    "... async def send_batch": lambda c: endpoint_dispatcher(c, async_send=True),
    "... send_timeout=5": lambda c: endpoint_dispatcher(c, send_timeout=5.0),
    "seed algorithm (k-msg, threaded)": seed_port,
    "SimpleQueue + thread (floor)": simple_queue,
}


# -- one cell, in its own interpreter -------------------------------------------------------


def run_cell(name: str, jobs_total: int, producers: int, latency: float) -> dict[str, Any]:
    jobs = [DispatchJob(f"endpoint-{i % ENDPOINTS}", {"n": i}, priority=i % 3) for i in range(jobs_total)]
    slices = [jobs[p::producers] for p in range(producers)]
    counter = Counter(jobs_total, latency)
    add, finish = CONTENDERS[name](counter)
    add_times: list[float] = []
    barrier = threading.Barrier(producers + 1)

    def produce(mine: list[Any]) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        for job in mine:
            add(job)
        add_times.append((time.perf_counter() - t0) / len(mine))

    threads = [threading.Thread(target=produce, args=(s,)) for s in slices]
    for t in threads:
        t.start()
    cpu0 = time.process_time()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    finish()  # drains what is left: the clock stops at the last job delivered
    complete = counter.done.wait(300)
    cpu = time.process_time() - cpu0
    elapsed = counter.finished_at - start if complete else float("nan")
    return {
        "jobs_per_s": jobs_total / elapsed,
        "cpu_ns_per_job": cpu / jobs_total * 1e9,
        "add_ns": statistics.mean(add_times) * 1e9,
        "calls": counter.calls,
        "complete": complete and counter.jobs == jobs_total and counter.max_batch <= BATCH and not counter.mixed,
    }


def construction_ns(count: int = 100_000) -> float:
    t0 = time.perf_counter()
    for i in range(count):
        DispatchJob("endpoint-1", i, priority=1)
    return (time.perf_counter() - t0) / count * 1e9


CURVE_POINTS: dict[str, list[int]] = {
    "endpoints": [10, 1_000, 10_000, 100_000],
    "endpoints-equal": [10, 1_000, 10_000, 100_000],
    "depth": [10, 1_000, 100_000, 1_000_000],
    "endpoints-limit": [1_000, 10_000, 100_000],
    "endpoints-limit-frozen": [1_000, 10_000, 100_000],
}
# The jobs of each curve's point of size n, given --jobs (at least one per endpoint, or EQUAL_BATCH).
CURVE_OPS: dict[str, Callable[[int, int], int]] = {
    "endpoints": max,
    "endpoints-equal": lambda n, jobs: max(jobs, _bench_curves.EQUAL_BATCH * n),
}


def _n_ops(n: int, _jobs: int) -> int:
    return n


# A point run in a fresh interpreter against the package in argv[1]; the curve module comes
# from this checkout when that copy predates it (it uses only the faces' public API).
_POINT = """
import runpy, sys
tree, here = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree)
import threaddispatch
threaddispatch.__path__.append(here)
sys.argv = ["bench-point", *sys.argv[3:]]
runpy.run_module("threaddispatch._bench_curves", run_name="__main__")
"""


def _point(tree: str, series: str, n: int, ops: int, timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-c", _POINT, tree, str(ROOT / "threaddispatch"), "--curve", series]
    command += ["--n", str(n), "--ops", str(ops), "--timeout", str(timeout)]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 30, check=True)
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as exc:  # blocked past the deadline, or died
        print(f"{series} n={n} in {tree}: {type(exc).__name__}: {str(exc.stderr or '')[-300:]}", file=sys.stderr)
        return {"complete": False, "cpu_ns": float("nan"), "max_call_ms": float("nan"), "delivered": 0}
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def curves(jobs: int, repeats: int, timeout: float, before: str | None) -> int:
    trees = [("after", str(ROOT))] + ([("before", before)] if before else [])
    plan = [(series, n, CURVE_OPS.get(series, _n_ops)(n, jobs)) for series, ns in CURVE_POINTS.items() for n in ns]
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for round_ in range(repeats):
        for series, n, ops in plan:
            for name, tree in trees:
                result = _point(tree, series, n, ops, timeout)
                runs.setdefault((name, series, n), []).append(result)
                print(f"round {round_ + 1}: {name} {series} n={n}: {json.dumps(result)}", file=sys.stderr, flush=True)

    def median(name: str, series: str, n: int, key: str) -> float:
        values = [r[key] for r in runs[(name, series, n)] if r["complete"]]
        return statistics.median(values) if values else float("nan")

    def done(name: str, series: str, n: int) -> str:
        results = runs[(name, series, n)]
        return "yes" if all(r["complete"] for r in results) else f"NO ({min(r['delivered'] for r in results)})"

    header = f"{'curve':<22} {'n':>9} {'CPU ns/job':>11} {'x first':>8} {'slowest add ms':>15}  done"
    for name, _tree in trees:
        print(f"\n{name} (median of {repeats}; a point not done within {timeout:.0f}s has no figure)")
        print(header)
        for series, ns in CURVE_POINTS.items():
            first = median(name, series, ns[0], "cpu_ns")
            for n in ns:
                cpu, slowest = median(name, series, n, "cpu_ns"), median(name, series, n, "max_call_ms")
                print(
                    f"{series:<22} {n:>9,} {cpu:>11.0f} {cpu / first:>8.2f} {slowest:>15.2f}  {done(name, series, n)}"
                )
    if before:
        print("\nafter / before, per point (CPU ns per job; slowest add_job)")
        for series, n, _ops in plan:
            cpu = median("after", series, n, "cpu_ns") / median("before", series, n, "cpu_ns")
            slow = median("after", series, n, "max_call_ms") / median("before", series, n, "max_call_ms")
            print(f"{series:<22} {n:>9,} {cpu:>8.2f} {slow:>8.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--curves", action="store_true", help="the scaling curves (endpoints, depth, in-flight limit)")
    parser.add_argument("--before", help="with --curves: also run every point against this package copy")
    parser.add_argument("--timeout", type=float, default=60.0, help="with --curves: seconds per point")
    parser.add_argument("--producers", default="1,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="time each send_batch call takes")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.curves:
        return curves(args.jobs if args.jobs != 200_000 else 100_000, args.repeats, args.timeout, args.before)
    if args.cell:
        print(json.dumps(run_cell(args.cell, args.jobs, int(args.producers), args.latency_ms / 1000)))
        return 0

    # Round-robin over the cells, one run of each per round: a load change on the machine
    # then affects every contender alike instead of whichever happened to be running.
    cells = [(name, int(p)) for p in args.producers.split(",") for name in CONTENDERS]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {cell: [] for cell in cells}
    for round_ in range(args.repeats):
        for name, producers in cells:
            out = subprocess.run(
                [
                    *(sys.executable, __file__, "--cell", name, "--jobs", str(args.jobs)),
                    *("--producers", str(producers), "--latency-ms", str(args.latency_ms)),
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
            )
            runs[(name, producers)].append(json.loads(out.stdout))
            print(f"round {round_ + 1}: {name} x{producers}: {out.stdout.strip()}", file=sys.stderr, flush=True)
    rows = []
    for (name, producers), results in runs.items():
        row: dict[str, Any] = {"name": name, "producers": producers}
        for key in ("jobs_per_s", "cpu_ns_per_job", "add_ns", "calls"):
            row[key] = statistics.median(r[key] for r in results)
        row["complete"] = all(r["complete"] for r in results)
        rows.append(row)
    ok = all(row["complete"] for row in rows)

    seed = {r["producers"]: r["jobs_per_s"] for r in rows if r["name"].startswith("seed")}
    header = ["contender", "prod", "jobs/s", "x seed", "CPU ns/job", "add ns", "calls", "ok"]
    table = [
        [
            r["name"],
            str(r["producers"]),
            f"{r['jobs_per_s'] / 1e3:.0f}k",
            f"{r['jobs_per_s'] / seed[r['producers']]:.2f}",
            f"{r['cpu_ns_per_job']:.0f}",
            f"{r['add_ns']:.0f}",
            f"{r['calls']:.0f}",
            "yes" if r["complete"] else "NO",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    rule = "  ".join("=" * w for w in widths)
    print(rule)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print(rule)
    for table_row in table:
        print("  ".join(c.ljust(w) for c, w in zip(table_row, widths)).rstrip())
    print(rule)
    print(f"\nDispatchJob(...) construction, not in the figures above: {construction_ns():.0f} ns per job")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
