"""A small threaded WSGI server (wsgiref, a daemon thread per request) for ``threaddispatch serve`` and tests."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.simple_server import make_server as _wsgiref_make_server

_log = logging.getLogger("threaddispatch.admin")


class _QuietHandler(WSGIRequestHandler):
    """Logs requests through ``logging`` instead of writing them to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        _log.info("%s %s", self.address_string(), format % args)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server with a (daemon) thread per request, so one slow client blocks no other."""

    daemon_threads = True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        threading.current_thread().name = "threaddispatch-admin-request"
        super().process_request_thread(request, client_address)


def make_server(app: Callable[..., Iterable[bytes]], host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """A threaded wsgiref server for ``app`` bound to ``host:port`` (port 0: any free port).

    Call ``serve_forever()`` to serve (it blocks), ``shutdown()`` from another thread
    to stop it, then ``server_close()``. ``server.server_port`` is the bound port.
    Fine for an admin API on an internal interface; put a production WSGI server in
    front of :func:`~threaddispatch.admin.make_wsgi_app` for anything else.
    """
    return _wsgiref_make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
