"""A SIGKILLed worker does not hold a serial lock for ever: its lock hold is reaped like its stale jobs.

A worker process runs a locked job past its timeout (the job fails; its handler, blocked,
runs on and holds the lock), then is killed. Its hold's heartbeat stops; an engine in the
test process reaps it after ``stale_job_threshold`` and runs the lock's next job. On the
stores processes share: SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import SHARED_STORE_PARAMS

from threaddispatch.jobs import JobEngine
from threaddispatch.stores import JobState, Store
from threaddispatch.testing import wait_for

ROOT = Path(__file__).resolve().parents[1]

WORKER_MODULE = textwrap.dedent(
    """
    import os
    import threading
    from pathlib import Path

    from threaddispatch.jobs import JobEngine
    from threaddispatch.stores import open_store

    MARKERS = Path(os.environ["MARKERS"])
    engine = JobEngine(
        open_store(os.environ["STORE"]), concurrency=2, poll_interval=0.02, max_poll_interval=0.05,
        heartbeat_interval=0.05, stale_job_threshold=0.5, shutdown_timeout=1.0,
    )

    @engine.job("serial", lock="customer:42", timeout=0.2, max_retries=0)
    def serial(ctx, payload):
        (MARKERS / f"started-{payload}").touch()
        threading.Event().wait(60)  # blocked, deaf to ctx.cancelled: killed before it returns
    """
)


@pytest.fixture(params=SHARED_STORE_PARAMS)
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.mark.timeout(90)
def test_a_killed_workers_hold_is_reaped_and_the_locks_next_job_runs(
    tmp_path: Path, store: Store, store_url: str
) -> None:
    (tmp_path / "markers").mkdir()
    (tmp_path / "lockmod.py").write_text(WORKER_MODULE)
    engine = JobEngine(store, poll_interval=0.02, max_poll_interval=0.05, heartbeat_interval=0.05,
                       stale_job_threshold=0.5)  # fmt: skip
    # The job's timeout is stored at enqueue: the same definition as the victim's.
    engine.register("serial", lambda ctx, payload: f"ran {payload}", lock="customer:42", max_retries=0, timeout=0.2)
    first = engine.enqueue("serial", "first")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "STORE": store_url,
           "MARKERS": str(tmp_path / "markers")}  # fmt: skip
    victim = subprocess.Popen(
        [sys.executable, "-m", "threaddispatch._cli_worker", "lockmod:engine", "--log-level", "ERROR"],
        cwd=tmp_path,
        env=env,
    )
    try:
        wait_for((tmp_path / "markers" / "started-first").exists, 30, message="the victim's handler")
        wait_for(lambda: engine.get_job(first).state is JobState.FAILED, 30, message="the victim's timeout")
        wait_for(store.list_holds, 10, message="the victim's hold")
        victim.kill()
        victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(10)
    second = engine.enqueue("serial", "second")
    engine.start()
    try:
        assert engine.result(second, timeout=30) == "ran second"
        assert store.list_holds() == []
    finally:
        assert engine.stop(10)
