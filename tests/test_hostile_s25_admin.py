"""Hostile tests of the admin API over a real socket: path segments that are not UTF-8.

WSGI hands ``PATH_INFO`` as the request's bytes decoded as latin-1 (PEP 3333), and the app
recovers the UTF-8 text (``_wsgi.from_wsgi``). The promise attacked: a bad parameter is a
400 naming it, as a query string that is not UTF-8 already is (``the query string is not
valid UTF-8``). A path segment that is not UTF-8 (``%ff``, or ``%ed%a0%80``, an encoded lone
surrogate) was kept as its latin-1 text instead: ``POST /queues/%ff/pause`` answered 200 and
paused a queue named ``"ÿ"`` that no client asked for. It is a 400 naming ``path`` now.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.client import HTTPConnection
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import pytest

from threaddispatch import JobEngine
from threaddispatch.admin import make_server, make_wsgi_app
from threaddispatch.stores import MemoryStore

pytestmark = pytest.mark.timeout(30)

TOKEN = "hostile-s25-token"
BASE = "/api/dispatch"


class _Api:
    """The admin app of ``engine`` on a threaded wsgiref server on 127.0.0.1 (a free port)."""

    def __init__(self, engine: JobEngine) -> None:
        self.httpd = make_server(make_wsgi_app(engine, BASE, token=TOKEN), "127.0.0.1", 0)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="threaddispatch-test-s25-admin"
        )
        self.thread.start()

    def request(self, method: str, path: str) -> tuple[int, Any]:
        """One request with the token on a fresh connection; the status and the decoded JSON body."""
        conn = HTTPConnection("127.0.0.1", self.httpd.server_port, timeout=10)
        try:
            conn.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        return response.status, json.loads(raw) if raw else None

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def engine() -> JobEngine:
    return JobEngine(MemoryStore())


@pytest.fixture
def api(engine: JobEngine) -> Iterator[_Api]:
    server = _Api(engine)
    yield server
    server.close()


@pytest.mark.parametrize("segment", ["%ff", "%ed%a0%80", "caf%e9"])
def test_a_queue_path_segment_that_is_not_utf8_is_a_400_and_pauses_nothing(
    api: _Api, engine: JobEngine, segment: str
) -> None:
    status, body = api.request("POST", f"{BASE}/queues/{segment}/pause")
    assert engine.paused_queues() == set()
    assert status == 400, body
    assert "UTF-8" in body["error"]["message"]
    assert body["error"]["parameter"] == "path"
    assert quote(unquote_to_bytes(segment)) in body["error"]["message"]  # the bytes as sent, not their latin-1 text


def test_a_path_that_is_not_utf8_outside_the_base_path_is_a_400_too(api: _Api, engine: JobEngine) -> None:
    status, body = api.request("GET", "/elsewhere/%ff")
    assert status == 400, body
    assert body["error"]["parameter"] == "path"


def test_a_query_string_that_is_not_utf8_is_a_400(api: _Api) -> None:
    """The behaviour the path should share: the query string's check."""
    status, body = api.request("GET", f"{BASE}/jobs?queue=caf%e9")
    assert status == 400
    assert body["error"]["message"] == "the query string is not valid UTF-8"


def test_a_utf8_queue_path_segment_names_that_queue(api: _Api, engine: JobEngine) -> None:
    status, body = api.request("POST", f"{BASE}/queues/caf%C3%A9/pause")
    assert (status, body) == (200, {"queue": "café", "paused": True})
    assert engine.paused_queues() == {"café"}
