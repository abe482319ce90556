"""The Flask extension the Flask way: the admin API as a Blueprint, the app's own login, ``flask threaddispatch``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flask")
import flask
from flask.cli import routes_command

from tests.apps import (
    ROOT,
    Processes,
    check_each_job_ran_once,
    http,
    place_orders,
    run_one_job_in_a_worker_thread,
)
from threaddispatch.contrib.flask import ThreadDispatch, current_engine
from threaddispatch.errors import ConfigurationError

MakeApp = Callable[..., flask.Flask]  # the make fixture: make(**config) builds one app

pytestmark = pytest.mark.timeout(30)

AUTH = {"Authorization": "Bearer tok"}


@pytest.fixture
def make(tmp_path: Path) -> Iterator[MakeApp]:
    """``make(**config)``: a Flask app with ThreadDispatch on a SQLite file; every one is closed at teardown."""
    made: list[tuple[flask.Flask, ThreadDispatch]] = []

    def build(**config: Any) -> flask.Flask:
        app = flask.Flask(f"shop{len(made)}")
        app.config.update({"THREADDISPATCH_STORE": f"sqlite:///{tmp_path / f'jobs{len(made)}.db'}", **config})
        ext = ThreadDispatch(app)
        made.append((app, ext))
        with app.app_context():
            ext.engine.register("noop", lambda ctx, payload: payload)
        return app

    yield build
    for app, ext in made:
        with app.app_context():
            ext.close(5)


def engine_of(app: Any) -> Any:
    with app.app_context():
        return current_engine()


def test_the_admin_api_is_a_blueprint_listed_by_flask_routes(make: MakeApp) -> None:
    """``flask routes`` lists the blueprint's endpoint under the prefix; its requests go through the app's hooks."""
    app = make(THREADDISPATCH_ADMIN_PATH="/ops/dispatch", THREADDISPATCH_TOKEN="tok")
    seen: list[str | None] = []

    @app.before_request
    def record() -> None:
        seen.append(flask.request.blueprint)

    routes = app.test_cli_runner().invoke(routes_command)
    assert routes.exit_code == 0, routes.output
    assert "threaddispatch.api" in routes.output and "/ops/dispatch/<path:path>" in routes.output
    client = app.test_client()
    assert client.get("/ops/dispatch/jobs", headers=AUTH).status_code == 200
    assert seen == ["threaddispatch"]
    assert client.get("/ops/dispatch/jobs").status_code == 401  # the token is still the default
    listing = client.get("/ops/dispatch", headers=AUTH).get_json()  # no redirect to the slash
    assert "GET /ops/dispatch/jobs" in listing["routes"]
    page = client.get("/ops/dispatch/", headers={"Accept": "text/html"})
    assert page.status_code == 200 and b'data-base="/ops/dispatch"' in page.data


def test_admin_auth_app_lets_the_apps_before_request_decide(make: MakeApp) -> None:
    """THREADDISPATCH_ADMIN_AUTH="app": no token; the app's login hook refuses or lets through."""
    app = make(THREADDISPATCH_ADMIN_PATH="/admin", THREADDISPATCH_ADMIN_AUTH="app")
    app.secret_key = "test"

    @app.post("/login")
    def login() -> str:
        flask.session["user"] = "ops"
        return "ok"

    @app.before_request
    def require_login() -> Any:
        if flask.request.blueprint == "threaddispatch" and "user" not in flask.session:
            return {"error": "log in first"}, 401
        return None

    engine = engine_of(app)
    job_id = engine.enqueue("noop", {"n": 1})
    client = app.test_client()
    assert client.get(f"/admin/jobs/{job_id}").status_code == 401
    client.post("/login")
    assert client.get(f"/admin/jobs/{job_id}").get_json()["job"]["payload"] == {"n": 1}
    paused = client.post("/admin/queues/default/pause", headers={"Sec-Fetch-Site": "same-origin"})
    assert paused.status_code == 200 and engine.paused_queues() == {"default"}
    refused = client.post("/admin/queues/default/resume", headers={"Sec-Fetch-Site": "cross-site"})
    assert refused.status_code == 403 and engine.paused_queues() == {"default"}


def test_admin_auth_app_without_any_before_request_refuses(make: MakeApp) -> None:
    """An app that says it authenticates but registered nothing to do it gets 403, never an open admin."""
    app = make(THREADDISPATCH_ADMIN_PATH="/admin", THREADDISPATCH_ADMIN_AUTH="app")
    reply = app.test_client().get("/admin/jobs")
    assert reply.status_code == 403 and "before_request" in reply.get_json()["error"]["message"]
    app.before_request_funcs.setdefault("threaddispatch", []).append(lambda: None)  # a blueprint-only hook counts
    assert app.test_client().get("/admin/jobs").status_code == 200


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"THREADDISPATCH_ADMIN_AUTH": "session"}, "THREADDISPATCH_ADMIN_AUTH must be 'token' or 'app', got 'session'"),
        ({"THREADDISPATCH_ADMIN_AUTH": "app", "THREADDISPATCH_TOKEN": "tok"}, "THREADDISPATCH_TOKEN is not used"),
    ],
)
def test_bad_admin_auth_settings_are_refused(tmp_path: Path, config: dict[str, str], message: str) -> None:
    app = flask.Flask("bad")
    app.config.update(
        THREADDISPATCH_STORE=f"sqlite:///{tmp_path / 'jobs.db'}", THREADDISPATCH_ADMIN_PATH="/a", **config
    )
    with pytest.raises(ConfigurationError, match=message):
        ThreadDispatch(app)


def test_flask_threaddispatch_jobs_list(make: MakeApp) -> None:
    """``flask threaddispatch jobs list`` shows the app's jobs as a table, or JSON, filtered by state."""
    app = make()
    engine = engine_of(app)
    job_id = engine.enqueue("noop", {"n": 1}, queue="emails")
    runner = app.test_cli_runner()
    table = runner.invoke(args=["threaddispatch", "jobs", "list"])
    assert table.exit_code == 0, table.output
    assert table.output.splitlines()[0].split() == ["ID", "NAME", "QUEUE", "STATE", "ATTEMPTS", "CREATED"]
    assert job_id in table.output and "emails" in table.output
    as_json = runner.invoke(args=["threaddispatch", "jobs", "list", "--json", "--state", "pending"])
    assert [job["id"] for job in json.loads(as_json.output)] == [job_id]
    assert runner.invoke(args=["threaddispatch", "jobs", "list", "--state", "completed"]).output.strip() == "no jobs"
    bad = runner.invoke(args=["threaddispatch", "jobs", "list", "--state", "done"])
    assert bad.exit_code == 2 and "'done' is not one of" in bad.output


def test_flask_threaddispatch_worker_runs_the_apps_jobs(make: MakeApp, caplog: pytest.LogCaptureFixture) -> None:
    """``flask threaddispatch worker --queues --concurrency --log-level`` runs the app's engine, logging as the CLI."""
    app = make()
    engine = engine_of(app)
    runner = app.test_cli_runner()
    args = ["threaddispatch", "worker", "--queues", "default", "--concurrency", "2", "--log-level", "debug"]
    caplog.set_level("INFO", logger="threaddispatch.worker")
    result = run_one_job_in_a_worker_thread(engine, lambda: runner.invoke(args=args))
    assert result.exit_code == 0, result.output
    messages = [record.getMessage() for record in caplog.records if record.name == "threaddispatch.worker"]
    assert any(m.startswith("worker starting: threaddispatch.contrib.flask:current_engine") for m in messages)
    assert "queues=['default'], concurrency=2" in messages[0] and messages[-1] == "worker stopped (clean)"


def test_worker_options_are_checked(make: MakeApp) -> None:
    app = make()
    runner = app.test_cli_runner()
    for args, text in ((["--concurrency", "0"], "--concurrency"), (["--queues", " , "], "queue names"),
                       (["--log-level", "LOUD"], "--log-level")):  # fmt: skip
        result = runner.invoke(args=["threaddispatch", "worker", *args])
        assert result.exit_code == 2 and text in result.output


# -- a real server: gunicorn --preload -w 2, a worker process ----------------------------------------------


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """The processes a test starts: every one is stopped at teardown."""
    with Processes(tmp_path) as started:
        yield started


@pytest.mark.timeout(180)
def test_gunicorn_serves_the_app_and_a_worker_process_runs_each_job_once(tmp_path: Path, processes: Processes) -> None:
    """gunicorn --preload -w 2 on 127.0.0.1 takes the orders; ``flask threaddispatch worker`` runs each job once."""
    pytest.importorskip("gunicorn")
    env = {"SHOP_DIR": str(tmp_path)}
    flask_app = ["--app", "tests.apps.flask_shop:create_app()"]
    routes = subprocess.run([sys.executable, "-m", "flask", *flask_app, "routes"], cwd=ROOT, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert "threaddispatch.api" in routes.stdout and "/ops/dispatch/<path:path>" in routes.stdout
    server, port = processes.gunicorn("gunicorn", "tests.apps.flask_shop:create_app()", cwd=ROOT, env=env)
    job_ids = place_orders(port, 20)
    worker_argv = [sys.executable, "-m", "flask", *flask_app, "threaddispatch", "worker", "--concurrency", "4"]
    worker = processes.start("worker", worker_argv, cwd=ROOT, env=env)
    check_each_job_ran_once(tmp_path, job_ids)
    status, _headers, body = http(port, "GET", "/ops/dispatch/jobs/counts", headers=AUTH)  # read by a web worker
    assert status == 200 and json.loads(body)["counts"]["completed"] == len(job_ids)
    assert processes.stop(worker) == 0, processes.log(worker)
    log = processes.log(worker)
    assert "worker starting: threaddispatch.contrib.flask:current_engine" in log and "worker stopped (clean)" in log
    assert processes.stop(server) == 0, processes.log(server)
