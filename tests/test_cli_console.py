"""The operator's command line, complete: global options, crons/queues/dlq show/enqueue/stats, one-line errors,
a closed pipe, and the one cancel/retry rule the CLI and the admin API share.

Most tests call ``threaddispatch.cli.main(argv)`` in this process (capsys captures its
output) on a SQLite file; two run the real console (exit codes and a closed pipe).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from threaddispatch.admin import make_wsgi_app
from threaddispatch.cli import main
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import SQLiteStore
from threaddispatch.stores.base import JobState

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "console-token"


class Console:
    """``threaddispatch ARGS`` run in this process: exit code, stdout and stderr of each call."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse: --help, a parse error
            code = int(exit_.code or 0)
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, (argv, out, err)
        return out

    def json(self, *argv: str) -> object:
        return json.loads(self.ok(*argv, "--json"))

    def error(self, *argv: str) -> str:
        """The one error line of a failing command (exit code 2, nothing else on stderr)."""
        code, out, err = self(*argv)
        assert code == 2, (argv, out, err)
        lines = err.splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]


@pytest.fixture
def console(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Console:
    monkeypatch.delenv("THREADDISPATCH_STORE", raising=False)
    return Console(capsys)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[str, JobEngine]]:
    """A SQLite file's URL and an engine on it with jobs ``noop`` (returns its payload) and ``boom`` (fails once)."""
    store = SQLiteStore(tmp_path / "jobs.db")
    engine = JobEngine(store, poll_interval=0.05)
    engine.register("noop", lambda ctx, payload: payload)
    engine.register("boom", _boom, max_retries=0)
    yield f"sqlite:///{tmp_path / 'jobs.db'}", engine
    engine.stop(5)
    store.close()


def _boom(ctx: object, payload: object) -> None:
    raise RuntimeError("boom")


def failed_job(engine: JobEngine) -> str:
    job_id = engine.enqueue("boom", {"n": 1})
    engine.run_pending()
    assert engine.get_job(job_id).state is JobState.FAILED
    return job_id


def running_job(engine: JobEngine) -> str:
    """A job a (pretend) worker claimed in another process: running in the store, no handler here."""
    job_id = engine.enqueue("noop", {"n": "running"}, priority=1 << 40)
    [claimed] = engine.store.claim(["default"], 1, worker_id="elsewhere", now=time.time() + 1)
    assert claimed.id == job_id
    return job_id


# -- global options ---------------------------------------------------------------------------------


def test_global_options_before_the_subcommand(console: Console, db: tuple[str, JobEngine],
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``--store`` and ``--json`` work before the subcommand as after it; THREADDISPATCH_STORE is the default."""
    url, engine = db
    job_id = engine.enqueue("noop", {"n": 1})
    after = console.ok("jobs", "list", "--store", url, "--json")
    assert console.ok("--store", url, "--json", "jobs", "list") == after
    assert [job["id"] for job in json.loads(after)] == [job_id]
    assert json.loads(console.ok("--json", "--store", url, "jobs", "counts"))["pending"] == 1
    monkeypatch.setenv("THREADDISPATCH_STORE", url)
    assert json.loads(console.ok("--json", "stats"))["counts"]["pending"] == 1
    assert "ID" in console.ok("jobs", "list")  # not --json: a table
    # The subcommand's own option wins over the global one.
    assert json.loads(console.ok("--store", "sqlite:///elsewhere.db", "jobs", "list", "--store", url, "--json"))


def test_global_options_a_subcommand_does_not_take_are_refused(console: Console) -> None:
    """``threaddispatch --store URL worker ...``: the worker's engine names its store; one line, exit 2."""
    line = console.error("--store", "sqlite:///x.db", "worker", "json:dumps")
    assert "--store does not apply" in line and line.startswith("threaddispatch worker")


# -- crons, queues, dead letters, enqueue -----------------------------------------------------------------


def test_crons_list_enable_disable_remove(console: Console, db: tuple[str, JobEngine]) -> None:
    url, engine = db
    engine.cron("*/5 * * * *", "noop", {"tick": True}, name="tick")
    table = console.ok("crons", "list", "--store", url).splitlines()
    assert table[0].split() == ["NAME", "EXPRESSION", "JOB", "QUEUE", "LAST", "TICK", "STATE"]
    assert table[1].split()[0] == "tick" and table[1].split()[-1] == "enabled"
    entries = console.json("crons", "list", "--store", url)
    assert isinstance(entries, list) and len(entries) == 1
    entry = entries[0]
    assert (entry["name"], entry["payload"], entry["enabled"]) == ("tick", {"tick": True}, True)
    assert console.ok("crons", "disable", "tick", "--store", url).strip() == "cron entry tick disabled"
    assert not engine.get_cron("tick").enabled
    assert console.json("crons", "enable", "tick", "--store", url)["enabled"] is True  # type: ignore[index]
    assert engine.get_cron("tick").enabled
    assert console.json("crons", "remove", "tick", "--store", url) == {"removed": "tick"}
    assert engine.crons() == []
    for action in ("remove", "enable", "disable"):
        assert "no cron entry named 'tick'" in console.error("crons", action, "tick", "--store", url)
    assert console.ok("crons", "list", "--store", url).strip() == "no cron entries"


def test_queues_list_pause_and_resume(console: Console, db: tuple[str, JobEngine]) -> None:
    url, engine = db
    engine.enqueue("noop", 1, queue="mail")
    assert console.json("queues", "pause", "mail", "--store", url) == {"queue": "mail", "paused": True}
    assert engine.paused_queues() == {"mail"}
    listed = {queue["name"]: queue for queue in console.json("queues", "list", "--store", url)}  # type: ignore[attr-defined]
    assert listed["mail"]["paused"] and listed["mail"]["counts"]["pending"] == 1
    assert not listed["default"]["paused"]
    table = console.ok("queues", "list", "--store", url).splitlines()
    assert table[0].split()[:3] == ["QUEUE", "STATE", "WORKERS"] and "PENDING" in table[0]
    assert re.search(r"^mail\s+paused\s+0\s+1\b", "\n".join(table), re.M), table
    assert console.ok("queues", "resume", "mail", "--store", url).strip() == "queue mail resumed"
    assert engine.paused_queues() == set()
    assert "surrounding spaces" in console.error("queues", "pause", " mail", "--store", url)


def test_dlq_show(console: Console, db: tuple[str, JobEngine]) -> None:
    url, engine = db
    job_id = failed_job(engine)
    [letter] = engine.dlq()
    shown = console.ok("dlq", "show", letter.id, "--store", url)
    assert re.search(rf"^job_id:\s+{job_id}$", shown, re.M)
    assert re.search(r'^payload:\s+\{"n": 1\}$', shown, re.M)
    assert "RuntimeError: boom" in shown and re.search(r"^failed_at:\s+\d{4}-\d\d-\d\dT", shown, re.M)
    data = console.json("dlq", "show", letter.id, "--store", url)
    assert data["job_id"] == job_id and data["payload"] == {"n": 1}  # type: ignore[index]
    assert "no dead letter with id 'nope'" in console.error("dlq", "show", "nope", "--store", url)


def test_enqueue_prints_the_id_and_a_worker_runs_the_job(console: Console, db: tuple[str, JobEngine]) -> None:
    """``enqueue NAME JSON`` stores the job for the workers that registered NAME; its options reach the record."""
    url, engine = db
    job_id = console.ok("enqueue", "noop", '{"to": "a@b.c"}', "--store", url).strip()
    assert re.fullmatch(r"\S+", job_id)
    engine.run_pending()
    assert engine.result(job_id, timeout=5) == {"to": "a@b.c"}
    later = console.json("enqueue", "noop", "[1, 2]", "--queue", "mail", "--delay", "60", "--priority", "5",
                         "--store", url)  # fmt: skip
    assert isinstance(later, dict)
    job = engine.get_job(later["id"])
    assert (job.queue, job.priority, job.decoded_payload(), job.state) == ("mail", 5, [1, 2], JobState.PENDING)
    assert job.run_at - job.created_at == pytest.approx(60, abs=1)
    assert "not JSON" in console.error("enqueue", "noop", "{to: 1}", "--store", url)
    assert "--priority" in console.error("enqueue", "noop", "1", "--priority", "high", "--store", url)


# -- errors -------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again when the block ends: nothing listens there


def test_a_postgresql_server_that_is_down_is_one_line_naming_host_and_port(console: Console) -> None:
    pytest.importorskip("psycopg")
    port = _closed_port()
    line = console.error("jobs", "list", "--store", f"postgresql://ops:hunter2-secret@127.0.0.1:{port}/jobs")
    assert f"127.0.0.1:{port}" in line and "hunter2-secret" not in line
    assert line.startswith("threaddispatch jobs list: ")


def test_parse_errors_are_one_line_and_state_help_lists_the_states(console: Console) -> None:
    line = console.error("jobs", "list", "--limit", "0", "--store", "sqlite:///x.db")
    assert line.startswith("threaddispatch jobs list: ") and "--limit" in line
    assert "unknown job state 'done'" in console.error("jobs", "list", "--state", "done")
    assert "invalid choice" in console.error("nope")
    code, out, _ = console("jobs", "list", "--help")
    assert code == 0
    help_text = " ".join(out.split())
    assert all(state.value in help_text.partition("--state STATE")[2] for state in JobState), out


def _console_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADDISPATCH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_output_into_a_closed_pipe_ends_quietly(db: tuple[str, JobEngine]) -> None:
    """``threaddispatch jobs list | head -1``: the reader is gone before the table is written; no traceback."""
    url, engine = db
    engine.enqueue_many("noop", list(range(50)))
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE: the reader (head) has exited
    try:
        result = subprocess.run(
            [sys.executable, "-m", "threaddispatch", "jobs", "list", "--store", url],
            stdout=write_end, stderr=subprocess.PIPE, text=True, env=_console_env(), timeout=30, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 141  # as a Unix tool that SIGPIPE ended


def test_a_store_that_is_down_exits_2_in_the_real_console() -> None:
    """The console script's exit code for a PostgreSQL server that is down is 2, with one line on stderr."""
    pytest.importorskip("psycopg")
    url = f"postgresql://ops:hunter2-secret@127.0.0.1:{_closed_port()}/jobs"
    result = subprocess.run(
        [sys.executable, "-m", "threaddispatch", "jobs", "counts", "--store", url],
        capture_output=True, text=True, env=_console_env(), timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert len(result.stderr.splitlines()) == 1 and "hunter2-secret" not in result.stderr, result.stderr


# -- one rule for cancel and retry ------------------------------------------------------------------------


def test_cancel_and_retry_follow_the_engines_rule_in_the_cli_and_the_admin_api(
    console: Console, db: tuple[str, JobEngine]
) -> None:
    """Both cancel pending, retrying and running jobs and retry failed and cancelled ones; the rest: exit 2 / 409."""
    url, engine = db
    app = make_wsgi_app(engine, token=TOKEN)

    def api(action: str, job_id: str) -> tuple[int, dict[str, object]]:
        answer = app.handle("POST", f"/jobs/{job_id}/{action}", authorization=f"Bearer {TOKEN}")
        return answer.status, answer.json()

    for via in ("cli", "api"):
        running = running_job(engine)
        if via == "cli":
            assert "cancelled" in console.ok("jobs", "cancel", running, "--store", url)
        else:
            assert api("cancel", running)[0] == 200
        assert engine.get_job(running).state is JobState.CANCELLED, via
        if via == "cli":
            assert console.json("jobs", "retry", running, "--store", url)["state"] == "pending"  # type: ignore[index]
        else:
            status, body = api("retry", running)
            assert status == 200 and body["job"]["state"] == "pending"  # type: ignore[index]
        assert engine.get_job(running).state is JobState.PENDING, via
        engine.cancel(running)  # out of the way of the next claim

    pending = engine.enqueue("noop", 1)
    engine.run_pending()
    assert engine.get_job(pending).state is JobState.COMPLETED
    fresh = engine.enqueue("noop", 2, delay=3600)
    assert "already completed" in console.error("jobs", "cancel", pending, "--store", url)
    status, body = api("cancel", pending)
    assert status == 409 and "already completed" in str(body)
    assert "is pending" in console.error("jobs", "retry", fresh, "--store", url)
    status, body = api("retry", fresh)
    assert status == 409 and "is pending" in str(body)


# -- results: decoded everywhere an operator looks -------------------------------------------------------


def test_results_are_shown_decoded_by_the_cli_and_the_admin_api(console: Console, db: tuple[str, JobEngine]) -> None:
    """A stored result is JSON text (``get_job(id).result``); the CLI, the API and ``engine.result`` decode it."""
    url, engine = db
    job_id = engine.enqueue("noop", "42")  # the handler returns the string "42", not the number
    engine.run_pending()
    assert engine.get_job(job_id).result == '"42"'
    assert engine.get_job(job_id).decoded_result() == engine.result(job_id, timeout=5) == "42"
    answer = make_wsgi_app(engine, token=TOKEN).handle("GET", f"/jobs/{job_id}", authorization=f"Bearer {TOKEN}")
    assert answer.json()["job"]["result"] == "42"
    assert console.json("jobs", "show", job_id, "--store", url)["result"] == "42"  # type: ignore[index]
    assert re.search(r'^result:\s+"42"$', console.ok("jobs", "show", job_id, "--store", url), re.M)
