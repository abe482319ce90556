"""The management command line: ``threaddispatch.cli.main`` in this process, and ``python -m threaddispatch``.

Most commands run in-process (``run``: ``main(argv)`` with stdout, stderr and the
environment captured, SystemExit turned into the exit code), which is what the entry
point calls; a few run as real subprocesses (``run_process``) to prove the entry point
itself: its exit codes, ``--help``, ``serve`` stopped by SIGTERM, and a bad worker target.
The commands that read or change jobs run against a SQLite file and a PostgreSQL URL
(conftest's stores a process can reach; not memory, which no other process sees).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED_STORE_PARAMS

from threaddispatch.cli import main
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import SQLiteStore, Store
from threaddispatch.stores.base import JobState

pytestmark = pytest.mark.timeout(60)  # a hang guard (a subprocess test starts at most two interpreters)

ROOT = Path(__file__).resolve().parent.parent
_priorities = itertools.count()


def run_process(*args: str, store: str | None = None, env: dict[str, str] | None = None, timeout: float = 30) -> (
    subprocess.CompletedProcess[str]
):  # fmt: skip
    """Run ``python -m threaddispatch *args`` (with ``--store`` when given) and capture its output."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("THREADDISPATCH_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    environ.update(env or {})
    argv = [sys.executable, "-m", "threaddispatch", *args, *(["--store", store] if store else [])]
    return subprocess.run(argv, capture_output=True, text=True, env=environ, timeout=timeout, cwd=ROOT, check=False)


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` without any THREADDISPATCH_ variable but those of ``env``; restored afterwards."""
    saved = dict(os.environ)
    try:
        for key in [key for key in os.environ if key.startswith("THREADDISPATCH_")]:
            del os.environ[key]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run(*args: str, store: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``main([*args])`` (with ``--store`` when given) in this process, as ``run_process`` runs the entry point."""
    argv = [*args, *(["--store", store] if store else [])]
    out, err = io.StringIO(), io.StringIO()
    with _environment(env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: --help, --version and usage errors
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit code 2, no traceback, and an error line holding every fragment."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, last


@pytest.fixture(params=SHARED_STORE_PARAMS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The stores the CLI, another process, can open by URL."""
    kind: str = request.param
    return kind


@pytest.fixture
def db(store: Store, store_url: str) -> Iterator[tuple[str, JobEngine]]:
    """A store's URL and an engine on it in this process, with jobs ``noop`` and ``boom``."""
    engine = JobEngine(store)
    engine.register("noop", lambda ctx, payload: payload)
    engine.register("boom", lambda ctx, payload: payload, max_retries=0)
    yield store_url, engine
    engine.stop(5)


def failed(engine: JobEngine, payload: object = None) -> tuple[str, str]:
    """A failed ``boom`` job and its dead letter id (made through the store, no worker)."""
    job_id = engine.enqueue("boom", payload, priority=(1 << 40) + next(_priorities))  # claimed before older ones
    [claimed] = engine.store.claim(["default"], 1, worker_id="w", now=time.time() + 1)
    assert claimed.id == job_id
    letter = engine.store.fail(job_id, worker_id="w", attempts=1, error="RuntimeError: boom", now=time.time())
    assert letter is not None
    return job_id, letter.id


def test_migrate_creates_the_store_and_is_idempotent(tmp_path: Path) -> None:
    """``migrate`` creates the SQLite file with its schema and reports the version; again is a no-op."""
    url = f"sqlite:///{tmp_path / 'new.db'}"
    first = run("migrate", store=url)
    assert first.returncode == 0, first.stderr
    assert "schema at version" in first.stdout
    assert (tmp_path / "new.db").exists()
    again = run("migrate", "--json", store=url)
    assert again.returncode == 0
    assert json.loads(again.stdout)["version"] == SQLiteStore(tmp_path / "new.db").schema_version()


@pytest.mark.postgres
def test_migrate_creates_a_postgresql_schema_and_is_idempotent(pg_server: Any) -> None:
    """``migrate`` on a PostgreSQL URL creates the schema it names with its tables; again is a no-op."""
    import psycopg
    from psycopg import sql

    from threaddispatch.stores.postgres import PostgresStore

    schema = f"t_cli_{uuid.uuid4().hex[:12]}"
    url = pg_server.url(schema=schema)
    try:
        first = run("migrate", "--json", store=url)
        assert first.returncode == 0, first.stderr
        report = json.loads(first.stdout)
        assert report["store"]["schema"] == schema and report["version"] == PostgresStore.MIGRATIONS[-1][0]
        again = run("migrate", store=url)
        assert again.returncode == 0 and f"schema at version {report['version']}" in again.stdout
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_store_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    """No store, a bad URL, a missing SQLite file or directory: exit 2 with one clear line and no traceback."""
    assert_user_error(run_process("jobs", "list"), "THREADDISPATCH_STORE")  # the entry point's exit code
    assert_user_error(run("jobs", "list", store="redis://x"), "unsupported store URL")
    assert_user_error(run("jobs", "list", store=f"sqlite:///{tmp_path / 'missing.db'}"), "no store file", "migrate")
    assert_user_error(run("migrate", store=f"sqlite:///{tmp_path / 'no' / 'dir.db'}"), "no directory")
    assert not (tmp_path / "missing.db").exists()


def test_store_url_from_the_environment(db: tuple[str, JobEngine]) -> None:
    """THREADDISPATCH_STORE stands in for --store."""
    url, engine = db
    engine.enqueue("noop", {"n": 1})
    result = run("jobs", "counts", "--json", env={"THREADDISPATCH_STORE": url})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pending"] == 1


def test_jobs_list_table_json_filters_and_bad_state(db: tuple[str, JobEngine]) -> None:
    """``jobs list`` prints a table or JSON, filters by state/queue, pages with limit/offset; a bad state is exit 2."""
    url, engine = db
    first = engine.enqueue("noop", {"n": 1})
    second = engine.enqueue("noop", {"n": 2}, queue="mail")
    engine.cancel(first)
    table = run("jobs", "list", store=url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].split() == ["ID", "NAME", "QUEUE", "STATE", "ATTEMPTS", "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == [second, first]
    as_json = json.loads(run("jobs", "list", "--json", "--state", "cancelled", store=url).stdout)
    assert [(j["id"], j["state"], j["payload"]) for j in as_json] == [(first, "cancelled", {"n": 1})]
    mail = json.loads(run("jobs", "list", "--json", "--queue", "mail", store=url).stdout)
    assert [j["id"] for j in mail] == [second]
    paged = json.loads(run("jobs", "list", "--json", "--limit", "1", "--offset", "1", store=url).stdout)
    assert [j["id"] for j in paged] == [first]
    assert run("jobs", "list", "--state", "completed", store=url).stdout.strip() == "no jobs"
    bad = run("jobs", "list", "--state", "finished", store=url)
    assert_user_error(bad, "unknown job state 'finished'", "pending")
    assert_user_error(run("jobs", "list", "--limit", "0", store=url), "--limit")


def test_jobs_show_retry_cancel_and_unknown_ids(db: tuple[str, JobEngine]) -> None:
    """``show`` prints one job; ``retry`` runs a failed one again; ``cancel`` cancels; bad ids and states are exit 2."""
    url, engine = db
    job_id, _ = failed(engine, {"to": "a@b.c"})
    shown = run("jobs", "show", job_id, store=url)
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"^id:\s+{job_id}$", shown.stdout, re.M)
    assert re.search(r"^state:\s+failed$", shown.stdout, re.M)
    assert "RuntimeError: boom" in shown.stdout
    assert json.loads(run("jobs", "show", job_id, "--json", store=url).stdout)["payload"] == {"to": "a@b.c"}
    retried = run("jobs", "retry", job_id, "--json", store=url)
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["state"] == "pending"
    assert_user_error(run("jobs", "retry", job_id, store=url), "pending")
    cancelled = run("jobs", "cancel", job_id, store=url)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    assert engine.get_job(job_id).state is JobState.CANCELLED
    assert_user_error(run("jobs", "cancel", job_id, store=url), "already cancelled")
    for action in ("show", "retry", "cancel"):
        assert_user_error(run("jobs", action, "no-such-id", store=url), "no job with id 'no-such-id'")


def test_jobs_counts(db: tuple[str, JobEngine]) -> None:
    """``jobs counts`` gives every state, in a table or JSON, for all queues or one."""
    url, engine = db
    engine.enqueue("noop", 1)
    engine.enqueue("noop", 2, queue="mail")
    table = run("jobs", "counts", store=url)
    assert table.returncode == 0
    assert re.search(r"^pending\s+2$", table.stdout, re.M)
    counts = json.loads(run("jobs", "counts", "--json", "--queue", "mail", store=url).stdout)
    assert counts == {state.value: 0 for state in JobState} | {"pending": 1}


def test_dlq_list_replay_and_purge(db: tuple[str, JobEngine]) -> None:
    """``dlq list`` shows dead letters; ``replay`` (ids or --all) makes new jobs; ``purge`` needs --all/--older-than."""
    url, engine = db
    letters = [failed(engine, {"i": i})[1] for i in range(3)]
    listed = run("dlq", "list", store=url)
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.strip().splitlines()[1:]] == letters[::-1]
    assert "RuntimeError: boom" in listed.stdout
    as_json = json.loads(run("dlq", "list", "--json", store=url).stdout)
    assert [d["payload"] for d in as_json] == [{"i": 2}, {"i": 1}, {"i": 0}]
    assert_user_error(run("dlq", "replay", letters[0], "nope", store=url), "no dead letter with id 'nope'")
    assert len(engine.dlq()) == 3  # nothing replayed when one id is unknown
    one = run("dlq", "replay", letters[0], "--json", store=url)
    assert one.returncode == 0, one.stderr
    [new_id] = json.loads(one.stdout)["job_ids"]
    assert engine.get_job(new_id).decoded_payload() == {"i": 0}
    assert_user_error(run("dlq", "replay", store=url), "--all")
    rest = run("dlq", "replay", "--all", store=url)
    assert rest.returncode == 0 and "replayed 2" in rest.stdout
    assert engine.dlq() == []
    failed(engine)
    assert_user_error(run("dlq", "purge", store=url), "--older-than", "--all")
    assert json.loads(run("dlq", "purge", "--older-than", "3600", "--json", store=url).stdout) == {"purged": 0}
    assert_user_error(run("dlq", "purge", "--older-than", "soon", store=url), "seconds")
    assert run("dlq", "purge", "--all", store=url).stdout.strip() == "purged 1 dead letter(s)"


def test_serve_needs_a_token(tmp_path: Path) -> None:
    """``serve`` without THREADDISPATCH_TOKEN refuses to start (exit 2); never unauthenticated off loopback."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"  # refused before the store is opened: any URL does
    assert_user_error(run("serve", "--port", "0", store=url), "THREADDISPATCH_TOKEN")
    assert_user_error(run("serve", "--allow-unauthenticated", "--host", "0.0.0.0", "--port", "0", store=url),
                      "refusing")  # fmt: skip


def test_serve_answers_over_http_and_stops_on_sigterm(db: tuple[str, JobEngine]) -> None:
    """``serve --port 0`` prints its URL, answers authenticated requests on 127.0.0.1 and exits 0 on SIGTERM."""
    url, engine = db
    job_id = engine.enqueue("noop", {"n": 1})
    environ = {k: v for k, v in os.environ.items() if not k.startswith("THREADDISPATCH_")}
    environ.update(PYTHONPATH=str(ROOT), THREADDISPATCH_TOKEN="tok", THREADDISPATCH_STORE=url)
    process = subprocess.Popen(
        [sys.executable, "-m", "threaddispatch", "serve", "--port", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environ, cwd=ROOT,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # blocks until the server is listening (or the process died)
        match = re.search(r"http://127\.0\.0\.1:(\d+)/api/dispatch/", line)
        assert match, line
        conn = HTTPConnection("127.0.0.1", int(match.group(1)), timeout=10)
        conn.request("GET", f"/api/dispatch/jobs/{job_id}", headers={"Authorization": "Bearer tok"})
        reply = conn.getresponse()
        assert reply.status == 200
        assert json.loads(reply.read())["job"]["payload"] == {"n": 1}
        conn.request("GET", "/api/dispatch/jobs")
        assert conn.getresponse().status == 401
        conn.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_every_subcommand_has_help() -> None:
    """``--help`` works for the management subcommands and lists them at the top level."""
    top = run_process("--help")
    assert top.returncode == 0
    for command in ("jobs", "dlq", "migrate", "serve", "worker"):
        assert command in top.stdout
    for argv in (("jobs", "list"), ("dlq", "replay"), ("serve",), ("migrate",)):
        result = run(*argv, "--help")
        assert result.returncode == 0 and "--store" in result.stdout, argv


def test_worker_target_naming_a_callable_that_needs_arguments_is_a_user_error() -> None:
    """``worker json:dumps`` (a callable that is no engine factory) is a one-line error, exit 2, no traceback."""
    result = run_process("worker", "json:dumps")
    assert_user_error(result, "json:dumps")
