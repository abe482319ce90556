"""The scaling curves and hand-off costs behind ``threaddispatch bench`` and ``benchmarks/bench_scaling.py``.

Curves (one point = one size ``n``, run in a fresh interpreter so no point inherits another's
heap): a no-op sink counts deliveries; the point ends when all ``ops`` arrived or its deadline
passed (then it is reported as not finished, with what arrived). Measured per operation:
``cpu_ns``, the process CPU time (every thread: callers, engine, senders) from the first call
to the last delivery over ``ops``; ``wall_ns``, the same span's wall time over ``ops``;
``caller_ns``, the calling thread's CPU time (``thread_time``) in its loop over ``ops``; and
``max_call_ms``, the slowest single call (each call is timed, which the caller figure includes),
and ``no-GC call ms``, the slowest during which no garbage collection ran (on any thread);
``ops/batch``, operations per sink call (with many endpoints the batches are small, so the
per-job cost then carries more per-batch work); ``max GC ms``, the longest garbage
collection during the span (what a slow call was waiting for, when the two match), and
``tracked/n``, the objects the collector tracks per unit of ``n`` at the end of the calls,
beyond those the workload built before the clock started (the cost of a full collection
grows with it).

* ``endpoints``: EndpointBatchDispatcher, ``ops`` jobs round-robin over ``n`` endpoints,
  batches of 100, a 10 ms window, 10 batches in flight.
* ``endpoints-equal``: the same with batches of one size at every ``n``: ``EQUAL_BATCH``
  jobs per endpoint added one after the other, ``max_batch_size=EQUAL_BATCH`` (so each
  endpoint's batch goes by the size trigger), at least ``EQUAL_BATCH * n`` jobs. Round-robin,
  ``endpoints`` has ~100 jobs per batch at 10 endpoints and 1-2 at 100k, so its per-job
  figure there is mostly one batch's cost (a hand-off, a send, a settle); this curve shows
  what grows with the number of endpoints alone.
* ``endpoints-limit``: one job on each of ``n`` endpoints while the sender holds every
  in-flight slot (it waits until the last job is added): ``max_call_ms`` is the figure.
* ``endpoints-limit-frozen``: the same after ``gc.freeze()`` once the jobs are built (the
  user-side answer to full collections over a large heap: the collector then skips every
  object made before it), so ``max_call_ms`` is the slowest call without the collections
  that visit the caller's own jobs; ``max GC ms`` is then what the dispatcher's own objects
  (its lanes, ``tracked/n``) cost a full collection.
* ``depth``: ``n`` jobs on one endpoint, added while the sender holds every in-flight slot,
  so the lane really is ``n`` deep, then drained.
* ``requests-queued`` and ``requests-concurrent``: RequestDispatcher, ``n`` requests on one
  key added while the key is paused, then started and drained (8 workers).
* ``peer-per-job``: the peer of ``endpoints`` at many endpoints, where every batch holds one
  job: ``queue.Queue`` and one thread making one sink call per job (``sink(key, [job])``),
  the jobs of the same ``n`` keys. No window, no limit, no records: the floor of a
  dispatcher whose batches are single jobs.

Hand-offs (``HANDOFFS``): ``producers`` threads each make ``ops / producers`` calls of one
hand-off with a no-op consumer behind it and room to spare (nothing may be dropped; the count
is verified); ``cpu_ns`` is the callers' ``thread_time`` per call, ``wall_ns`` the callers'
loop wall time per call, ``ops_per_s`` first call to last delivery.

Only the faces' public API is used, so the figures follow the faces as they change. It
runs past 600 lines because every curve's child-process workload is written out in full,
so that what each point measures can be read in one place.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "CURVES",
    "HANDOFFS",
    "CurvePoint",
    "format_curves",
    "format_handoffs",
    "plot_curves",
    "run_curves",
    "run_handoffs",
    "run_producers",
    "sparkbars",
]

WINDOW = 0.01  # seconds: the batching faces' window, as in the race
ENDPOINT_BATCH = 100
EQUAL_BATCH = 10  # jobs per endpoint, added together, and the batch size, of the endpoints-equal curve
IN_FLIGHT = 10
WORKERS = 8
KILL_GRACE = 15.0  # seconds past its deadline before a child that does not report is killed
REQUEST = {"method": "GET", "endpoint": "/users", "query": {"page": 1}}


class _Count:
    """Counts deliveries from any thread; sets ``done`` at ``target``; ``last`` is when the last one came."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.lock = threading.Lock()  # guards count, calls and last
        self.count = 0
        self.calls = 0  # how many deliveries (sink calls) brought ``count``
        self.last = 0.0
        self.done = threading.Event()

    def add(self, n: int) -> None:
        with self.lock:
            self.count += n
            self.calls += 1
            if self.count >= self.target and not self.done.is_set():
                self.last = time.perf_counter()
                self.done.set()


# -- curves: each runner adds ``ops`` operations for size ``n`` and returns the measurements -----


@dataclass
class _Span:
    """What a curve runner measured; turned into the point's JSON by ``_curve_result``."""

    ops: int
    delivered: int
    complete: bool
    cpu_s: float
    wall_s: float
    caller_cpu_per_call_s: float
    max_call_s: float
    sink_calls: int
    max_gc_s: float = 0.0
    tracked_per_n: float | None = None
    max_clear_call_s: float | None = None  # the slowest call no garbage collection overlapped


class _GcPauses:
    """The longest garbage collection while installed (``gc.callbacks``), in seconds."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.started = 0  # collections begun: a call during which it changed waited for one
        self._started = 0.0

    def __enter__(self) -> _GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *_exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, _info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self.started += 1
            self._started = now
        else:
            self.longest = max(self.longest, now - self._started)


def _timed_calls(
    call: Callable[[Any], Any], items: Iterator[Any], deadline: float, pauses: _GcPauses | None = None
) -> tuple[float, float, int, float | None]:
    """Call ``call`` on each item until ``deadline`` (monotonic) passes.

    Returns (the calling thread's CPU seconds, the slowest call in seconds, calls made, the
    slowest call during which ``pauses`` saw no collection begin: None without ``pauses``).
    """
    clock = time.perf_counter
    stop = clock() + (deadline - time.monotonic())
    slowest, clear, calls = 0.0, 0.0, 0
    cpu0 = time.thread_time()
    for item in items:
        started = 0 if pauses is None else pauses.started
        t0 = clock()
        call(item)
        t1 = clock()
        calls += 1
        slowest = max(slowest, t1 - t0)
        if pauses is not None and pauses.started == started:
            clear = max(clear, t1 - t0)
        if t1 > stop:
            break
    return time.thread_time() - cpu0, slowest, calls, None if pauses is None else clear


def _endpoint_run(
    endpoints: int,
    ops: int,
    *,
    hold: bool,
    deadline: float,
    together: int = 1,
    batch: int = ENDPOINT_BATCH,
    freeze: bool = False,
) -> _Span:
    """``ops`` jobs over ``endpoints``, ``together`` consecutive jobs per endpoint in turn; see the module docstring."""
    from threaddispatch.endpoint import DispatchJob, EndpointBatchDispatcher

    count = _Count(ops)
    release = threading.Event()

    def send_batch(endpoint_id: Any, jobs: list[Any]) -> None:
        if hold:
            release.wait(max(0.0, deadline - time.monotonic()))
        count.add(len(jobs))

    jobs = [DispatchJob(f"endpoint-{i // together % endpoints}", i) for i in range(ops)]
    dispatcher = EndpointBatchDispatcher(
        send_batch,
        max_batch_size=batch,
        batch_timeout=WINDOW,
        max_concurrent_batches=IN_FLIGHT,
        max_pending_jobs=ops + 1,
        name="bench-curves",
    )
    gc.collect()  # garbage left from before would be freed during the adds and lower tracked/n
    if freeze:
        gc.freeze()  # the jobs and the dispatcher: what the user built before the adds
    try:
        tracked0 = len(gc.get_objects())
        cpu0, wall0 = time.process_time(), time.perf_counter()
        with _GcPauses() as pauses:
            caller_cpu, slowest, calls, clear = _timed_calls(dispatcher.add_job, iter(jobs), deadline, pauses)
            counted = time.process_time()
            tracked = (len(gc.get_objects()) - tracked0) / endpoints  # with hold, every lane is still there
            cpu0 += time.process_time() - counted  # the count is the benchmark's, not the dispatcher's
            release.set()
            complete = count.done.wait(max(0.0, deadline - time.monotonic()))
    finally:
        if freeze:
            gc.unfreeze()  # run in a test process: nothing stays frozen (3.12 also thaws what it froze at start)
    span = _span(count, ops, complete, start=(cpu0, wall0), per_call=caller_cpu / calls, slowest=slowest)
    span.max_gc_s, span.tracked_per_n, span.max_clear_call_s = pauses.longest, tracked, clear
    if complete:
        dispatcher.shutdown(max(1.0, deadline - time.monotonic()))
    return span


def _peer_per_job_run(keys: int, ops: int, *, deadline: float) -> _Span:
    """queue.Queue and one thread making one sink call per job: the floor of one-job batches."""
    count = _Count(ops)
    inbox: queue.Queue[tuple[str, int] | None] = queue.Queue()

    def sink(_key: str, items: list[int]) -> None:
        count.add(len(items))

    def consume() -> None:
        while (entry := inbox.get()) is not None:
            sink(entry[0], [entry[1]])

    consumer = threading.Thread(target=consume, name="bench-peer-per-job", daemon=True)
    consumer.start()
    jobs = [(f"endpoint-{i % keys}", i) for i in range(ops)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with _GcPauses() as pauses:
        caller_cpu, slowest, calls, clear = _timed_calls(inbox.put, iter(jobs), deadline, pauses)
        complete = count.done.wait(max(0.0, deadline - time.monotonic()))
    span = _span(count, ops, complete, start=(cpu0, wall0), per_call=caller_cpu / calls, slowest=slowest)
    span.max_gc_s, span.max_clear_call_s = pauses.longest, clear
    inbox.put(None)
    consumer.join(max(1.0, deadline - time.monotonic()))
    return span


def _span(
    count: _Count, ops: int, complete: bool, *, start: tuple[float, float], per_call: float, slowest: float
) -> _Span:
    """The span from ``cpu0``/``wall0`` to the last delivery (to now when the point did not finish)."""
    cpu0, wall0 = start
    end = count.last if complete else time.perf_counter()
    cpu = time.process_time() - cpu0
    return _Span(ops, count.count, complete, cpu, end - wall0, per_call, slowest, count.calls)


def _requests_run(ops: int, mode: Literal["queued", "concurrent"], *, deadline: float) -> _Span:
    from threaddispatch.requests import CancellationToken, RequestDispatcher

    count = _Count(ops)

    def send(request: Any, token: CancellationToken) -> None:
        count.add(1)

    rd: RequestDispatcher[Any, None] = RequestDispatcher(send, max_workers=WORKERS, name="bench-curves")
    add = functools.partial(rd.add, queue_key="k", mode=mode)
    rd.pause("k")
    gc.collect()  # garbage left from before would be freed during the adds and lower tracked/n
    tracked0 = len(gc.get_objects())
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with _GcPauses() as pauses:
        caller_cpu, slowest, calls, clear = _timed_calls(add, (REQUEST for _ in range(ops)), deadline, pauses)
        counted = time.process_time()
        tracked = (len(gc.get_objects()) - tracked0) / calls  # the queue is paused: every request is pending
        cpu0 += time.process_time() - counted  # the count is the benchmark's, not the dispatcher's
        rd.start("k")
        complete = count.done.wait(max(0.0, deadline - time.monotonic()))
    span = _span(count, ops, complete, start=(cpu0, wall0), per_call=caller_cpu / calls, slowest=slowest)
    span.max_gc_s, span.tracked_per_n, span.max_clear_call_s = pauses.longest, tracked, clear
    if complete:
        rd.close(max(1.0, deadline - time.monotonic()))
    return span


def _just_n(n: int, _jobs: int) -> int:
    return n


CurveRunner = Callable[[int, int, float], _Span]  # (n, ops, deadline on the monotonic clock)

# name -> (label, what n counts, runner, ops at size n given the endpoints curve's ``jobs``)
CURVES: dict[str, tuple[str, str, CurveRunner, Callable[[int, int], int]]] = {
    "endpoints": (
        "EndpointBatchDispatcher per job, by endpoints",
        "endpoints",
        lambda n, ops, deadline: _endpoint_run(n, ops, hold=False, deadline=deadline),
        max,  # at least one job per endpoint
    ),
    "endpoints-equal": (
        f"EndpointBatchDispatcher per job, by endpoints, {EQUAL_BATCH} jobs per batch at every n",
        "endpoints",
        lambda n, ops, deadline: _endpoint_run(
            n, ops, hold=False, deadline=deadline, together=EQUAL_BATCH, batch=EQUAL_BATCH
        ),
        lambda n, jobs: max(jobs, EQUAL_BATCH * n),  # EQUAL_BATCH jobs per endpoint at least
    ),
    "endpoints-limit": (
        "EndpointBatchDispatcher add_job, one job per endpoint, in-flight limit reached",
        "endpoints",
        lambda n, ops, deadline: _endpoint_run(n, ops, hold=True, deadline=deadline),
        _just_n,
    ),
    "endpoints-limit-frozen": (
        "EndpointBatchDispatcher add_job, one job per endpoint, in-flight limit reached, gc.freeze() after the jobs",
        "endpoints",
        lambda n, ops, deadline: _endpoint_run(n, ops, hold=True, deadline=deadline, freeze=True),
        _just_n,
    ),
    "depth": (
        "EndpointBatchDispatcher per job, by depth on one endpoint",
        "jobs queued",
        lambda n, ops, deadline: _endpoint_run(1, ops, hold=True, deadline=deadline),
        _just_n,
    ),
    "requests-queued": (
        "RequestDispatcher queued mode per request, by depth on one key",
        "requests queued",
        lambda n, ops, deadline: _requests_run(ops, "queued", deadline=deadline),
        _just_n,
    ),
    "requests-concurrent": (
        "RequestDispatcher concurrent mode per request, by depth on one key",
        "requests queued",
        lambda n, ops, deadline: _requests_run(ops, "concurrent", deadline=deadline),
        _just_n,
    ),
    "peer-per-job": (
        "peer: queue.Queue + a thread, one sink call per job",
        "keys",
        lambda n, ops, deadline: _peer_per_job_run(n, ops, deadline=deadline),
        max,  # the jobs of the endpoints curve
    ),
}


def _curve_result(series: str, n: int, span: _Span) -> dict[str, Any]:
    """The point's JSON. Unfinished, the costs are over all ``ops``: lower bounds of the whole run's."""
    return {
        "series": series,
        "n": n,
        "ops": span.ops,
        "delivered": span.delivered,
        "complete": span.complete and span.delivered == span.ops,
        "cpu_ns": span.cpu_s / span.ops * 1e9,
        "wall_ns": span.wall_s / span.ops * 1e9,
        "caller_ns": span.caller_cpu_per_call_s * 1e9,
        "max_call_ms": span.max_call_s * 1e3,
        "sink_calls": span.sink_calls,
        "seconds": span.wall_s,
        "max_gc_ms": span.max_gc_s * 1e3,
        "tracked_per_n": span.tracked_per_n,
        "max_clear_call_ms": None if span.max_clear_call_s is None else span.max_clear_call_s * 1e3,
    }


# -- hand-offs: each factory returns (call, item, finish); finish() waits for delivery, stops ---


Handoff = tuple[Callable[[Any], Any], Any, Callable[[float], None]]


def _background(count: _Count, overflow: str, submit: bool) -> Handoff:
    from threaddispatch import BackgroundDispatcher

    d: BackgroundDispatcher[Any] = BackgroundDispatcher(
        lambda entries: count.add(len(entries)),
        ms_delay=WINDOW * 1000,
        max_batch_size=512,
        max_queue_size=count.target + 1,
        overflow=overflow,  # type: ignore[arg-type]
        name="bench-curves",
    )
    return (d.submit if submit else d.enqueue), {"event": "click", "n": 1}, lambda timeout: _close(d, timeout)


def _close(face: Any, timeout: float) -> None:
    face.flush(timeout)
    face.close(timeout)


def _batched(count: _Count) -> Handoff:
    from threaddispatch.batched import BatchedDispatcher

    def send_batch(target: str, messages: list[Any]) -> list[Any]:
        count.add(len(messages))
        return [None] * len(messages)

    bd: BatchedDispatcher[Any] = BatchedDispatcher(
        send_batch, max_batch_size=512, flush_interval=WINDOW, name="bench-curves"
    )
    return functools.partial(bd.submit, target="bench"), {"event": "click", "n": 1}, lambda t: _close(bd, t)


def _requests_add(count: _Count) -> Handoff:
    from threaddispatch.requests import RequestDispatcher

    rd: RequestDispatcher[Any, None] = RequestDispatcher(
        lambda request, token: count.add(1), max_workers=WORKERS, name="bench-curves"
    )
    return functools.partial(rd.add, queue_key="k"), REQUEST, lambda timeout: _wait_close(count, rd, timeout)


def _wait_close(count: _Count, face: Any, timeout: float) -> None:
    count.done.wait(timeout)
    face.close(timeout)


def _queue(count: _Count, simple: bool) -> Handoff:
    q: queue.Queue[Any] | queue.SimpleQueue[Any] = queue.SimpleQueue() if simple else queue.Queue()
    stop = object()

    def consume() -> None:
        get = q.get
        while get() is not stop:
            count.add(1)

    thread = threading.Thread(target=consume, name="bench-curves-consumer", daemon=True)
    thread.start()

    def finish(timeout: float) -> None:
        count.done.wait(timeout)
        q.put(stop)
        thread.join(timeout)

    return q.put, {"event": "click", "n": 1}, finish


def _executor(count: _Count) -> Handoff:
    pool = ThreadPoolExecutor(WORKERS)

    def finish(timeout: float) -> None:
        count.done.wait(timeout)
        pool.shutdown(wait=True)

    def task(_item: Any) -> None:
        count.add(1)

    submit: Callable[[Any], Any] = functools.partial(pool.submit, task)  # type: ignore[call-arg]
    return submit, {"event": "click", "n": 1}, finish


HANDOFFS: dict[str, tuple[str, Callable[[_Count], Handoff]]] = {
    "enqueue-drop_newest": ("BackgroundDispatcher.enqueue drop_newest", lambda c: _background(c, "drop_newest", False)),
    "enqueue-drop_oldest": ("BackgroundDispatcher.enqueue drop_oldest", lambda c: _background(c, "drop_oldest", False)),
    "enqueue-block": ("BackgroundDispatcher.enqueue block", lambda c: _background(c, "block", False)),
    "enqueue-raise": ("BackgroundDispatcher.enqueue raise", lambda c: _background(c, "raise", False)),
    "submit": ("BackgroundDispatcher.submit", lambda c: _background(c, "drop_newest", True)),
    "batched-submit": ("BatchedDispatcher.submit", _batched),
    "requests-add": ("RequestDispatcher.add", _requests_add),
    "queue-put": ("queue.Queue.put + thread", lambda c: _queue(c, False)),
    "simplequeue-put": ("queue.SimpleQueue.put + thread", lambda c: _queue(c, True)),
    "executor-submit": ("ThreadPoolExecutor.submit", _executor),
}


def run_producers(producers: int, produce: Callable[[int], None]) -> float:
    """Run ``produce(index)`` on ``producers`` threads released together; returns when all are done.

    Returns the ``perf_counter`` time of the release.
    """
    start = threading.Barrier(producers + 1)

    def body(index: int) -> None:
        start.wait()
        produce(index)

    threads = [threading.Thread(target=body, args=(i,), name=f"bench-producer-{i}") for i in range(producers)]
    for thread in threads:
        thread.start()
    start.wait()
    released = time.perf_counter()
    for thread in threads:
        thread.join()
    return released


def _handoff_run(name: str, producers: int, ops: int, deadline: float) -> dict[str, Any]:
    per = max(1, ops // producers)
    total = per * producers
    count = _Count(total)
    call, item, finish = HANDOFFS[name][1](count)
    cpu = [0.0] * producers
    wall = [0.0] * producers

    def produce(index: int) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(per):
            call(item)
        cpu[index], wall[index] = time.thread_time() - c0, time.perf_counter() - t0

    wall0 = run_producers(producers, produce)
    complete = count.done.wait(max(0.0, deadline - time.monotonic()))
    end = count.last if complete else time.perf_counter()
    finish(max(1.0, deadline - time.monotonic()))
    return {
        "series": name,
        "n": producers,
        "ops": total,
        "delivered": count.count,
        "complete": complete and count.count == total,
        "cpu_ns": sum(cpu) / total * 1e9,
        "wall_ns": sum(wall) / total * 1e9,
        "ops_per_s": count.count / (end - wall0),
        "seconds": end - wall0,
    }


# -- the parent: fresh processes, repeats, medians --------------------------------------------


@dataclass
class CurvePoint:
    """The median of ``runs`` fresh-process runs of one point (a curve's size, or a hand-off's producers)."""

    series: str
    label: str
    n: int
    ops: int
    runs: int
    complete: bool
    delivered: int
    cpu_ns: float
    wall_ns: float
    caller_ns: float | None = None
    max_call_ms: float | None = None
    ops_per_s: float | None = None
    timeout_s: float | None = None
    sink_calls: float | None = None  # deliveries (batches) the sink saw, median
    max_gc_ms: float | None = None  # the longest garbage collection during the span, median
    tracked_per_n: float | None = None  # objects the collector tracks per unit of n after the calls, median
    max_clear_call_ms: float | None = None  # the slowest call no garbage collection overlapped, median
    error: str | None = None  # the last line a failed child wrote to stderr


def _child_env() -> dict[str, str]:
    """The environment for a child run: this package importable wherever the parent was started."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _run_child(kind: str, series: str, n: int, ops: int, timeout: float) -> dict[str, Any]:
    """One point in a fresh interpreter; a child past its deadline reports what arrived by then."""
    command = [
        *(sys.executable, "-m", "threaddispatch._bench_curves", "--" + kind, series),
        *("--n", str(n), "--ops", str(ops), "--timeout", str(timeout)),
    ]
    try:
        out = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout + KILL_GRACE, check=False, env=_child_env()
        )
    except subprocess.TimeoutExpired:  # one call blocked past the deadline: only the wall bound is known
        nan = float("nan")
        return {"series": series, "n": n, "ops": ops, "delivered": 0, "complete": False, "cpu_ns": nan,
                "wall_ns": (timeout + KILL_GRACE) / ops * 1e9}  # fmt: skip
    if out.returncode != 0:  # a face broke: the point says why, the other points still run
        lines = out.stderr.strip().splitlines() or [f"exit code {out.returncode}"]
        nan = float("nan")
        return {"series": series, "n": n, "ops": ops, "delivered": 0, "complete": False, "cpu_ns": nan,
                "wall_ns": nan, "error": lines[-1]}  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _median_point(label: str, runs: list[dict[str, Any]], timeout: float) -> CurvePoint:
    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None and r[key] == r[key]]  # not None, not NaN
        return float(statistics.median(values)) if values else None

    first = runs[0]
    return CurvePoint(
        series=first["series"],
        label=label,
        n=first["n"],
        ops=first["ops"],
        runs=len(runs),
        complete=all(r["complete"] for r in runs),
        delivered=min(r["delivered"] for r in runs),
        cpu_ns=_or_nan(median("cpu_ns")),
        wall_ns=_or_nan(median("wall_ns")),
        caller_ns=median("caller_ns"),
        max_call_ms=median("max_call_ms"),
        ops_per_s=median("ops_per_s"),
        sink_calls=median("sink_calls"),
        max_gc_ms=median("max_gc_ms"),
        tracked_per_n=median("tracked_per_n"),
        max_clear_call_ms=median("max_clear_call_ms"),
        timeout_s=timeout,
        error=next((r["error"] for r in runs if r.get("error")), None),
    )


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _run_plan(
    kind: str,
    plan: list[tuple[str, str, int, int]],
    repeats: int,
    timeout: float,
    progress: Callable[[str], None] | None,
) -> list[CurvePoint]:
    """Round-robin over the points, one run of each per round: a load change hits every point alike."""
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(s, n): [] for _label, s, n, _ops in plan}
    for round_ in range(repeats):
        for step, (label, series, n, ops) in enumerate(plan, 1):
            if progress:
                progress(f"[{step}/{len(plan)}] {label}, n={n:,}, run {round_ + 1}/{repeats}")
            runs[(series, n)].append(_run_child(kind, series, n, ops, timeout))
    return [_median_point(label, runs[(s, n)], timeout) for label, s, n, _ops in plan]


def run_curves(
    points: dict[str, list[int]],
    *,
    repeats: int,
    timeout: float = 60.0,
    jobs: int = 100_000,
    progress: Callable[[str], None] | None = None,
) -> list[CurvePoint]:
    """Run each curve series at each size, ``repeats`` fresh-process runs each; medians.

    ``jobs`` is the ``endpoints`` curve's job count (at least one per endpoint); the other
    curves make ``n`` operations. A point past ``timeout`` seconds is reported with
    ``complete=False`` and its costs over all its operations (lower bounds).
    """
    unknown = [s for s in points if s not in CURVES]
    if unknown:
        raise ValueError(f"unknown curve(s) {', '.join(unknown)}; known: {', '.join(CURVES)}")
    plan = [(CURVES[s][0], s, n, CURVES[s][3](n, jobs)) for s, sizes in points.items() for n in sizes]
    return _run_plan("curve", plan, repeats, timeout, progress)


def run_handoffs(
    names: list[str],
    *,
    producer_counts: list[int],
    ops: int,
    repeats: int,
    timeout: float = 60.0,
    progress: Callable[[str], None] | None = None,
) -> list[CurvePoint]:
    """Run each hand-off at each producer count, ``repeats`` fresh-process runs each; medians."""
    unknown = [s for s in names if s not in HANDOFFS]
    if unknown:
        raise ValueError(f"unknown hand-off(s) {', '.join(unknown)}; known: {', '.join(HANDOFFS)}")
    plan = [(HANDOFFS[s][0], s, p, ops) for p in producer_counts for s in names]
    return _run_plan("handoff", plan, repeats, timeout, progress)


# -- output ----------------------------------------------------------------------------------


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(rule)
    return "\n".join(lines)


def _ns(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value / 1000:.1f} µs" if value >= 10_000 else f"{value:.0f}"


def _done(p: CurvePoint) -> str:
    if p.complete:
        return "yes"
    if p.error:
        return f"FAILED: {p.error}"
    return f"NO: {p.delivered:,} of {p.ops:,} in {p.timeout_s:.0f} s"


BASE_OPS = 1_000  # a point with fewer operations mostly measures start-up (threads, the first window)
PEERED = ("endpoints", "endpoints-equal")  # the curves compared with peer-per-job at the same n


def _by_series(points: list[CurvePoint]) -> dict[str, list[CurvePoint]]:
    groups: dict[str, list[CurvePoint]] = {}
    for p in points:
        groups.setdefault(p.series, []).append(p)
    return groups


def _base(group: list[CurvePoint]) -> CurvePoint:
    """The point a series' ratios are to: its first with at least ``BASE_OPS`` operations (else its first)."""
    return next((p for p in group if p.ops >= BASE_OPS and not math.isnan(p.cpu_ns)), group[0])


def format_curves(points: list[CurvePoint]) -> str:
    """The curve points as a simple reStructuredText table.

    ``x base`` is CPU per op over the series' base point's (see :func:`_base`); ``+`` marks
    a lower bound (the point did not finish). ``x peer``, on the endpoints curves, is CPU per
    op over the ``peer-per-job`` point's at the same ``n`` (when it ran).
    """
    bases = {series: _base(group) for series, group in _by_series(points).items()}
    peers = {p.n: p.cpu_ns for p in points if p.series == "peer-per-job" and p.cpu_ns > 0}
    rows = []
    for p in points:
        base = bases[p.series]
        ratio = p.cpu_ns / base.cpu_ns if base.cpu_ns > 0 else float("nan")
        peer = peers.get(p.n) if p.series in PEERED else None
        rows.append(
            (
                p.label,
                f"{p.n:,}",
                f"{p.ops:,}",
                _ns(p.cpu_ns),
                "-" if math.isnan(ratio) else f"{ratio:.2f}" + ("+" if not p.complete else ""),
                "-" if peer is None or math.isnan(p.cpu_ns) else f"{p.cpu_ns / peer:.2f}",
                _ns(p.wall_ns),
                _ns(p.caller_ns),
                "-" if not p.sink_calls else f"{p.delivered / p.sink_calls:.1f}",
                "-" if p.max_call_ms is None else f"{p.max_call_ms:.2f}",
                "-" if p.max_clear_call_ms is None else f"{p.max_clear_call_ms:.2f}",
                "-" if p.max_gc_ms is None else f"{p.max_gc_ms:.2f}",
                "-" if p.tracked_per_n is None else f"{p.tracked_per_n:.2f}",
                _done(p),
            )
        )
    header: tuple[str, ...] = ("curve", "n", "ops", "CPU ns/op", "x base", "x peer", "wall ns/op", "caller ns/op")
    header += ("ops/batch", "max call ms", "no-GC call ms", "max GC ms", "tracked/n", "finished")
    return _table(header, rows)


def format_handoffs(points: list[CurvePoint]) -> str:
    """The hand-off points as a table with CPU ratios to queue.Queue.put and ThreadPoolExecutor.submit."""
    refs = {(p.series, p.n): p.cpu_ns for p in points}
    rows = []
    for p in points:
        ratios = []
        for ref in ("queue-put", "executor-submit"):
            base = refs.get((ref, p.n))
            ratios.append(f"{p.cpu_ns / base:.2f}" if base else "-")
        rows.append(
            (
                p.label,
                str(p.n),
                _ns(p.cpu_ns),
                *ratios,
                _ns(p.wall_ns),
                "-" if p.ops_per_s is None else f"{p.ops_per_s / 1e6:.2f}M",
                _done(p),
            )
        )
    header = ("hand-off", "prod", "CPU ns/call", "x Queue.put", "x TPE.submit", "wall ns/call", "ops/s", "finished")
    return _table(header, rows)


def sparkbars(points: list[CurvePoint], width: int = 40) -> str:
    """ASCII bars of CPU ns/op per curve point, scaled per series: a flat curve is bars of one length.

    The scale is the largest point with at least ``BASE_OPS`` operations; a larger one is cut
    at full width and ends in ``+``. A point that did not finish ends in ``>`` (a lower bound).
    """
    lines: list[str] = []
    for series, group in _by_series(points).items():
        measured = [p for p in group if not math.isnan(p.cpu_ns)]
        top = max((p.cpu_ns for p in measured if p.ops >= BASE_OPS), default=0.0)
        top = top or max((p.cpu_ns for p in measured), default=0.0) or 1.0
        lines.append(f"{group[0].label} (CPU ns/op, {CURVES.get(series, ('', 'n'))[1]}):")
        for p in group:
            size = 0 if math.isnan(p.cpu_ns) else max(1, round(p.cpu_ns / top * width))
            bar = "#" * min(size, width) + ("+" if size > width else "") + (">" if not p.complete else "")
            figure = "failed" if p.error else _ns(p.cpu_ns)
            lines.append(f"  {p.n:>10,} |{bar.ljust(width + 2)} {figure}")
    return "\n".join(lines)


def plot_curves(ax: Any, points: list[CurvePoint]) -> None:
    """Draw the curves on a matplotlib Axes: CPU ns/op by n, log-log; unfinished points as open triangles."""
    for group in _by_series(points).values():
        xs = [p.n for p in group]
        ys = [p.cpu_ns for p in group]
        (line,) = ax.plot(xs, ys, marker="o", label=group[0].label)
        late = [(p.n, p.cpu_ns) for p in group if not p.complete]
        if late:
            ax.scatter(*zip(*late, strict=True), marker="^", s=90, facecolors="none", edgecolors=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n (endpoints, or jobs/requests queued)")
    ax.set_title("CPU ns per operation as n grows (lower and flat are better; ^ did not finish: a lower bound)")
    ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    """``python -m threaddispatch._bench_curves --curve SERIES|--handoff NAME --n N --ops OPS``: one point, JSON."""
    parser = argparse.ArgumentParser(prog="threaddispatch-bench-point")
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--curve", choices=sorted(CURVES))
    kind.add_argument("--handoff", choices=sorted(HANDOFFS))
    parser.add_argument("--n", type=int, required=True, help="the size (curves) or producers (hand-offs)")
    parser.add_argument("--ops", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    if args.curve:
        result = _curve_result(args.curve, args.n, CURVES[args.curve][2](args.n, args.ops, deadline))
    else:
        result = _handoff_run(args.handoff, args.n, args.ops, deadline)
    print(json.dumps(result), flush=True)
    if not result["complete"]:
        os._exit(0)  # skip the exit drain of a face that is still behind: the deadline has passed
    return 0


if __name__ == "__main__":
    sys.exit(main())
