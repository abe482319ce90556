"""Public health and readiness probes: ``health_public=True`` answers /health and /ready without the token."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from test_admin import TOKEN, Server

from threaddispatch import ConfigurationError, JobEngine
from threaddispatch.admin import make_wsgi_app
from threaddispatch.stores import SQLiteStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[JobEngine]:
    store = SQLiteStore(tmp_path / "jobs.db")
    yield JobEngine(store)
    store.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[..., Iterable[bytes]]], Server]]:
    servers: list[Server] = []

    def start(app: Callable[..., Iterable[bytes]]) -> Server:
        servers.append(Server(app))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_probes_need_the_token_by_default(engine: JobEngine, serve: Callable[..., Server]) -> None:
    server = serve(make_wsgi_app(engine, token=TOKEN))
    for path in ("/api/dispatch/health", "/api/dispatch/ready"):
        assert server.request("GET", path, token=None).status == 401
        reply = server.request("GET", path)
        assert reply.status == 200
        assert reply.body["status"] == "ok"


def test_public_probes_answer_without_the_token_and_say_only_the_status(
    engine: JobEngine, serve: Callable[..., Server]
) -> None:
    server = serve(make_wsgi_app(engine, token=TOKEN, health_public=True))
    for path in ("/api/dispatch/health", "/api/dispatch/ready", "/api/dispatch/ready/"):
        reply = server.request("GET", path, token=None)
        assert (reply.status, reply.body) == (200, {"status": "ok"})
        assert server.request("HEAD", path, token=None).status == 200
    # With the token the full answer, as before; every other route still needs it.
    assert "engine" in server.request("GET", "/api/dispatch/health").body
    assert server.request("GET", "/api/dispatch/stats", token=None).status == 401
    assert server.request("GET", "/api/dispatch/jobs", token=None).status == 401
    assert server.request("POST", "/api/dispatch/health", token=None).status == 401
    # A wrong token is refused, not treated as "no token".
    assert server.request("GET", "/api/dispatch/health", token="wrong").status == 401


def test_a_public_probe_reports_an_unreachable_store_as_503(tmp_path: Path, serve: Callable[..., Server]) -> None:
    store = SQLiteStore(tmp_path / "jobs.db")
    engine = JobEngine(store)
    server = serve(make_wsgi_app(engine, token=TOKEN, health_public=True))
    store.close()  # every store call now raises a StoreError
    reply = server.request("GET", "/api/dispatch/ready", token=None)
    assert (reply.status, reply.body) == (503, {"status": "unavailable"})


def test_health_public_must_be_a_bool(engine: JobEngine) -> None:
    with pytest.raises(ConfigurationError, match="health_public must be True or False, got 'yes'"):
        make_wsgi_app(engine, token=TOKEN, health_public="yes")  # type: ignore[arg-type]
