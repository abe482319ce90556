"""JobEngine across processes: a SIGKILLed worker loses nothing; SIGTERM stops a worker cleanly.

On the stores processes share: SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SHARED_STORE_PARAMS

from threaddispatch.jobs import JobEngine
from threaddispatch.stores import Store
from threaddispatch.testing import wait_for

ROOT = Path(__file__).resolve().parents[1]

WORKER_MODULE = textwrap.dedent(
    """
    import os
    from pathlib import Path

    from threaddispatch.jobs import JobEngine
    from threaddispatch.stores import open_store

    MARKERS = Path(os.environ["MARKERS"])
    engine = JobEngine(
        open_store(os.environ["STORE"]), concurrency=2, poll_interval=0.02, max_poll_interval=0.05,
        heartbeat_interval=0.05, stale_job_threshold=0.3, shutdown_timeout=10.0,
    )

    @engine.job("work", timeout=None)
    def work(ctx, payload):
        (MARKERS / f"started-{payload}-{os.getpid()}").touch()
        if os.environ.get("ROLE") == "hang":
            ctx.wait(60)
        else:
            ctx.wait(payload.get("seconds", 0) if isinstance(payload, dict) else 0)
        return os.getpid()
    """
)


@pytest.fixture(params=SHARED_STORE_PARAMS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The stores worker processes share (not memory)."""
    kind: str = request.param
    return kind


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A directory with the worker module and a markers folder."""
    (tmp_path / "markers").mkdir()
    (tmp_path / "jobsmod.py").write_text(WORKER_MODULE)
    yield tmp_path


def spawn(workdir: Path, store_url: str, role: str) -> subprocess.Popen[bytes]:
    """Start `threaddispatch worker jobsmod:engine` in a subprocess."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{workdir}",
        "STORE": store_url,
        "MARKERS": str(workdir / "markers"),
        "ROLE": role,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "threaddispatch._cli_worker", "jobsmod:engine", "--log-level", "WARNING"],
        cwd=workdir,
        env=env,
    )


def producer(store: Store) -> JobEngine:
    """An engine in the test process used only to enqueue and read results."""
    engine = JobEngine(store, poll_interval=0.02)
    engine.register("work", lambda ctx, payload: None, timeout=None)
    return engine


@pytest.mark.timeout(60)
def test_killed_worker_job_is_completed_by_another_process(workdir: Path, store: Store, store_url: str) -> None:
    """SIGKILL mid-job: the job's heartbeat goes stale and a second worker process completes it."""
    engine = producer(store)
    job_id = engine.enqueue("work", "k")
    victim = spawn(workdir, store_url, "hang")
    try:
        wait_for(lambda: list((workdir / "markers").glob("started-k-*")), 20, message="victim started the job")
        victim.kill()
        victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert engine.get_job(job_id).state == "running"
    rescuer = spawn(workdir, store_url, "ok")
    try:
        result = engine.result(job_id, timeout=30)
        assert result == rescuer.pid != victim.pid
        job = engine.get_job(job_id)
        assert job.state == "completed" and job.attempts == 2
        rescuer.send_signal(signal.SIGTERM)
        assert rescuer.wait(20) == 0
    finally:
        if rescuer.poll() is None:
            rescuer.kill()


@pytest.mark.timeout(60)
def test_sigterm_stops_worker_after_running_job_finishes(workdir: Path, store: Store, store_url: str) -> None:
    """SIGTERM during a job: run() stops, the running job completes first, the process exits 0."""
    engine = producer(store)
    job_id = engine.enqueue("work", {"seconds": 0.5})
    worker = spawn(workdir, store_url, "ok")
    try:
        wait_for(lambda: list((workdir / "markers").glob("started-*")), 20, message="worker started the job")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert engine.get_job(job_id).state == "completed"
    assert engine.result(job_id, timeout=1) == worker.pid


def test_worker_cli_rejects_a_bad_target(workdir: Path) -> None:
    """A target that is not module:engine exits with status 2 and a message naming it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "threaddispatch._cli_worker", "nosuchmodule:engine"],
        check=False, cwd=workdir, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and "nosuchmodule" in done.stderr
