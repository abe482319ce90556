"""Hostile: a job that SIGKILLs its own worker process, on SQLite (a real file) and PostgreSQL.

The promise attacked (README, "Nothing lost when a process dies"): a running job whose heartbeat
is older than ``stale_job_threshold`` goes back to pending (at-least-once), and "a job that keeps
killing its worker ends in the dead-letter queue when its attempts run out". Each worker here is
a real interpreter that the job's handler kills with SIGKILL (no ``finally``, no exit drain);
the next worker reaps the job and runs it again, until its ``max_retries + 1`` attempts are used;
the worker after that reaps it into ``failed`` with one dead letter. A second job in the same
queue, which does not kill, completes exactly once beside it. State, not timing: the test waits
for each worker to die, and for the job's state, with bounded waits.
"""

from __future__ import annotations

import signal
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hostile_procs import ROOT, end_all, spawn

from threaddispatch.jobs import JobEngine
from threaddispatch.stores import SQLiteStore, Store
from threaddispatch.stores.base import WORKER_LOST_ERROR
from threaddispatch.testing import wait_for

_WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from threaddispatch.jobs import JobEngine
    from threaddispatch.stores import open_store

    MARKERS = Path({markers!r})
    engine = JobEngine(
        open_store({url!r}), concurrency=2, poll_interval=0.02, max_poll_interval=0.05,
        heartbeat_interval=0.1, stale_job_threshold=1.0, shutdown_timeout=10.0,
    )

    def killer(ctx, payload):
        (MARKERS / f"kill-{{os.getpid()}}-{{ctx.attempt}}").touch()
        os.kill(os.getpid(), signal.SIGKILL)

    def calm(ctx, payload):
        (MARKERS / f"calm-{{os.getpid()}}-{{time.monotonic_ns()}}").touch()
        return payload

    engine.register("killer", killer, timeout=None)
    engine.register("calm", calm, timeout=None)
    engine.start()
    print("started", flush=True)
    sys.stdin.readline()
    engine.stop(20)
    """
)


def _run_until_final(url: str, markers: Path, open_store: Callable[[], Store]) -> None:
    store = open_store()
    engine = JobEngine(store)
    engine.register("killer", lambda ctx, payload: None, timeout=None)
    engine.register("calm", lambda ctx, payload: None, timeout=None)
    processes = []
    try:
        killer = engine.enqueue("killer", {"k": 1}, max_retries=1)
        calm = engine.enqueue("calm", 7)
        deaths = 0
        for _ in range(4):  # two kills, then one worker that reaps the job into the dead-letter queue
            worker = spawn(_WORKER.format(root=str(ROOT), markers=str(markers), url=url))
            processes.append(worker)
            # No wait for "started": the job may kill the worker before it prints it.
            wait_for(
                lambda: worker.poll() is not None or engine.get_job(killer).state.value == "failed",
                60,
                message="the worker killed by its job, or the job failed for good",
            )
            if worker.poll() is None:
                break
            assert worker.returncode == -signal.SIGKILL
            deaths += 1
        job = engine.get_job(killer)
        assert deaths == 2, f"{deaths} workers killed (max_retries=1: two attempts)"
        assert job.state.value == "failed"
        assert job.attempts == 2
        assert job.error == WORKER_LOST_ERROR
        letters = [letter for letter in engine.dlq() if letter.job_id == killer]
        assert len(letters) == 1
        assert letters[0].error == WORKER_LOST_ERROR
        wait_for(lambda: engine.get_job(calm).state.value == "completed", 60, message="the calm job completed")
        assert len(list(markers.glob("kill-*"))) == 2
        # At least once: each killed worker may have run it before its completion was stored, and
        # the survivor runs it again; at most once per worker process.
        assert 1 <= len(list(markers.glob("calm-*"))) <= deaths + 1
        assert engine.counts()["running"] == 0
    finally:
        end_all(processes)
        store.close()


@pytest.mark.timeout(240)
def test_sqlite_job_that_kills_its_worker_ends_in_the_dead_letter_queue(tmp_path: Path) -> None:
    """SQLite file: two SIGKILLed workers, then a third reaps the job into failed with one dead letter."""
    path = tmp_path / "jobs.db"
    SQLiteStore(path).close()
    markers = tmp_path / "markers"
    markers.mkdir()
    _run_until_final(f"sqlite:///{path}", markers, lambda: SQLiteStore(path))


@pytest.mark.timeout(240)
def test_postgres_job_that_kills_its_worker_ends_in_the_dead_letter_queue(pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL: two SIGKILLed workers, then a third reaps the job into failed with one dead letter."""
    from threaddispatch.stores.postgres import PostgresStore

    markers = tmp_path / "markers"
    markers.mkdir()
    PostgresStore(pg_url).close()

    def make() -> Any:
        return PostgresStore(pg_url)

    _run_until_final(pg_url, markers, make)
