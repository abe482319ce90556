"""Hostile tests of JobEngine.stop() racing producers: every job enqueued runs exactly once.

Four producers enqueue while the engine runs; ``stop()`` begins once a third of the jobs
is in, and the producers go on (enqueueing works after stop: the store is the queue).
A second engine on the same store then runs what is left. The promises attacked: stop
hands claimed jobs that had not started back to pending, lets the running ones finish,
and loses none; an id ``enqueue`` returned is a job that runs, and runs once (no reaping
happens here: the stale threshold is far away). On every store kind.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from threaddispatch import JobEngine
from threaddispatch.jobs import JobContext
from threaddispatch.stores import Store
from threaddispatch.testing import wait_for

PRODUCERS = 4
PER_PRODUCER = 150


class _Runs:
    """How often each job id ran (a Counter, to see a second run)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards counts
        self.counts: Counter[str] = Counter()

    def handler(self, ctx: JobContext, _payload: object) -> None:
        with self.lock:
            self.counts[ctx.id] += 1

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.counts)


def _engine(store: Store, runs: _Runs) -> JobEngine:
    engine = JobEngine(store, concurrency=4, poll_interval=0.01, max_poll_interval=0.02)
    engine.register("job", runs.handler, max_retries=0)
    return engine


@pytest.mark.timeout(120)
def test_stop_racing_four_producers_loses_no_job_and_runs_each_once(store: Store) -> None:
    runs = _Runs()
    first = _engine(store, runs)
    ids: list[str] = []
    ids_lock = threading.Lock()  # guards ids
    errors: list[BaseException] = []
    go = threading.Barrier(PRODUCERS + 1)

    def produce(index: int) -> None:
        go.wait(10)
        try:
            for number in range(PER_PRODUCER):
                job_id = first.enqueue("job", [index, number])
                with ids_lock:
                    ids.append(job_id)
        except BaseException as error:
            errors.append(error)

    producers = [threading.Thread(target=produce, args=(index,)) for index in range(PRODUCERS)]
    first.start()
    try:
        for thread in producers:
            thread.start()
        go.wait(10)

        def enqueued() -> int:
            with ids_lock:
                return len(ids)

        wait_for(lambda: enqueued() >= PRODUCERS * PER_PRODUCER // 3, timeout=60)
        assert first.stop(30)  # no-op jobs: every started job finishes in time
    finally:
        for thread in producers:
            thread.join(60)
        first.stop(30)
    assert errors == []
    assert len(ids) == len(set(ids)) == PRODUCERS * PER_PRODUCER

    second = _engine(store, runs)
    second.start()
    try:
        wait_for(lambda: second.counts()["completed"] == len(ids), timeout=60, message="every job completed")
    finally:
        assert second.stop(30)
    counts = runs.snapshot()
    assert sorted(counts) == sorted(ids)  # every job ran; nothing else did
    assert [job_id for job_id, times in counts.items() if times != 1] == []
    assert {state: n for state, n in second.counts().items() if n} == {"completed": len(ids)}
