"""JobEngine and SQLiteStore across fork(): the child never reuses the parent's connections or threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()"),
]


def test_a_forked_child_runs_jobs_on_its_own_connections_and_the_parent_goes_on(tmp_path: Path) -> None:
    """Parent uses the store, forks; the child enqueues and runs a job; both then see consistent data."""
    script = textwrap.dedent(
        f"""
        import json, os, sys
        from threaddispatch import JobEngine
        from threaddispatch.stores import SQLiteStore

        store = SQLiteStore({str(tmp_path / "jobs.db")!r})
        engine = JobEngine(store, concurrency=2, poll_interval=0.01, heartbeat_interval=0.05)

        @engine.job("double")
        def double(ctx, payload):
            return {{"value": payload["n"] * 2, "pid": os.getpid()}}

        first = engine.enqueue("double", {{"n": 1}})  # the parent has opened connections
        engine.start()
        assert engine.result(first, timeout=10)["value"] == 2
        # Fork with the engine stopped (as gunicorn --preload does before its workers start):
        # forking while SQLite calls run on other threads can leave SQLite's own mutexes held
        # in the child, which no library can repair.
        assert engine.stop(5)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                # On a queue only the child serves: the parent's workers (still running) cannot take it.
                child_job = engine.enqueue("double", {{"n": 21}}, queue="child")
                engine.start(queues=["child"])  # the child's own threads: the parent's do not exist here
                result = engine.result(child_job, timeout=10)
                engine.stop(5)
                os.write(write_end, json.dumps({{"job": child_job, "result": result}}).encode())
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        child = json.loads(os.read(read_end, 65536).decode())
        parent_view = engine.get_job(child["job"])  # the parent's connection still works
        engine.start()  # and the parent's engine starts again
        third = engine.enqueue("double", {{"n": 5}})
        third_result = engine.result(third, timeout=10)
        engine.stop(5)
        print(json.dumps({{
            "child": child, "child_job_state": str(parent_view.state),
            "third": third_result, "parent_pid": os.getpid(), "child_pid": pid,
        }}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["child"]["result"] == {"value": 42, "pid": report["child_pid"]}
    assert report["child_job_state"] == "completed"
    assert report["third"] == {"value": 10, "pid": report["parent_pid"]}
