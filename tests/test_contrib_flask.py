"""The Flask extension end to end: a real Flask app, its test client and a real socket."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flask")
import flask

from threaddispatch import _lifecycle
from threaddispatch.admin import make_server
from threaddispatch.contrib.flask import EXTENSION_KEY, ThreadDispatch
from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import MemoryStore

pytestmark = pytest.mark.timeout(30)

AUTH = {"Authorization": "Bearer tok"}


def make_app(tmp_path: Path, **config: Any) -> Any:
    """A Flask app with one ordinary route and the given THREADDISPATCH_* config."""
    app = flask.Flask("shop")
    app.config.update({"THREADDISPATCH_STORE": f"sqlite:///{tmp_path / 'jobs.db'}", **config})

    @app.get("/hello")
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    return app


@pytest.fixture
def extensions() -> Iterator[list[ThreadDispatch]]:
    """Extensions to close at teardown (their dispatchers, engines and stores)."""
    made: list[ThreadDispatch] = []
    yield made
    for ext in made:
        for app in ext._test_apps:  # type: ignore[attr-defined]
            with app.app_context():
                ext.close(5)


def init(extensions: list[ThreadDispatch], app: Any, ext: ThreadDispatch | None = None) -> ThreadDispatch:
    """``ThreadDispatch().init_app(app)``, remembered for teardown."""
    ext = ext or ThreadDispatch()
    ext.init_app(app)
    if ext not in extensions:
        ext._test_apps = []  # type: ignore[attr-defined]
        extensions.append(ext)
    ext._test_apps.append(app)  # type: ignore[attr-defined]
    return ext


def test_engine_from_config_and_admin_api_through_the_test_client(
    tmp_path: Path, extensions: list[ThreadDispatch]
) -> None:
    """THREADDISPATCH_STORE builds the engine; the admin API is mounted at THREADDISPATCH_ADMIN_PATH with the token."""
    app = make_app(tmp_path, THREADDISPATCH_ADMIN_PATH="/ops/dispatch", THREADDISPATCH_TOKEN="tok")
    ext = init(extensions, app)
    with app.app_context():
        engine = ext.engine
        engine.register("noop", lambda ctx, payload: payload)
        job_id = engine.enqueue("noop", {"n": 1})
    client = app.test_client()
    assert client.get("/hello").get_json() == {"hello": "world"}
    reply = client.get(f"/ops/dispatch/jobs/{job_id}", headers=AUTH)
    assert reply.status_code == 200
    assert reply.get_json()["job"]["payload"] == {"n": 1}
    assert client.get("/ops/dispatch/jobs").status_code == 401
    assert client.post("/ops/dispatch/queues/default/pause", headers=AUTH).get_json()["paused"] is True
    with app.app_context():
        assert ext.engine.paused_queues() == {"default"}
    routes = client.get("/ops/dispatch/", headers=AUTH).get_json()["routes"]
    assert "GET /ops/dispatch/jobs" in routes
    assert client.get("/ops/dispatch/nope", headers=AUTH).status_code == 404
    assert client.get("/ops/dispatchers").status_code == 404  # Flask's own 404: not the admin prefix
    assert app.extensions[EXTENSION_KEY].admin is not None


def test_admin_api_over_a_real_socket_under_the_app(tmp_path: Path, extensions: list[ThreadDispatch]) -> None:
    """The Flask app (admin mounted) served by wsgiref on 127.0.0.1 answers admin and app routes."""
    app = make_app(tmp_path, THREADDISPATCH_ADMIN_PATH="/api/dispatch", THREADDISPATCH_TOKEN="tok")
    init(extensions, app)
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="threaddispatch-test-flask-server")  # fmt: skip
    thread.start()
    try:
        conn = HTTPConnection("127.0.0.1", server.server_port, timeout=10)
        conn.request("GET", "/api/dispatch/health", headers=AUTH)
        reply = conn.getresponse()
        assert (reply.status, json.loads(reply.read())["status"]) == (200, "ok")
        conn.request("GET", "/hello")
        assert json.loads(conn.getresponse().read()) == {"hello": "world"}
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_admin_not_mounted_without_a_path_and_refused_without_a_token(
    tmp_path: Path, extensions: list[ThreadDispatch]
) -> None:
    """No THREADDISPATCH_ADMIN_PATH: nothing mounted. A path without a token raises, unless explicitly allowed."""
    app = make_app(tmp_path)
    ext = init(extensions, app)
    assert ext._app is None
    with app.app_context():
        assert ext.admin_app is None
    assert app.test_client().get("/api/dispatch/jobs").status_code == 404
    with pytest.raises(ConfigurationError, match="THREADDISPATCH_TOKEN"):
        ThreadDispatch(make_app(tmp_path, THREADDISPATCH_ADMIN_PATH="/admin"))
    open_app = make_app(tmp_path, THREADDISPATCH_ADMIN_PATH="/admin", THREADDISPATCH_ALLOW_UNAUTHENTICATED=True)
    init(extensions, open_app)
    assert open_app.test_client().get("/admin/health").get_json()["status"] == "ok"


def test_an_unauthenticated_admin_refuses_cross_site_and_non_json_posts(
    tmp_path: Path, extensions: list[ThreadDispatch]
) -> None:
    """Behind the app's own (cookie) login: a text/plain or form POST is 415, another Origin 403; same origin passes."""
    app = make_app(tmp_path, THREADDISPATCH_ADMIN_PATH="/admin", THREADDISPATCH_ALLOW_UNAUTHENTICATED=True)
    ext = init(extensions, app)
    client = app.test_client()
    pause = "/admin/queues/default/pause"
    plain = client.post("/admin/dlq/purge", data='{"all": true}', content_type="text/plain")
    assert plain.status_code == 415 and plain.get_json()["error"]["code"] == "unsupported_media_type"
    assert client.post("/admin/dlq/purge", data={"all": "true"}).status_code == 415  # a form
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        refused = client.post(pause, headers=headers)
        assert refused.status_code == 403 and refused.get_json()["error"]["code"] == "cross_site_request"
    with app.app_context():
        assert ext.engine.paused_queues() == set()
    same = client.post(pause, headers={"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 200, same.get_json()
    purged = client.post("/admin/dlq/purge", json={"all": True})
    assert purged.get_json() == {"purged": 0}
    with app.app_context():
        assert ext.engine.paused_queues() == {"default"}


def test_a_non_ascii_token_sent_as_utf8_matches(tmp_path: Path, extensions: list[ThreadDispatch]) -> None:
    """The header arrives latin-1-decoded (PEP 3333): a UTF-8 token, as curl sends it, matches; its latin-1 form not."""
    token = "t\u00f8k-\u20ac"
    app = make_app(tmp_path, THREADDISPATCH_ADMIN_PATH="/admin", THREADDISPATCH_TOKEN=token)
    init(extensions, app)
    client = app.test_client()
    as_wsgi = ("Bearer " + token).encode().decode("latin-1")
    assert client.get("/admin/health", headers={"Authorization": as_wsgi}).status_code == 200
    assert client.get("/admin/health", headers={"Authorization": "Bearer t\u00f8k-"}).status_code == 401


def test_bad_configuration_is_refused(tmp_path: Path) -> None:
    """Unknown THREADDISPATCH_* keys, a bad path, a bad store URL, an admin path with no engine: ConfigurationError."""
    with pytest.raises(ConfigurationError, match="THREADDISPATCH_STOR"):
        ThreadDispatch(make_app(tmp_path, THREADDISPATCH_STOR="x"))
    with pytest.raises(ConfigurationError, match="THREADDISPATCH_ADMIN_PATH"):
        ThreadDispatch(make_app(tmp_path, THREADDISPATCH_ADMIN_PATH="admin", THREADDISPATCH_TOKEN="t"))
    with pytest.raises(ConfigurationError, match="unsupported store URL"):
        ThreadDispatch(make_app(tmp_path, THREADDISPATCH_STORE="redis://x"))
    bare = flask.Flask("bare")
    bare.config.update(THREADDISPATCH_ADMIN_PATH="/admin", THREADDISPATCH_TOKEN="t")
    with pytest.raises(ConfigurationError, match="needs an engine"):
        ThreadDispatch(bare)
    nothing = flask.Flask("nothing")
    ext = ThreadDispatch(nothing)
    with pytest.raises(ConfigurationError, match="no job engine"):
        _ = ext.engine
    ext.close()
    with pytest.raises(ConfigurationError, match="already initialised"):
        ext.init_app(nothing)


def test_background_dispatchers_are_flushed_and_closed_by_close(
    tmp_path: Path, extensions: list[ThreadDispatch]
) -> None:
    """``background()`` makes app-owned dispatchers; ``close()`` delivers what they hold and stops their threads."""
    app = make_app(tmp_path)
    ext = init(extensions, app)
    batches: list[list[int]] = []
    with app.app_context():
        audit = ext.background(batches.append, ms_delay=60_000)  # a long window: only close() sends
        assert audit.name.startswith("flask-shop-")
        for i in range(5):
            audit.enqueue(i)
        assert batches == []
        assert ext.close(5) is True
    assert batches == [[0, 1, 2, 3, 4]]
    assert audit.closed


def test_exit_drain_flushes_dispatchers_and_closes_the_store(tmp_path: Path) -> None:
    """The process exit drain reaches the extension: pending entries are sent, the store it opened is closed."""
    app = make_app(tmp_path, THREADDISPATCH_EXIT_TIMEOUT=2.5)
    ext = ThreadDispatch(app)
    assert _lifecycle.get_exit_timeout() == 2.5
    _lifecycle.set_exit_timeout(5.0)
    sent: list[list[str]] = []
    dispatcher = ext.background(sent.append, ms_delay=60_000)
    dispatcher.enqueue("last words")
    state = app.extensions[EXTENSION_KEY]
    delivered, lost = state._drain_at_exit(_deadline(5))
    assert (delivered, lost) == (1, 0)
    assert sent == [["last words"]]
    with pytest.raises(Exception, match="closed"):
        ext.engine.store.counts()
    with pytest.raises(ConfigurationError, match="closed"):
        ext.background(sent.append)


def _deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def test_a_given_engine_serves_every_app_and_the_current_app_is_resolved(extensions: list[ThreadDispatch]) -> None:
    """``ThreadDispatch(engine=...)`` with init_app on two apps: each app's context resolves its own state."""
    store = MemoryStore()
    engine = JobEngine(store)
    ext = ThreadDispatch(engine=engine)
    first, second = flask.Flask("first"), flask.Flask("second")
    second.config.update(THREADDISPATCH_ADMIN_PATH="/admin", THREADDISPATCH_TOKEN="tok")
    init(extensions, first, ext)
    init(extensions, second, ext)
    with first.app_context():
        assert ext.engine is engine and ext.admin_app is None
    with second.app_context():
        assert ext.engine is engine and ext.admin_app is not None
    with pytest.raises(RuntimeError, match="app context"):
        _ = ext.engine
    assert second.test_client().get("/admin/stats", headers=AUTH).get_json()["store"]["kind"] == "MemoryStore"
    with pytest.raises(ConfigurationError, match="JobEngine"):
        ThreadDispatch(engine=store)
