"""A small threaded WSGI server (wsgiref, a daemon thread per request) for ``threaddispatch serve`` and tests."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.simple_server import make_server as _wsgiref_make_server

_log = logging.getLogger("threaddispatch.admin")

#: Seconds a connection may stay silent (no byte of its request, or no room to write the answer) before it is dropped.
REQUEST_TIMEOUT = 30.0
#: Seconds ``server_close()`` waits for the connections it ended to leave their threads.
CLOSE_TIMEOUT = 5.0


class _QuietHandler(WSGIRequestHandler):
    """Logs requests through ``logging`` instead of writing them to stderr; its socket times out."""

    server: _ThreadingWSGIServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout)  # every read and write of this connection

    def log_message(self, format: str, *args: Any) -> None:
        _log.info("%s %s", self.address_string(), format % args)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server with a (daemon) thread per request, so one slow client blocks no other.

    A connection silent for ``request_timeout`` seconds is dropped, so an idle client
    cannot hold a thread for good; ``server_close()`` ends the connections still open
    (their sockets shut down: a blocked read returns) and waits up to ``CLOSE_TIMEOUT``
    seconds for their threads.
    """

    daemon_threads = True
    request_timeout: float | None = REQUEST_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # _open_lock guards _open (the connections whose threads have not finished) and _closing.
        self._open_lock = threading.Condition(threading.Lock())
        self._open: set[socket.socket] = set()
        self._closing = False
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Counted here, on the serving thread, before the request's thread starts: a
        # server_close() that runs meanwhile sees it and shuts it down.
        with self._open_lock:
            if self._closing:
                self.shutdown_request(request)
                return
            self._open.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        threading.current_thread().name = "threaddispatch-admin-request"
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
            self._open_lock.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A request that failed: logged (a client gone or silent, or one ended by close, at DEBUG)."""
        error = sys.exc_info()[1]
        with self._open_lock:
            closing = self._closing
        if closing or isinstance(error, (TimeoutError, ConnectionError)):
            _log.debug("admin connection from %s ended: %r", client_address, error)
        else:
            _log.error("admin request from %s failed", client_address, exc_info=error)

    def server_close(self) -> None:
        """Stop listening, end the open connections, and wait up to ``CLOSE_TIMEOUT`` seconds for their threads."""
        super().server_close()
        with self._open_lock:
            self._closing = True
            still_open = list(self._open)
        for connection in still_open:
            with contextlib.suppress(OSError):  # already closed by its thread
                connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + CLOSE_TIMEOUT
        with self._open_lock:
            while self._open:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    _log.warning("admin server closed with %d connection(s) still running", len(self._open))
                    break
                self._open_lock.wait(remaining)


def make_server(app: Callable[..., Iterable[bytes]], host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """A threaded wsgiref server for ``app`` bound to ``host:port`` (port 0: any free port).

    Call ``serve_forever()`` to serve (it blocks), ``shutdown()`` from another thread
    to stop it, then ``server_close()``: it ends the connections still open and waits
    (up to 5 seconds) for their threads. ``server.server_port`` is the bound port. A
    connection silent for 30 seconds is dropped (``server.request_timeout``). Fine for
    an admin API on an internal interface; put a production WSGI server in front of
    :func:`~threaddispatch.admin.make_wsgi_app` for anything else.
    """
    return _wsgiref_make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
