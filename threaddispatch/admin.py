"""The admin API: a JSON-over-HTTP face of a :class:`~threaddispatch.jobs.JobEngine`, as plain WSGI.

:func:`make_wsgi_app` builds an :class:`AdminApp`, a WSGI callable with no framework
dependency, serving these routes under its ``base_path`` (default ``/api/dispatch``):

=======  ================================  ===============================================
GET      ``/``                             the route list (a browser preferring HTML gets the dashboard)
GET      ``/jobs``                         jobs, newest first: ``state``, ``queue``, ``name``, ``limit``,
                                           ``cursor``
GET      ``/jobs/counts``                  ``{state: count}`` (``queue``)
GET      ``/jobs/{id}``                    one job
POST     ``/jobs/{id}/cancel``             cancel a pending, retrying or running job (else 409):
                                           :meth:`JobEngine.cancel`, as the CLI's
POST     ``/jobs/{id}/retry``              run a failed or cancelled job again (else 409):
                                           :meth:`JobEngine.retry`, as the CLI's
GET      ``/dlq``                          dead letters, newest first: ``queue``, ``limit``, ``cursor``
GET      ``/dlq/count``                    ``{"count": n}`` dead letters (``queue``)
GET      ``/dlq/{id}``                     one dead letter
POST     ``/dlq/{id}/replay``              enqueue it again as a new job
POST     ``/dlq/replay-all``               replay every dead letter (``queue``, ``limit``)
POST     ``/dlq/purge``                    delete dead letters older than ``older_than`` seconds,
                                           or every one with ``all=true`` (one of the two)
GET      ``/crons``                        cron entries
GET      ``/crons/{name}``                 one cron entry (else 404)
DELETE   ``/crons/{name}``                 delete a cron entry from the store (else 404); a
                                           process that declares it in code stores it
                                           again at its next ``cron()`` call (restart)
POST     ``/crons/{name}/enable|disable``  let a cron entry fire, or stop it
GET      ``/queues``                       known queues with counts, limits and pause state
POST     ``/queues/{name}/pause|resume``   stop or restart claiming from a queue
GET      ``/stats``                        the cluster, from the store: job counts by state and
                                           queue, dead letters, paused queues, live workers
                                           (as ``threaddispatch stats``); the serving
                                           engine's own counters under ``serving_engine``
GET      ``/stats/throughput``             jobs completed and failed per minute, oldest first,
                                           the current minute last (``minutes``: 1-1440, 60)
GET      ``/workers``                      the live workers of the store (every process's)
GET      ``/locks``                        serial-lock holds of handlers that outlived their claim,
                                           oldest heartbeat first (``limit``), with ``total``
GET      ``/locks/{key}``                  the holds of one lock key (an empty list when none)
GET      ``/health``                       200 when the store answers, else 503
GET      ``/ready``                        the same check, for readiness probes
=======  ================================  ===============================================

The dashboard. ``GET {base}/`` from a browser (``Accept`` ranking ``text/html`` above
``application/json``) answers the web dashboard's HTML, and ``{base}/ui/dashboard.js`` and
``{base}/ui/dashboard.css`` its assets (:mod:`threaddispatch._dashboard`): static files
holding nothing secret, served without the token, under a Content-Security-Policy that
allows only this origin's script. The page asks for the token, keeps it in the tab's
``sessionStorage`` and sends it with every API call; its mutations are same-origin
``fetch`` calls, which pass the cross-site check below, and carry the ``csrftoken``
cookie back as ``X-CSRFToken`` when there is one (mounted in Django behind its session
login, ``ADMIN_AUTH = "staff"``, whose CSRF check asks for it).

Every other request needs ``Authorization: Bearer <token>`` (its bytes compared with the
token's UTF-8 bytes in constant time), unless the app was built with
``allow_unauthenticated=True`` and no token. With ``health_public=True``, ``GET``
and ``HEAD`` of ``/health`` and ``/ready`` need no token (load-balancer and
Kubernetes probes cannot send one); without the token they answer only
``{"status": ...}``, nothing about the engine or the store beyond whether it answers. Responses are JSON; errors are
``{"error": {"code": ..., "message": ...}}`` with 400 (a bad parameter, named in
``error.parameter``), 401, 403 (a cross-site request), 404 (unknown route or id), 405
(with ``Allow``), 409 (the job's state forbids it), 413 (a body over
:data:`MAX_BODY_SIZE`), 415 (a body that is not ``application/json``), 503 (store
unreachable) or 500 (logged; the details stay in the server log). :meth:`AdminApp.handle`
never raises.

Parameters come from the query string or a JSON object body. A parameter given as JSON
``null`` is refused (400): leave it out instead, so that no ``null`` can widen an
operation (``{"older_than": null}`` does not purge everything). Integers and seconds
must fit a signed 64-bit integer. Pages carry an opaque ``next_cursor`` (keyset: no
item is skipped when jobs arrive or leave while paging).

Cross-site requests. A page on another site can make the user's browser send simple
requests (an HTML form, ``fetch`` with ``mode: "no-cors"``) carrying the user's cookies
or network position, though never an ``Authorization: Bearer`` header it was not
given. So that such a request cannot change anything, also when the app relies on
``allow_unauthenticated=True`` behind cookie or network authentication:

- a request with a (non-blank) body must declare ``Content-Type: application/json``
  (parameters allowed, like ``; charset=utf-8``), which no form can send; else 415;
- a mutation (POST, PUT, PATCH, DELETE) is refused with 403 when it carries
  ``Sec-Fetch-Site`` other than ``same-origin`` or ``none``, or an ``Origin`` whose
  host and port differ from the request's ``Host`` (the port defaulting to the
  origin's scheme: 80 or 443). Behind a proxy that rewrites ``Host``, have it keep
  the original. A non-browser client (curl, a script) sends neither header and passes.

The Django view (:mod:`threaddispatch.contrib.django.views`) skips Django's CSRF check
only for requests authenticated by this app's bearer token; every other request (an
unauthenticated app behind Django's session login) goes through ``csrf_protect``.

Mounting: the app strips ``base_path`` from ``PATH_INFO`` and appends it to
``SCRIPT_NAME``; mounted under a prefix by another WSGI app (``base_path=""``), it
reads ``PATH_INFO`` relative to that mount.

This module is the app itself: authentication, the route table it declares, and the
dispatch that turns engine errors into answers. The handlers are in
:mod:`threaddispatch._admin_handlers` (they manage through the engine's API only),
routing in ``_admin_routes``, parameters in ``_admin_params``, cursors in
``_admin_cursor``, the WSGI plumbing in ``_wsgi`` and the small server in ``_wsgi_server``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

from threaddispatch import _admin_handlers as handlers
from threaddispatch import _dashboard as dashboard
from threaddispatch._admin_cursor import DEFAULT_LIMIT, MAX_LIMIT
from threaddispatch._admin_handlers import AdminContext
from threaddispatch._admin_params import Request, parse_params
from threaddispatch._admin_routes import RouteTable, route
from threaddispatch._validate import show
from threaddispatch._wsgi import (
    INTERNAL_ERROR,
    MAX_BODY_SIZE,
    AdminResponse,
    HttpError,
    check_text,
    error_response,
    from_wsgi,
    header_bytes,
    read_body,
    refuse_cross_site,
    respond,
    url_path_problem,
    wsgi_host,
)
from threaddispatch._wsgi_server import make_server
from threaddispatch.errors import (
    ConfigurationError,
    InvalidStateError,
    JobNotFoundError,
    PayloadError,
    StoreError,
    StoreUnavailableError,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from threaddispatch.jobs import JobEngine

__all__ = ["DEFAULT_LIMIT", "MAX_BODY_SIZE", "MAX_LIMIT", "AdminApp", "AdminResponse", "make_server", "make_wsgi_app"]

_log = logging.getLogger("threaddispatch.admin")

_MUTATIONS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class AdminApp:
    """The admin WSGI application over one engine (build it with :func:`make_wsgi_app`).

    Each request makes one to a few short store calls on the serving thread; nothing
    else blocks. Thread-safe: it holds no mutable state, so any threaded WSGI server may
    call it concurrently.
    """

    #: The routes this app serves, tried in this order (the first pattern matching a path wins:
    #: fixed paths before the ``{id}`` patterns beside them). A cron or queue name may hold "/"
    #: (a cron's default name is "<job>@<expression>"): it is everything up to the last segment.
    routes: ClassVar[RouteTable[AdminContext]] = RouteTable([
        route("GET", "/", r"/", handlers.index),
        route("GET", "/jobs", r"/jobs", handlers.list_jobs, ("state", "queue", "name", "limit", "cursor")),
        route("GET", "/jobs/counts", r"/jobs/counts", handlers.job_counts, ("queue",)),
        route("GET", "/jobs/{id}", r"/jobs/([^/]+)", handlers.get_job),
        route("POST", "/jobs/{id}/cancel", r"/jobs/([^/]+)/cancel", handlers.cancel_job),
        route("POST", "/jobs/{id}/retry", r"/jobs/([^/]+)/retry", handlers.retry_job),
        route("GET", "/dlq", r"/dlq", handlers.list_dead_letters, ("queue", "limit", "cursor")),
        route("GET", "/dlq/count", r"/dlq/count", handlers.count_dead_letters, ("queue",)),
        route("POST", "/dlq/replay-all", r"/dlq/replay-all", handlers.replay_all, ("queue", "limit")),
        route("POST", "/dlq/purge", r"/dlq/purge", handlers.purge_dead_letters, ("older_than", "all")),
        route("GET", "/dlq/{id}", r"/dlq/([^/]+)", handlers.get_dead_letter),
        route("POST", "/dlq/{id}/replay", r"/dlq/([^/]+)/replay", handlers.replay),
        route("GET", "/crons", r"/crons", handlers.list_crons),
        route("POST", "/crons/{name}/enable", r"/crons/(.+)/enable", handlers.enable_cron),
        route("POST", "/crons/{name}/disable", r"/crons/(.+)/disable", handlers.disable_cron),
        route("GET", "/crons/{name}", r"/crons/(.+)", handlers.get_cron),
        route("DELETE", "/crons/{name}", r"/crons/(.+)", handlers.delete_cron),
        route("GET", "/queues", r"/queues", handlers.list_queues),
        route("POST", "/queues/{name}/pause", r"/queues/(.+)/pause", handlers.pause_queue),
        route("POST", "/queues/{name}/resume", r"/queues/(.+)/resume", handlers.resume_queue),
        route("GET", "/stats", r"/stats", handlers.stats),
        route("GET", "/stats/throughput", r"/stats/throughput", handlers.throughput, ("minutes",)),
        route("GET", "/workers", r"/workers", handlers.list_workers),
        route("GET", "/locks", r"/locks", handlers.list_locks, ("limit",)),
        route("GET", "/locks/{key}", r"/locks/(.+)", handlers.get_lock, ("limit",)),
        route("GET", "/health", r"/health", handlers.health),
        route("GET", "/ready", r"/ready", handlers.health),
    ])  # fmt: skip

    def __init__(
        self,
        engine: JobEngine,
        *,
        base_path: str,
        token: str | None,
        allow_unauthenticated: bool = False,
        health_public: bool = False,
    ) -> None:
        from threaddispatch.jobs import JobEngine

        if not isinstance(engine, JobEngine):
            raise ConfigurationError(f"engine must be a threaddispatch JobEngine, got {engine!r}")
        if not isinstance(base_path, str) or (base_path and (not base_path.startswith("/") or base_path == "/")):
            raise ConfigurationError(f"base_path must be '' or start with '/', like '/api/dispatch'; got {base_path!r}")
        problem = url_path_problem(base_path) if base_path else None
        if problem is not None:
            raise ConfigurationError(
                f"base_path must be a URL path like '/api/dispatch' ({problem}); got {base_path!r}"
            )
        if token is not None and (not isinstance(token, str) or not token.strip() or token != token.strip()):
            raise ConfigurationError("token must be a non-empty str without surrounding spaces")
        if token is None and not allow_unauthenticated:
            raise ConfigurationError(
                "the admin API needs a bearer token (token=...); pass allow_unauthenticated=True to serve it "
                "without one, only behind your own authentication"
            )
        if not isinstance(health_public, bool):
            raise ConfigurationError(f"health_public must be True or False, got {show(health_public)}")
        self.engine = engine
        self.base_path = base_path.rstrip("/")
        self.health_public = health_public
        self._token = None if token is None else token.encode("utf-8")

    @property
    def requires_token(self) -> bool:
        """Whether requests must carry the bearer token (False only for an unauthenticated app)."""
        return self._token is not None

    # -- WSGI -------------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI entry point: answers every request with a JSON body (or one of the dashboard's files)."""
        response = self.handle_environ(environ)
        start_response(response.status_line, list(response.headers))  # a copy: servers may add headers to it
        return [] if str(environ.get("REQUEST_METHOD", "GET")).upper() == "HEAD" else [response.body]

    def handle_environ(self, environ: WSGIEnvironment) -> AdminResponse:
        """Answer the request in a WSGI ``environ``; reads at most MAX_BODY_SIZE + 1 bytes of ``wsgi.input``.

        Never raises: every failure is a JSON error response.
        """
        try:
            return self._handle_environ(environ)
        except HttpError as error:
            return error_response(error)
        except Exception:  # noqa: BLE001 - documented never to raise: a 500, logged
            _log.exception("admin request failed: %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            return INTERNAL_ERROR

    def _handle_environ(self, environ: WSGIEnvironment) -> AdminResponse:
        script_name = from_wsgi(str(environ.get("SCRIPT_NAME", "")), "script name")
        path = from_wsgi(str(environ.get("PATH_INFO", ""))) or "/"
        if self.base_path:
            if path != self.base_path and not path.startswith(self.base_path + "/"):
                raise HttpError(404, "not_found", f"no such route: {path}")
            script_name += self.base_path
            path = path[len(self.base_path) :] or "/"
        return self.handle(
            str(environ.get("REQUEST_METHOD", "GET")),
            path,
            query=str(environ.get("QUERY_STRING", "")),
            authorization=environ.get("HTTP_AUTHORIZATION"),
            body=read_body(environ),
            content_type=environ.get("CONTENT_TYPE"),
            script_name=script_name,
            origin=environ.get("HTTP_ORIGIN"),
            sec_fetch_site=environ.get("HTTP_SEC_FETCH_SITE"),
            host=wsgi_host(environ),
            accept=environ.get("HTTP_ACCEPT"),
        )

    # -- the framework-free core -----------------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        authorization: str | None = None,
        body: bytes = b"",
        content_type: str | None = None,
        script_name: str = "",
        origin: str | None = None,
        sec_fetch_site: str | None = None,
        host: str | None = None,
        accept: str | None = None,
    ) -> AdminResponse:
        """Answer one request given its parts; used by the WSGI entry point and by framework glue.

        ``path`` is relative to the app (``/jobs/abc``, base path already removed);
        ``body`` holds POST parameters as a JSON object (``content_type`` must be
        ``application/json``); ``script_name`` is where the app is mounted (only echoed
        in the route list). ``authorization`` is the header as WSGI hands it (its bytes
        decoded as latin-1, PEP 3333). ``origin``, ``sec_fetch_site`` and ``host`` are the
        ``Origin``, ``Sec-Fetch-Site`` and ``Host`` headers, for the cross-site check of
        mutations (None: absent). ``accept`` is the ``Accept`` header: a browser asking for
        ``/`` gets the dashboard's HTML. Blocks for the route's store calls. Never raises: every
        failure is a JSON error response (an unexpected one a 500, logged).
        """
        try:
            if len(body) > MAX_BODY_SIZE:
                raise HttpError(413, "body_too_large", f"request body over {MAX_BODY_SIZE} bytes")
            method = method.upper()
            if dashboard.is_asset(method, path):
                return dashboard.asset(path)
            if dashboard.wants_page(method, path, accept):
                return dashboard.page(script_name)
            if self._is_public_probe(method, path, authorization):
                return self._probe()
            self._authenticate(authorization)
            if method in _MUTATIONS:
                refuse_cross_site(origin, sec_fetch_site, host)
            return self._dispatch(method, path, query, body, content_type=content_type or "", script_name=script_name)
        except HttpError as error:
            return error_response(error)
        except Exception:  # noqa: BLE001 - documented never to raise: a 500, logged
            _log.exception("admin %r %r failed", method, path)
            return INTERNAL_ERROR

    def _is_public_probe(self, method: str, path: str, authorization: str | None) -> bool:
        """A tokenless GET/HEAD of /health or /ready on an app built with ``health_public=True``."""
        return (
            self.health_public
            and self._token is not None
            and not authorization
            and method in ("GET", "HEAD")
            and path.rstrip("/") in ("/health", "/ready")
        )

    def _probe(self) -> AdminResponse:
        """The public probe's answer: the store's reachability and nothing else."""
        status, _data = handlers.health(self, Request("GET", "/health", {}, "", ()))
        return respond(status, {"status": "ok" if status == 200 else "unavailable"})

    def _authenticate(self, authorization: str | None) -> None:
        if self._token is None:
            return
        challenge = [("WWW-Authenticate", 'Bearer realm="threaddispatch"')]
        if not authorization:
            raise HttpError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)",
                             headers=challenge)  # fmt: skip
        scheme, _, credentials = authorization.strip().partition(" ")
        # compare_digest on bytes: constant time in the token's content, whatever it holds.
        if scheme.lower() != "bearer" or not hmac.compare_digest(header_bytes(credentials.strip()), self._token):
            invalid = [("WWW-Authenticate", 'Bearer realm="threaddispatch", error="invalid_token"')]
            raise HttpError(401, "unauthorized", "invalid bearer token", headers=invalid)

    def _dispatch(
        self, method: str, path: str, query: str, body: bytes, *, content_type: str, script_name: str
    ) -> AdminResponse:
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        found, groups = self.routes.find(method, path)
        params = self._params(method, query, body, content_type)
        found.refuse_unknown(params)
        for group in groups:
            check_text("path", group)
        request = Request(method, path, params, script_name, groups)
        try:
            status, data = found.handler(self, request)
        except HttpError:
            raise
        except JobNotFoundError as error:
            raise HttpError(404, "not_found", str(error)) from None
        except InvalidStateError as error:
            raise HttpError(409, "conflict", str(error)) from None
        except (ConfigurationError, PayloadError) as error:
            raise HttpError(400, "bad_parameter", str(error)) from None
        except StoreUnavailableError as error:
            _log.warning("admin %s %s: store unavailable: %s", method, path, error)
            raise HttpError(503, "store_unavailable", "the job store is unavailable; try again") from None
        except StoreError:
            _log.exception("admin %s %s: store error", method, path)
            raise HttpError(500, "store_error", "the job store failed; see the server log") from None
        except Exception:  # noqa: BLE001 - one failing request must answer 500, not kill the server
            _log.exception("admin %s %s failed", method, path)
            raise HttpError(500, "internal_error", "internal error; see the server log") from None
        return respond(status, data)

    @staticmethod
    def _params(method: str, query: str, body: bytes, content_type: str) -> dict[str, object]:
        return parse_params(method, query, body, content_type)

    def __repr__(self) -> str:
        auth = "token" if self._token is not None else "unauthenticated"
        return f"<AdminApp {self.base_path or '/'} {auth} {self.engine!r}>"


def make_wsgi_app(
    engine: JobEngine,
    base_path: str = "/api/dispatch",
    token: str | None = None,
    *,
    allow_unauthenticated: bool = False,
    health_public: bool = False,
) -> AdminApp:
    """Build the admin WSGI app for ``engine`` under ``base_path`` (``""`` when mounted by another app).

    ``token`` is the bearer token every request must carry. Without one this raises
    ConfigurationError, unless ``allow_unauthenticated=True`` (serve it only behind
    your own authentication). ``health_public=True`` answers ``GET /health`` and
    ``GET /ready`` without the token, with ``{"status": ...}`` only. The engine need not
    be started: the admin reads and manages the store. Non-blocking; the app is thread-safe.
    """
    return AdminApp(
        engine,
        base_path=base_path,
        token=token,
        allow_unauthenticated=allow_unauthenticated,
        health_public=health_public,
    )
