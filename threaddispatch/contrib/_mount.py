"""Mount one WSGI app under a path prefix of another: what the framework glue shares.

A small, dependency-free version of werkzeug's ``DispatcherMiddleware`` for one prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from threaddispatch._wsgi import url_path_problem
from threaddispatch.errors import ConfigurationError

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["PrefixMount", "check_prefix"]


def check_prefix(name: str, prefix: object) -> str:
    """``prefix`` checked (a path starting with "/", not "/" itself, that a request can reach) without its trailing "/".

    A request's path arrives decoded: a prefix with a %-escape (``"/ap%69"``), a NUL, or a
    ``..`` segment would mount a route no request reaches, or not the one meant.
    """
    if not isinstance(prefix, str) or not prefix.startswith("/") or not prefix.strip("/") or prefix != prefix.strip():
        raise ConfigurationError(f"{name} must be a URL path like '/api/dispatch', got {prefix!r}")
    problem = url_path_problem(prefix)
    if problem is not None:
        raise ConfigurationError(f"{name} must be a URL path like '/api/dispatch' ({problem}), got {prefix!r}")
    return prefix.rstrip("/")


class PrefixMount:
    """A WSGI app sending requests under ``prefix`` to ``mounted`` and the rest to ``app``.

    For the mounted app, ``prefix`` moves from ``PATH_INFO`` to the end of
    ``SCRIPT_NAME`` (as PEP 3333 mounting does). Stateless and thread-safe.
    """

    def __init__(self, app: WSGIApplication, prefix: str, mounted: WSGIApplication) -> None:
        self.app = app
        self.prefix = check_prefix("prefix", prefix)
        self.mounted = mounted

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Route one request by its ``PATH_INFO``."""
        path = environ.get("PATH_INFO", "") or ""
        if path == self.prefix or path.startswith(self.prefix + "/"):
            environ = dict(environ)
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + self.prefix
            environ["PATH_INFO"] = path[len(self.prefix) :]
            return self.mounted(environ, start_response)
        return self.app(environ, start_response)
