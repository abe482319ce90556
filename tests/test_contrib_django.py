"""The Django app end to end: a real project configured in-process, its urls, the worker management command."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402 - after the skip when Django is missing
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import include, path  # noqa: E402

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="threaddispatch-tests",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "threaddispatch.contrib.django"],
        MIDDLEWARE=["django.middleware.common.CommonMiddleware", "django.middleware.csrf.CsrfViewMiddleware"],
        DATABASES={},
        THREADDISPATCH={"STORE": "memory://", "TOKEN": "unused", "EXIT_TIMEOUT": 5.0},
    )
    django.setup()

from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.core.management import CommandError, call_command  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.test import Client, override_settings  # noqa: E402

from threaddispatch import _lifecycle  # noqa: E402
from threaddispatch.admin import make_server  # noqa: E402
from threaddispatch.backoff import Constant  # noqa: E402
from threaddispatch.contrib.django import get_admin_app, get_engine, get_settings  # noqa: E402
from threaddispatch.contrib.django.conf import apply_settings, reset  # noqa: E402
from threaddispatch.jobs import JobEngine  # noqa: E402
from threaddispatch.stores import SQLiteStore  # noqa: E402
from threaddispatch.stores.base import JobState  # noqa: E402
from threaddispatch.testing import wait_for  # noqa: E402

pytestmark = pytest.mark.timeout(30)


def hello(request: HttpRequest) -> JsonResponse:
    """An ordinary project view next to the admin API."""
    return JsonResponse({"hello": "world"})


urlpatterns = [
    path("hello", hello),
    path("ops/dispatch/", include("threaddispatch.contrib.django.urls")),
]

AUTH = {"Authorization": "Bearer tok"}
_current: dict[str, JobEngine] = {}


def project_engine() -> JobEngine:
    """What settings.THREADDISPATCH["ENGINE"] names in these tests: the engine of the running test."""
    return _current["engine"]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[JobEngine]:
    """The project's engine on a SQLite file, with ENGINE pointing at it and TOKEN "tok"."""
    store = SQLiteStore(tmp_path / "jobs.db")
    made = JobEngine(store, poll_interval=0.01, max_poll_interval=0.05, backoff=Constant(0.01))
    made.register("noop", lambda ctx, payload: payload)
    _current["engine"] = made
    with override_settings(THREADDISPATCH={"ENGINE": f"{__name__}.project_engine", "TOKEN": "tok"}):
        yield made
    made.stop(5)
    store.close()
    _current.clear()


def test_admin_urls_serve_the_api_with_bearer_auth_and_no_csrf(engine: JobEngine) -> None:
    """The included urls answer the admin routes; the token is required; POSTs need no CSRF token."""
    job_id = engine.enqueue("noop", {"n": 1})
    client = Client(enforce_csrf_checks=True)
    reply = client.get(f"/ops/dispatch/jobs/{job_id}", headers=AUTH)
    assert reply.status_code == 200
    assert reply.json()["job"]["payload"] == {"n": 1}
    assert client.get("/ops/dispatch/jobs").status_code == 401
    assert client.get("/ops/dispatch/jobs", HTTP_AUTHORIZATION="Bearer nope").status_code == 401
    cancelled = client.post(f"/ops/dispatch/jobs/{job_id}/cancel", headers=AUTH)
    assert cancelled.status_code == 200, cancelled.content
    assert engine.get_job(job_id).state is JobState.CANCELLED
    conflict = client.post(f"/ops/dispatch/jobs/{job_id}/cancel", headers=AUTH)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "conflict"
    purge = client.post("/ops/dispatch/dlq/purge", data=json.dumps({"older_than": 60}),
                        content_type="application/json", headers=AUTH)  # fmt: skip
    assert purge.json() == {"purged": 0}
    listed = client.get("/ops/dispatch/jobs", {"state": "cancelled", "limit": "5"}, headers=AUTH).json()["jobs"]
    assert [job["id"] for job in listed] == [job_id]
    bad = client.get("/ops/dispatch/jobs", {"limit": "x"}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["parameter"] == "limit"
    assert client.get("/ops/dispatch/nope", headers=AUTH).status_code == 404
    assert client.put("/ops/dispatch/jobs", headers=AUTH).status_code == 405
    assert "GET /ops/dispatch/jobs" in client.get("/ops/dispatch/", headers=AUTH).json()["routes"]
    assert client.get("/hello").json() == {"hello": "world"}


def test_csrf_still_protects_an_unauthenticated_api_behind_session_login(tmp_path: Path) -> None:
    """ALLOW_UNAUTHENTICATED behind the project's login: a POST without a CSRF token is refused, with one passes."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with override_settings(THREADDISPATCH={"STORE": url, "ALLOW_UNAUTHENTICATED": True}):
        client = Client(enforce_csrf_checks=True)
        refused = client.post("/ops/dispatch/queues/default/pause")
        assert refused.status_code == 403
        assert get_engine().paused_queues() == set()
        # A bearer header does not exempt it: this app has no token, so nothing checks the header.
        assert client.post("/ops/dispatch/queues/default/pause", headers=AUTH).status_code == 403
        secret = "a" * 32
        client.cookies["csrftoken"] = secret
        passed = client.post("/ops/dispatch/queues/default/pause", HTTP_X_CSRFTOKEN=secret)
        assert passed.status_code == 200, passed.content
        assert get_engine().paused_queues() == {"default"}
        assert client.get("/ops/dispatch/health").status_code == 200  # reading needs no CSRF token
        reset()


def test_cross_site_and_non_json_posts_are_refused(engine: JobEngine) -> None:
    """Through Django too: a text/plain or form body is 415, an Origin of another host 403; nothing is changed."""
    client = Client()
    purge = "/ops/dispatch/dlq/purge"
    plain = client.post(purge, data=b'{"all": true}', content_type="text/plain", headers=AUTH)
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
    form = client.post(purge, data={"all": "true"}, headers=AUTH)  # multipart, the test client's default
    assert form.status_code == 415
    evil = client.post("/ops/dispatch/queues/default/pause", HTTP_ORIGIN="https://evil.example", headers=AUTH)
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "cross_site_request"
    same = client.post("/ops/dispatch/queues/default/pause", HTTP_ORIGIN="http://testserver", headers=AUTH)
    assert same.status_code == 200, same.content
    assert engine.paused_queues() == {"default"}
    big = client.post(purge, data=b" " * 70_000 + b"{}", content_type="application/json", headers=AUTH)
    assert big.status_code == 413


def test_a_non_ascii_token_sent_as_utf8_matches(engine: JobEngine) -> None:
    """The Authorization header reaches META latin-1-decoded (PEP 3333): a UTF-8 token sent by curl matches."""
    token = "t\u00f8k-\u20ac"
    with override_settings(THREADDISPATCH={"ENGINE": f"{__name__}.project_engine", "TOKEN": token}):
        as_wsgi = ("Bearer " + token).encode().decode("latin-1")
        assert Client().get("/ops/dispatch/health", HTTP_AUTHORIZATION=as_wsgi).status_code == 200
        assert Client().get("/ops/dispatch/health", HTTP_AUTHORIZATION="Bearer t\u00f8k-").status_code == 401


def test_project_over_a_real_socket(engine: JobEngine) -> None:
    """The project's WSGI application served by wsgiref on 127.0.0.1 answers the admin API."""
    server = make_server(get_wsgi_application(), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="threaddispatch-test-django-server")  # fmt: skip
    thread.start()
    try:
        engine.enqueue("noop", 1)
        conn = HTTPConnection("127.0.0.1", server.server_port, timeout=10)
        conn.request("GET", "/ops/dispatch/jobs/counts", headers={"Authorization": "Bearer tok"})
        reply = conn.getresponse()
        assert reply.status == 200
        assert json.loads(reply.read())["counts"]["pending"] == 1
        conn.request("POST", "/ops/dispatch/queues/default/pause", headers={"Authorization": "Bearer tok"})
        assert json.loads(conn.getresponse().read()) == {"queue": "default", "paused": True}
        conn.close()
        assert engine.paused_queues() == {"default"}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_store_only_settings_make_an_engine_and_changes_drop_it(tmp_path: Path) -> None:
    """With only STORE, get_engine() opens it once (cached); changing the setting closes it and makes a new one."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with override_settings(THREADDISPATCH={"STORE": url, "TOKEN": "tok", "ENGINE_OPTIONS": {"concurrency": 3}}):
        first = get_engine()
        assert get_engine() is first and first.config.concurrency == 3
        assert get_admin_app().engine is first
        assert Client().get("/ops/dispatch/health", headers=AUTH).json()["status"] == "ok"
    with pytest.raises(Exception, match="closed"):
        first.store.counts()
    with override_settings(THREADDISPATCH={"STORE": url, "TOKEN": "tok"}):
        assert get_engine() is not first
    reset()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"STOR": "memory://"}, "unknown key 'STOR'"),
        ({"STORE": ""}, "STORE must be a non-empty str"),
        ({"STORE": "memory://", "ENGINE_OPTIONS": 3}, "ENGINE_OPTIONS must be a dict"),
        ({"STORE": "memory://", "EXIT_TIMEOUT": -1}, "EXIT_TIMEOUT"),
        ({"STORE": "memory://", "QUEUES": "default"}, "QUEUES"),
        ({"STORE": "memory://", "CONCURRENCY": 0}, "CONCURRENCY"),
    ],
)
def test_bad_settings_are_improperly_configured(setting: dict[str, Any], message: str) -> None:
    """Each bad key of THREADDISPATCH raises ImproperlyConfigured naming it."""
    with override_settings(THREADDISPATCH=setting), pytest.raises(ImproperlyConfigured, match=message):
        get_settings()


def test_a_bad_token_or_store_setting_is_named_by_type_never_echoed() -> None:
    """A TOKEN or STORE of the wrong type is reported by its type name; its value (a secret) never appears."""
    secret = b"s3cret-token-value"
    for key in ("TOKEN", "STORE"):
        with override_settings(THREADDISPATCH={"STORE": "memory://", key: secret}):
            with pytest.raises(ImproperlyConfigured, match=f"{key} must be a non-empty str, got bytes") as caught:
                get_settings()
            assert "s3cret" not in str(caught.value)


def test_engine_resolution_errors() -> None:
    """No ENGINE nor STORE, a bad ENGINE path or object, a bad URL, a missing TOKEN: ImproperlyConfigured."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "set ENGINE"),
        ({"ENGINE": "no.such.module.engine"}, "cannot be imported"),
        ({"ENGINE": f"{__name__}.AUTH"}, "is not a JobEngine"),
        ({"STORE": "redis://x"}, "unsupported store URL"),
        ({"STORE": "memory://", "ENGINE_OPTIONS": {"bogus": 1}}, "ENGINE_OPTIONS"),
    ]
    for setting, message in cases:
        with override_settings(THREADDISPATCH=setting), pytest.raises(ImproperlyConfigured, match=message):
            get_engine()
    with override_settings(THREADDISPATCH={"STORE": "memory://"}):
        with pytest.raises(ImproperlyConfigured, match="TOKEN"):
            get_admin_app()
        reset()
    with override_settings(THREADDISPATCH={"STORE": "memory://", "ALLOW_UNAUTHENTICATED": True}):
        assert Client().get("/ops/dispatch/health").json()["status"] == "ok"
        reset()


def test_ready_applies_the_exit_timeout() -> None:
    """The app's settings hook sets the process exit timeout from EXIT_TIMEOUT."""
    before = _lifecycle.get_exit_timeout()
    try:
        with override_settings(THREADDISPATCH={"STORE": "memory://", "EXIT_TIMEOUT": 1.5}):
            assert apply_settings().exit_timeout == 1.5
            assert _lifecycle.get_exit_timeout() == 1.5
    finally:
        _lifecycle.set_exit_timeout(before)


def test_worker_command_runs_jobs_until_the_engine_stops(engine: JobEngine) -> None:
    """``threaddispatch_worker`` runs the ENGINE's workers (queues and concurrency from options) until stopped."""
    ran = threading.Event()
    engine.register("mark", lambda ctx, payload: ran.set())
    out = io.StringIO()
    failures: list[BaseException] = []

    def command() -> None:
        try:
            call_command("threaddispatch_worker", "--queues", "default", "--concurrency", "2", stdout=out)
        except BaseException as error:  # reported to the test thread
            failures.append(error)

    thread = threading.Thread(target=command, name="threaddispatch-test-worker-command")
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
    assert not thread.is_alive() and failures == []
    assert "concurrency=2" in out.getvalue() and "stopped cleanly" in out.getvalue()


def test_worker_command_needs_an_engine_setting(tmp_path: Path) -> None:
    """Without ENGINE (jobs must be registered), the command fails with a CommandError, starting nothing."""
    with override_settings(THREADDISPATCH={"STORE": f"sqlite:///{tmp_path / 'x.db'}"}):
        with pytest.raises(CommandError, match="ENGINE"):
            call_command("threaddispatch_worker")
        reset()
    with override_settings(THREADDISPATCH={"ENGINE": "no.such.engine"}), pytest.raises(CommandError, match="import"):
        call_command("threaddispatch_worker")
