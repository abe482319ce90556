"""Hostile: ``python -m threaddispatch worker`` stopped by signals while a job runs, as a real subprocess.

The promises attacked (README, "Command line" and JobEngine): SIGTERM and SIGINT stop a worker
cleanly: claimed jobs that have not started go back to pending, running ones get
``shutdown_timeout`` to finish; the exit status is 0 when it stopped cleanly and 1 when some jobs
were handed back. Attacked here: a second SIGTERM (and a SIGINT) arriving while the drain waits
for a running job (it must neither kill the job nor end the process early with a traceback),
and a job that outlives ``shutdown_timeout`` (handed back to pending, exit status 1, and run
again by the next worker, once). The handler waits on a file the test creates, bounded:
state, not timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from threaddispatch.jobs import JobEngine
from threaddispatch.stores import SQLiteStore
from threaddispatch.testing import wait_for

ROOT = Path(__file__).resolve().parents[1]

_APP = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    from threaddispatch.jobs import JobEngine
    from threaddispatch.stores import SQLiteStore

    HERE = Path(__file__).parent
    engine = JobEngine(SQLiteStore(str(HERE / "jobs.db")), concurrency=2, poll_interval=0.02,
                       max_poll_interval=0.05, shutdown_timeout=float(os.environ["SHUTDOWN"]))

    @engine.job("slow", timeout=None, max_retries=0)
    def slow(ctx, payload):
        (HERE / f"start-{payload}-{os.getpid()}-{time.monotonic_ns()}").touch()
        for _ in range(1200):  # at most 60 s
            if (HERE / "go").exists():
                return payload
            time.sleep(0.05)
        raise RuntimeError("never told to go")
    """
)


def _setup(tmp_path: Path) -> JobEngine:
    (tmp_path / "s26japp.py").write_text(_APP)
    engine = JobEngine(SQLiteStore(str(tmp_path / "jobs.db")))
    engine.register("slow", lambda ctx, payload: None, timeout=None)
    return engine


def _worker(tmp_path: Path, shutdown: float) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "SHUTDOWN": str(shutdown)}
    return subprocess.Popen(
        [sys.executable, "-m", "threaddispatch", "worker", "s26japp:engine", "--log-level", "INFO"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _starts(tmp_path: Path) -> list[str]:
    return sorted(path.name for path in tmp_path.glob("start-*"))


@pytest.mark.timeout(180)
def test_second_sigterm_and_a_sigint_during_the_drain_let_the_running_job_finish(tmp_path: Path) -> None:
    """SIGTERM, SIGTERM, SIGINT while a job runs: the job completes once, the worker exits 0, no traceback."""
    engine = _setup(tmp_path)
    process = _worker(tmp_path, shutdown=120)
    try:
        job_id = engine.enqueue("slow", 1)
        wait_for(lambda: len(_starts(tmp_path)) == 1 or process.poll() is not None, 60, message="the job started")
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGINT)
        assert process.poll() is None or process.returncode == 0
        (tmp_path / "go").touch()
        _out, err = process.communicate(timeout=90)
        assert process.returncode == 0, err
        assert "Traceback" not in err, err
        assert engine.get_job(job_id).state.value == "completed"
        assert len(_starts(tmp_path)) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
        engine.store.close()


@pytest.mark.timeout(180)
def test_a_job_past_shutdown_timeout_is_handed_back_exit_1_and_runs_again_once(tmp_path: Path) -> None:
    """A job still running at the end of shutdown_timeout: exit status 1, the job pending, the next worker runs it."""
    engine = _setup(tmp_path)
    first = _worker(tmp_path, shutdown=0.5)
    second: subprocess.Popen[str] | None = None
    try:
        job_id = engine.enqueue("slow", 2)
        wait_for(lambda: len(_starts(tmp_path)) == 1, 60, message="the job started")
        first.send_signal(signal.SIGTERM)
        _out, err = first.communicate(timeout=90)
        assert first.returncode == 1, err
        assert "Traceback" not in err, err
        job = engine.get_job(job_id)
        assert job.state.value == "pending", job
        (tmp_path / "go").touch()
        second = _worker(tmp_path, shutdown=30)
        wait_for(lambda: engine.get_job(job_id).state.value == "completed", 60, message="the job completed")
        assert engine.get_job(job_id).decoded_result() == 2
        assert len(_starts(tmp_path)) in (1, 2)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.communicate(timeout=30)
        engine.store.close()
