"""Hostile tests of SQLiteStore across processes: the writer lock on ``<db>-writer.lock`` and the
fetcher's statement-by-statement claims and completions.

Three worker processes (one of them running two engines on two SQLiteStore objects of the same
file) and producers in two more processes share one file; one worker is SIGKILLed mid-run.
No job may be claimed twice (a job only survivors ran has one start, and one attempt unless the
killed worker had claimed it and died before starting it), every
job completes (the killed worker's leased jobs come back after their lease), and the writer
lock the killed process may have held does not block anyone.
"""

from __future__ import annotations

import subprocess
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from hostile_procs import ROOT, end_all, spawn

from threaddispatch.jobs import JobEngine
from threaddispatch.stores import SQLiteStore
from threaddispatch.testing import wait_for

_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from threaddispatch.jobs import JobEngine
    from threaddispatch.stores import SQLiteStore

    MARKERS = Path({markers!r})
    engines = []
    for _ in range({engines}):  # each engine on its own store object of the one file
        engine = JobEngine(
            SQLiteStore({path!r}, busy_timeout=30), concurrency=4, poll_interval=0.02, max_poll_interval=0.05,
            heartbeat_interval=0.1, stale_job_threshold=3.0, shutdown_timeout=10.0,
        )

        def work(ctx, payload):
            (MARKERS / f"run-{{payload}}-{{os.getpid()}}-{{time.monotonic_ns()}}").touch()
            ctx.wait(0.02)
            return os.getpid()

        engine.register("work", work, timeout=None)
        engines.append(engine)
    for engine in engines:
        engine.start()
    print("started", flush=True)
    sys.stdin.readline()
    for engine in engines:
        engine.stop(20)
    """
)

_PRODUCER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from threaddispatch.jobs import JobEngine
    from threaddispatch.stores import SQLiteStore

    engine = JobEngine(SQLiteStore({path!r}, busy_timeout=30))
    engine.register("work", lambda ctx, payload: None, timeout=None)
    ids = []
    for i in range({count}):
        if i % 3 == 2:
            ids += engine.enqueue_many("work", [f"{tag}-{{i}}-a", f"{tag}-{{i}}-b"])
        else:
            ids.append(engine.enqueue("work", f"{tag}-{{i}}"))
    print("\\n".join(ids), flush=True)
    """
)


def _starts(markers: Path) -> list[tuple[str, int]]:
    """(payload, pid) of every start of a job, from the marker files."""
    starts = []
    for marker in markers.iterdir():
        payload, pid, _ns = marker.name.removeprefix("run-").rsplit("-", 2)
        starts.append((payload, int(pid)))
    return starts


@pytest.mark.timeout(180)
def test_three_workers_two_producers_and_a_sigkill_run_every_job_once_but_the_killed_ones(tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.db")
    markers = tmp_path / "markers"
    markers.mkdir()
    SQLiteStore(path).close()  # migrated once, before the processes race for it
    workers = [
        spawn(_WORKER.format(root=str(ROOT), markers=str(markers), path=path, engines=engines)) for engines in (1, 2, 1)
    ]
    producers: list[subprocess.Popen[str]] = []
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "started"
        producers = [spawn(_PRODUCER.format(root=str(ROOT), path=path, count=240, tag=tag)) for tag in "pq"]
        victim = workers[0]
        wait_for(
            lambda: sum(pid == victim.pid for _p, pid in _starts(markers)) >= 15,
            60,
            message="the victim running jobs",
        )
        victim.kill()  # mid-run: it holds leased jobs, maybe the writer lock
        victim.wait(30)
        ids: list[str] = []
        for producer in producers:
            out, _ = producer.communicate(timeout=120)
            assert producer.returncode == 0
            ids += out.split()
        assert len(ids) == 2 * (240 + 80)
        store = SQLiteStore(path, busy_timeout=30)
        engine = JobEngine(store)
        engine.register("other", lambda ctx, payload: None, timeout=None)  # never run: no worker knows it
        try:
            # The writer lock the victim may have held is free (else StoreUnavailableError past busy_timeout).
            engine.enqueue("other")
            wait_for(lambda: engine.counts()["completed"] == len(ids), 120, message=f"{len(ids)} jobs completed")
            jobs = {job_id: engine.get_job(job_id) for job_id in ids}
        finally:
            store.close()
    finally:
        end_all(workers + producers)
    assert all(job.state.value == "completed" for job in jobs.values())
    starts = _starts(markers)
    by_payload: Counter[str] = Counter(payload for payload, _pid in starts)
    victim_ran = {payload for payload, pid in starts if pid == victim.pid}
    survivors = Counter(payload for payload, pid in starts if pid != victim.pid)
    payloads = {job.payload.strip('"'): job for job in jobs.values()}
    assert len(payloads) == len(ids)
    twice = [p for p, n in survivors.items() if n > 1]
    assert not twice, f"run twice by the surviving workers: {twice[:10]}"
    for payload in payloads:
        assert by_payload[payload] >= 1, f"{payload} completed but never started"
    # A job only survivors started has one attempt, unless the victim had claimed it and died before
    # starting it (its attempt is counted at the claim): at most its 4 slots' worth, one extra attempt each.
    claimed_by_the_victim = {
        p: job.attempts for p, job in payloads.items() if p not in victim_ran and job.attempts != 1
    }
    assert len(claimed_by_the_victim) <= 4, claimed_by_the_victim
    assert all(attempts == 2 for attempts in claimed_by_the_victim.values()), claimed_by_the_victim
    # Every job the victim had started and not completed came back after its lease and ran elsewhere.
    assert victim_ran
