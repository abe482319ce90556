"""The worker registry as an operator sees it: ``engine.workers()``, admin ``GET /workers``, the CLI's
``workers``, and ``threaddispatch worker --log-format json`` lines a container log collector can parse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_admin import TOKEN, Server
from test_cli import run
from test_workers import WORKER_MODULE

from threaddispatch import JobEngine
from threaddispatch.admin import make_wsgi_app
from threaddispatch.stores import SQLiteStore
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[JobEngine]:
    store = SQLiteStore(tmp_path / "jobs.db")
    engine = JobEngine(store, queues=("mail",), concurrency=3, poll_interval=0.05)
    yield engine
    engine.stop(10)
    store.close()


def test_a_running_engine_is_in_workers_the_admin_api_and_the_cli(engine: JobEngine, tmp_path: Path) -> None:
    assert engine.workers() == []
    engine.start()
    [me] = engine.workers()
    assert (me.pid, me.queues, me.concurrency) == (os.getpid(), ("mail",), 3)
    server = Server(make_wsgi_app(engine, token=TOKEN))
    try:
        reply = server.request("GET", "/api/dispatch/workers")
        assert reply.status == 200
        assert [w["pid"] for w in reply.body["workers"]] == [os.getpid()]
        assert server.request("GET", "/api/dispatch/workers", token=None).status == 401
    finally:
        server.close()
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    listed = run("workers", "--json", store=url)
    assert listed.returncode == 0, listed.stderr
    assert [w["id"] for w in json.loads(listed.stdout)] == [me.id]
    table = run("workers", store=url)
    assert table.returncode == 0, table.stderr
    assert me.id in table.stdout and "mail" in table.stdout and "0/3" in table.stdout
    engine.stop(10)
    assert run("workers", store=url).stdout.strip() == "no workers"
    bad = run("workers", "--stale-after", "-1", store=url)
    assert bad.returncode == 2 and "stale" in bad.stderr.lower() and "Traceback" not in bad.stderr


def test_worker_log_format_json_writes_one_object_a_line_with_the_job_fields(tmp_path: Path) -> None:
    (tmp_path / "workersmod.py").write_text(
        WORKER_MODULE + "\n@engine.job('hello')\ndef hello(ctx, payload):\n    return 1\n"
    )
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = SQLiteStore(tmp_path / "jobs.db")
    producer = JobEngine(store)
    producer.register("hello", lambda ctx, payload: 1)
    job_id = producer.enqueue("hello", {}, queue="a")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "STORE": url, "QUEUE": "a"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "threaddispatch", "worker", "workersmod:engine", "--log-format", "json"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: producer.get_job(job_id).state.value == "completed", 60, message="the job ran")
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        store.close()
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert lines, stderr
    done = [line for line in lines if line.get("job_id") == job_id and line.get("outcome") == "done"]
    assert done, lines
    assert done[0]["job_name"] == "hello" and done[0]["queue"] == "a" and done[0]["level"] == "INFO"
