"""Hostile test of PostgresStore's dependency release (migration 11's row trigger and the enqueue's
second look): dependencies complete while their dependents are being enqueued, across processes.

Three worker processes run the jobs as soon as they are stored; two producer processes enqueue
each dependency and, at once, its dependent, so a completion and the dependent's enqueue overlap.
The workers' upkeep sweep (``release_waiting``) is switched off: only the completion's trigger
and the enqueue's second look release a dependent, so a release both miss leaves it waiting for
good. Every job must run exactly once, each dependent after its dependency. One dependency each:
a dependent of two, one completing during its enqueue and the other still running at the second
look, is left to the upkeep's sweep (issue 14), which this test switches off.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import PG_SCHEMA
from hostile_procs import ROOT, end_all, spawn

from threaddispatch.stores import JobState
from threaddispatch.testing import wait_for

try:
    from threaddispatch.stores.postgres import PostgresStore
except ImportError:  # the 'postgres' extra is not installed
    PostgresStore = None  # type: ignore[assignment,misc]

pytestmark = [pytest.mark.postgres]

_WORKER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    from threaddispatch.jobs import JobEngine
    from threaddispatch.stores.postgres import PostgresStore

    store = PostgresStore({dsn!r}, schema={schema!r})
    store.release_waiting = lambda *, now: 0  # no upkeep sweep: a missed release stays missed
    # One file for every worker, appended to (atomic, in the kernel's order): the order the jobs ran in.
    runs = os.open(os.path.join({outdir!r}, "runs"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    engine = JobEngine(store, concurrency=4, poll_interval=0.01, max_poll_interval=0.05, heartbeat_interval=0.2,
                       stale_job_threshold=30.0, shutdown_timeout=10.0)

    @engine.job("record", max_retries=0)
    def record(ctx, payload):
        os.write(runs, f"{{payload['n']}}\\n".encode())

    engine.start()
    print("started", flush=True)
    sys.stdin.readline()
    engine.stop(20)
    """
)

_PRODUCER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from threaddispatch.jobs import JobEngine
    from threaddispatch.stores.postgres import PostgresStore

    engine = JobEngine(PostgresStore({dsn!r}, schema={schema!r}))
    engine.register("record", lambda ctx, payload: None, max_retries=0)
    base = {base}
    for i in range({count}):
        dependency = engine.enqueue("record", {{"n": base + 2 * i}})
        engine.enqueue("record", {{"n": base + 2 * i + 1}}, depends_on=[dependency])
    print("done", flush=True)
    """
)


@pytest.mark.timeout(180)
def test_dependents_enqueued_while_their_dependencies_complete_are_each_released_and_run_once(
    pg_server: Any, pg_url: str, tmp_path: Path
) -> None:
    dsn, count = pg_server.dsn, 150
    store = PostgresStore(dsn, schema=PG_SCHEMA)  # migrated before the processes start
    script = _WORKER.format(root=str(ROOT), dsn=dsn, schema=PG_SCHEMA, outdir=str(tmp_path))
    workers = [spawn(script) for _ in range(3)]
    producers: list[subprocess.Popen[str]] = []
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "started"
        producers = [
            spawn(_PRODUCER.format(root=str(ROOT), dsn=dsn, schema=PG_SCHEMA, base=base, count=count))
            for base in (0, 100_000)
        ]
        for producer in producers:
            out, _ = producer.communicate(timeout=120)
            assert producer.returncode == 0 and out.strip() == "done"
        total = 2 * 2 * count

        def finished() -> bool:
            return store.counts()[JobState.COMPLETED] == total

        try:
            wait_for(finished, 60, message=f"{total} jobs completed")
        except TimeoutError as error:
            left = [
                (job.payload, job.state.value) for job in store.list_jobs(limit=total) if job.state.value != "completed"
            ]
            raise AssertionError(f"{len(left)} jobs never finished: {left[:10]}") from error
        jobs = store.list_jobs(limit=total)
    finally:
        end_all(workers + producers)
        store.close()
    runs = [int(line) for line in (tmp_path / "runs").read_text().split()]
    assert sorted(runs) == sorted(b + i for b in (0, 100_000) for i in range(2 * count)), "not each once"
    position = {n: index for index, n in enumerate(runs)}
    by_id = {job.id: job for job in jobs}
    for job in jobs:
        for dependency in job.depends_on:
            # The dependency's line was written before its completion committed, the dependent's after its claim.
            ran, before = job.decoded_payload()["n"], by_id[dependency].decoded_payload()["n"]
            assert position[before] < position[ran], f"{ran} ran before its dependency {before}"
