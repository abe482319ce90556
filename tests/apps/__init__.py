"""Fixture apps for the framework tests (a Flask app, a Django project) and what those tests share."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import closing
from http.client import HTTPConnection, HTTPMessage
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from threaddispatch.jobs import JobEngine
from threaddispatch.stores import open_store
from threaddispatch.stores.base import JobState
from threaddispatch.testing import wait_for


def run_one_job_in_a_worker_thread(engine: JobEngine, command: Callable[[], Any]) -> Any:
    """Run ``command`` (a worker command running ``engine``) in a thread until one ``mark`` job completed.

    Then stop the engine (the command returns) and return what the command returned;
    re-raises what it raised.
    """
    ran = threading.Event()
    engine.register("mark", lambda ctx, payload: ran.set())
    outcome: list[Any] = []
    failures: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(command())
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=target, name="threaddispatch-test-worker-command")
    thread.start()
    try:
        job_id = engine.enqueue("mark", None)
        assert ran.wait(10)
        wait_for(lambda: engine.get_job(job_id).state is JobState.COMPLETED, message="job completed")
        assert engine.stats()["concurrency"] == 2
    finally:
        wait_for(lambda: engine.running or not thread.is_alive(), message="worker started")
        engine.stop(5)
        thread.join(10)
    assert not thread.is_alive()
    if failures:
        raise failures[0]
    return outcome[0]


# -- real servers and worker processes ----------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]  # the repository: where ``tests.apps`` imports from
_LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")


class Processes:
    """The processes a test started, each logging to a file; :meth:`stop_all` ends every one (SIGTERM, then SIGKILL)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, argv: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` with its stdout and stderr in ``<directory>/<name>.log``."""
        log = self.directory / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
        self.started.append((process, log))
        return process

    def log(self, process: subprocess.Popen[bytes]) -> str:
        """What ``process`` wrote so far."""
        path = next(log for started, log in self.started if started is process)
        return path.read_text(errors="replace")

    def gunicorn(
        self, name: str, target: str, *, cwd: Path, env: dict[str, str]
    ) -> tuple[subprocess.Popen[bytes], int]:
        """gunicorn ``--preload -w 2`` serving ``target`` on 127.0.0.1 (a free port); returns it and its port.

        Returns once both workers booted and the port is known (deadline 60 s).
        """
        argv = [sys.executable, "-m", "gunicorn", "--preload", "-w", "2", "-b", "127.0.0.1:0",
                "--graceful-timeout", "10", target]  # fmt: skip
        process = self.start(name, argv, cwd=cwd, env=env)

        def ready() -> int | None:
            if process.poll() is not None:
                raise AssertionError(f"gunicorn exited with {process.returncode}:\n{self.log(process)}")
            text = self.log(process)
            found = _LISTENING.search(text)
            return int(found.group(1)) if found and text.count("Booting worker") >= 2 else None

        port = wait_for(ready, timeout=60, interval=0.05, message="gunicorn listening with 2 workers")
        assert port is not None  # wait_for returns only a truthy value
        return process, port

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 20) -> int:
        """SIGTERM ``process`` and wait for it (SIGKILL past ``timeout``); returns its exit code."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout)

    def stop_all(self) -> None:
        for process, _log in reversed(self.started):
            self.stop(process)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_all()


def http(port: int, method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes | None = None,
         ) -> tuple[int, HTTPMessage, bytes]:  # fmt: skip
    """One request on a new connection to 127.0.0.1:``port``: (status, headers, body)."""
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.msg, reply.read()
    finally:
        conn.close()


def cookies(headers: HTTPMessage) -> dict[str, str]:
    """The cookies a response sets: ``{name: value}``."""
    jar: SimpleCookie = SimpleCookie()
    for header in headers.get_all("Set-Cookie") or []:
        jar.load(header)
    return {name: morsel.value for name, morsel in jar.items()}


def count_runs(path: Path) -> dict[int, int]:
    """``{n: times the handler ran for n}`` from the handler's own table (see :func:`record_run`)."""
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        return dict(conn.execute("SELECT n, COUNT(*) FROM runs GROUP BY n").fetchall())


def record_run(path: Path, n: int) -> None:
    """What the fixture apps' job handler does: one row per run, in its own SQLite file."""
    with closing(sqlite3.connect(path, timeout=30)) as conn, conn:
        conn.execute("CREATE TABLE IF NOT EXISTS runs (n INTEGER NOT NULL, pid INTEGER NOT NULL)")
        conn.execute("INSERT INTO runs (n, pid) VALUES (?, ?)", (n, os.getpid()))


def wait_until_completed(store_url: str, count: int, timeout: float = 90) -> JobEngine:
    """Poll the store (from this process) until ``count`` jobs completed; returns an engine on it (close its store)."""
    engine = JobEngine(open_store(store_url))
    try:
        wait_for(lambda: engine.counts().get("completed", 0) >= count, timeout=timeout, interval=0.05,
                 message=f"{count} jobs completed")  # fmt: skip
    except BaseException:
        engine.store.close()
        raise
    return engine


def place_orders(port: int, count: int) -> list[str]:
    """``POST /orders/<n>`` for n in range(count) (the fixture apps enqueue one ``record`` job each); the job ids."""
    job_ids = []
    for n in range(count):
        status, _headers, body = http(port, "POST", f"/orders/{n}")
        assert status == 200, body
        job_ids.append(json.loads(body)["job"])
    assert len(set(job_ids)) == count
    return job_ids


def check_each_job_ran_once(directory: Path, job_ids: list[str]) -> None:
    """Wait until every job completed (polling the SQLite store in ``directory``), then check each ran exactly once:
    completed at its first attempt, and one row per order in the handler's table."""
    engine = wait_until_completed(f"sqlite:///{directory / 'jobs.db'}", len(job_ids))
    try:
        jobs = [engine.get_job(job_id) for job_id in job_ids]
        assert {job.state for job in jobs} == {JobState.COMPLETED} and {job.attempts for job in jobs} == {1}
        assert engine.counts().get("completed") == len(job_ids)
    finally:
        engine.store.close()
    assert count_runs(directory / "runs.db") == dict.fromkeys(range(len(job_ids)), 1)
