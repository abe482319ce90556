"""make_server over a real socket: an idle client cannot hold a thread for good; server_close() ends its connection."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.client import HTTPConnection

import pytest

from threaddispatch.admin import make_server
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)

REQUEST_THREAD = "threaddispatch-admin-request"


def _hello(environ: object, start_response: object) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])  # type: ignore[operator]
    return [b"hello"]


class _Served:
    """``make_server(_hello)`` on 127.0.0.1, served on a thread until :meth:`stop`."""

    def __init__(self) -> None:
        self.httpd = make_server(_hello, "127.0.0.1", 0)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="threaddispatch-test-wsgi-server"
        )
        self.thread.start()
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(10)


@pytest.fixture
def served() -> Iterator[_Served]:
    server = _Served()
    yield server
    server.stop()


def _request_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == REQUEST_THREAD and thread.is_alive()}


def _idle_client(served: _Served) -> tuple[socket.socket, set[threading.Thread]]:
    """A connection that sends nothing, and the request thread the server started for it."""
    before = _request_threads()
    client = socket.create_connection(("127.0.0.1", served.httpd.server_port), timeout=10)
    started = wait_for(lambda: _request_threads() - before, 10, message="a request thread for the idle client")
    return client, started


def test_a_request_is_answered(served: _Served) -> None:
    conn = HTTPConnection("127.0.0.1", served.httpd.server_port, timeout=10)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"hello")
    finally:
        conn.close()


def test_server_close_ends_an_idle_connection_and_its_thread(served: _Served) -> None:
    client, threads = _idle_client(served)
    with client:
        served.stop()
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive()
        assert client.recv(1) == b""  # the server shut the connection: end of stream, not a hang


def test_an_idle_connection_is_dropped_after_the_request_timeout(served: _Served) -> None:
    served.httpd.request_timeout = 0.2  # type: ignore[attr-defined]
    client, threads = _idle_client(served)
    with client:
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive()  # ended while the server still serves
        assert client.recv(1) == b""
    test_a_request_is_answered(served)  # the server still answers


def test_a_connection_accepted_while_closing_is_shut_at_once(served: _Served) -> None:
    """One that reaches process_request after server_close() began gets no thread."""
    served.stop()
    server = served.httpd
    left, right = socket.socketpair()
    with left, right:
        before = _request_threads()
        server.process_request(right, ("127.0.0.1", 0))
        assert _request_threads() - before == set()
        left.settimeout(10)
        assert left.recv(1) == b""
