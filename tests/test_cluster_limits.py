"""Per-queue rate_limit and max_concurrency for the whole cluster: kept in the store, spent in the claim.

The engine gives the store its queues' limits at start (Store.set_queue_limits); every claim of a
limited queue then refills and spends the queue's token bucket, and counts its running jobs, in
the claim's own transaction, so processes sharing a store share the limits.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from threaddispatch import JobContext, JobEngine, QueueConfig
from threaddispatch.errors import ConfigurationError
from threaddispatch.stores import Store
from threaddispatch.stores.base import Completion, JobRecord, JobState, QueueLimits
from threaddispatch.testing import wait_for

FAST: dict[str, Any] = {"poll_interval": 0.005, "max_poll_interval": 0.02, "shutdown_timeout": 10.0}


def _enqueue(store: Store, count: int, queue: str = "limited") -> list[str]:
    engine = JobEngine(store)
    engine.register("work", lambda ctx, payload: None)
    return engine.enqueue_many("work", list(range(count)), queue=queue)


def _all_completed(store: Store, ids: Sequence[str]) -> bool:
    return all(job.state is JobState.COMPLETED for job_id in ids if (job := store.get(job_id)) is not None)


def _steady_rate(starts: list[float], burst: int) -> float:
    """Jobs started per second once the first ``burst`` (the bucket's saved tokens) are spent."""
    starts = sorted(starts)[burst:]
    return (len(starts) - 1) / (starts[-1] - starts[0])


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that hold one instant (an end at the instant another starts is not an overlap)."""
    events = sorted([(end, -1) for _, end in intervals] + [(start, 1) for start, _ in intervals])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


# -- the store's claim ---------------------------------------------------------------------------------


def test_a_claim_holds_the_concurrency_limit(store: Store) -> None:
    store.set_queue_limits([QueueLimits("q", max_concurrency=2)], now=100.0)
    store.enqueue([JobRecord(id=f"j{i}", name="w", payload="1", queue="q", run_at=float(i)) for i in range(5)])
    store.enqueue([JobRecord(id="free", name="w", payload="1", queue="other", run_at=0.0)])
    first = store.claim(["q"], 5, worker_id="w1", now=100.0)
    assert [job.id for job in first] == ["j0", "j1"]
    assert store.claim(["q"], 5, worker_id="w2", now=100.0) == []
    # A claim over several queues: the limited one within its limit, the others as usual.
    assert [job.id for job in store.claim(["q", "other"], 5, worker_id="w2", now=100.0)] == ["free"]
    done, more = store.complete_and_claim([Completion("j0", "w1", 1, None, None)], ["q"], 5, worker_id="w1", now=101.0)
    assert done == {"j0"} and [job.id for job in more] == ["j2"]
    assert store.counts()[JobState.RUNNING] == 3


def test_a_claim_spends_the_rate_limit_bucket(store: Store) -> None:
    store.set_queue_limits([QueueLimits("q", rate_limit=2.0, rate_burst=3)], now=100.0)
    store.enqueue([JobRecord(id=f"j{i:02}", name="w", payload="1", queue="q", run_at=float(i)) for i in range(10)])
    assert len(store.claim(["q"], 10, worker_id="w", now=100.0)) == 3  # the full bucket
    assert store.claim(["q"], 10, worker_id="w", now=100.4) == []  # 0.8 tokens
    assert len(store.claim(["q"], 10, worker_id="w", now=100.5)) == 1
    assert len(store.claim(["q"], 10, worker_id="w", now=102.0)) == 3  # 3 s refill, capped at the burst
    # A new registration keeps the bucket's tokens, up to the new burst.
    store.set_queue_limits([QueueLimits("q", rate_limit=2.0, rate_burst=1)], now=102.0)
    assert store.claim(["q"], 10, worker_id="w", now=102.0) == []
    assert len(store.claim(["q"], 10, worker_id="w", now=110.0)) == 1


def test_bad_limits_name_the_value() -> None:
    for options, shown in (
        ({"rate_limit": 0}, "0"),
        ({"rate_limit": math.nan}, "nan"),
        ({"rate_limit": 5, "rate_burst": 0}, "0"),
        ({"max_concurrency": 0}, "0"),
        ({"max_concurrency": 2.5}, "2.5"),
    ):
        with pytest.raises(ConfigurationError, match=shown):
            QueueConfig("limited", **options)


# -- several engines on one store (the memory store: one process) ---------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("store_kind", ["memory"])
def test_engines_sharing_a_memory_store_share_its_limits(store: Store) -> None:
    """Three engines, each allowed 2 at once and 20/s by itself, hold those limits together."""
    intervals: list[tuple[float, float]] = []
    guard = threading.Lock()

    def work(ctx: JobContext, payload: int) -> None:
        start = time.time()
        ctx.wait(0.01)  # a little work, so that overlapping runs would show
        with guard:
            intervals.append((start, time.time()))

    limits = [QueueConfig("limited", max_concurrency=2, rate_limit=20.0, rate_burst=2)]
    engines = [JobEngine(store, queues=["limited"], queue_configs=limits, concurrency=3, **FAST) for _ in range(3)]
    for engine in engines:
        engine.register("work", work)
    ids = _enqueue(store, 80)
    for engine in engines:
        engine.start()
    try:
        wait_for(lambda: _all_completed(store, ids), timeout=100, interval=0.05, message="every job completed")
    finally:
        for engine in engines:
            engine.stop(10)
    assert _max_overlap(intervals) <= 2
    starts = [job.started_at for job_id in ids if (job := store.get(job_id)) is not None and job.started_at]
    assert len(starts) == 80
    # The limit's promise: never faster than 20/s together (10% for the clock). How close to it they
    # come is throughput, a benchmark's business: a busy machine runs them slower.
    assert _steady_rate(starts, 2) <= 22.0


# -- three processes on one SQLite file / one PostgreSQL database -------------------------------------

_WORKER = """
import os, sys, time
from threaddispatch.jobs import JobEngine, QueueConfig
from threaddispatch.stores import open_store

url, out, stop, work_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
limits = [QueueConfig("limited", max_concurrency=int(sys.argv[5]) or None,
                      rate_limit=float(sys.argv[6]) or None, rate_burst=int(sys.argv[7]))]
engine = JobEngine(open_store(url), queues=["limited"], queue_configs=limits, concurrency=3,
                   poll_interval=0.005, max_poll_interval=0.02)

def work(ctx, payload):
    start = time.time()
    time.sleep(work_s)  # a little work, so that overlapping runs would show
    with open(out, "a") as f:
        f.write(f"{start!r} {time.time()!r}\\n")

engine.register("work", work)
engine.start()
while not os.path.exists(stop):
    time.sleep(0.01)
engine.stop(10)
"""

_KINDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def _run_workers(
    store: Store, store_url: str, tmp_path: Path, ids: Sequence[str], *, work: float, limits: tuple[int, float, int]
) -> list[tuple[float, float]]:
    """Three worker processes run ``ids``; the (start, end) of every handler run."""
    script = tmp_path / "limited_worker.py"
    script.write_text(_WORKER, encoding="utf-8")
    stop = tmp_path / "stop"
    outs = [tmp_path / f"runs-{n}.txt" for n in range(3)]
    args = [str(work), *(str(limit) for limit in limits)]
    workers = [subprocess.Popen([sys.executable, str(script), store_url, str(out), str(stop), *args]) for out in outs]
    try:
        wait_for(lambda: _all_completed(store, ids), timeout=150, interval=0.05, message="every job completed")
    finally:
        stop.touch()
        for worker in workers:
            assert worker.wait(60) == 0
    intervals = []
    for out in outs:
        for line in out.read_text(encoding="utf-8").splitlines() if out.exists() else ():
            start, end = line.split()
            intervals.append((float(start), float(end)))
    return intervals


@pytest.mark.timeout(240)
@pytest.mark.parametrize("store_kind", _KINDS)
def test_a_concurrency_limit_holds_across_processes(store: Store, store_url: str, tmp_path: Path) -> None:
    """Three processes of three threads, the queue allowed 2 at once: never more than 2 runs overlap."""
    ids = _enqueue(store, 60)
    intervals = _run_workers(store, store_url, tmp_path, ids, work=0.02, limits=(2, 0, 1))
    assert len(intervals) == 60
    assert _max_overlap(intervals) <= 2


@pytest.mark.timeout(240)
@pytest.mark.parametrize("store_kind", _KINDS)
def test_a_rate_limit_holds_across_processes(store: Store, store_url: str, tmp_path: Path) -> None:
    """Three processes each allowed 25/s start at most 25/s together (10% for the clock), not 75/s."""
    ids = _enqueue(store, 200)
    _run_workers(store, store_url, tmp_path, ids, work=0.0, limits=(0, 25.0, 3))
    starts = [job.started_at for job_id in ids if (job := store.get(job_id)) is not None and job.started_at]
    assert len(starts) == 200
    assert _steady_rate(starts, 3) <= 27.5  # never faster than the limit (25/s); slower is the machine


def test_overlap_counting() -> None:
    assert _max_overlap([(0, 1), (1, 2)]) == 1
    assert _max_overlap([(0, 2), (1, 3), (1.5, 1.6)]) == 3
