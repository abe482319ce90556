"""The admin API: a JSON-over-HTTP face of a :class:`~threaddispatch.jobs.JobEngine`, as plain WSGI.

:func:`make_wsgi_app` builds an :class:`AdminApp`, a WSGI callable with no framework
dependency, serving these routes under its ``base_path`` (default ``/api/dispatch``):

=======  ================================  ===============================================
GET      ``/``                             the route list
GET      ``/jobs``                         jobs, newest first: ``state``, ``queue``, ``limit``, ``cursor``
GET      ``/jobs/counts``                  ``{state: count}`` (``queue``)
GET      ``/jobs/{id}``                    one job
POST     ``/jobs/{id}/cancel``             cancel a pending or retrying job (else 409, also
                                           when a worker claimed it meanwhile)
POST     ``/jobs/{id}/retry``              run a failed job again (else 409)
GET      ``/dlq``                          dead letters, newest first: ``queue``, ``limit``, ``cursor``
GET      ``/dlq/{id}``                     one dead letter
POST     ``/dlq/{id}/replay``              enqueue it again as a new job
POST     ``/dlq/replay-all``               replay every dead letter (``queue``, ``limit``)
POST     ``/dlq/purge``                    delete dead letters older than ``older_than`` seconds,
                                           or every one with ``all=true`` (one of the two)
GET      ``/crons``                        cron entries
POST     ``/crons/{name}/enable|disable``  let a cron entry fire, or stop it
GET      ``/queues``                       known queues with counts, limits and pause state
POST     ``/queues/{name}/pause|resume``   stop or restart claiming from a queue
GET      ``/stats``                        the engine's counters, job counts, the store
GET      ``/health``                       200 when the store answers, else 503
=======  ================================  ===============================================

Every request needs ``Authorization: Bearer <token>`` (its bytes compared with the
token's UTF-8 bytes in constant time), unless the app was built with
``allow_unauthenticated=True`` and no token. Responses are JSON; errors are
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
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.simple_server import make_server as _wsgiref_make_server

from threaddispatch.errors import (
    ConfigurationError,
    InvalidStateError,
    JobNotFoundError,
    PayloadError,
    StoreError,
    StoreUnavailableError,
)
from threaddispatch.stores.base import JobState

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from threaddispatch.jobs import JobEngine

__all__ = ["DEFAULT_LIMIT", "MAX_BODY_SIZE", "MAX_LIMIT", "AdminApp", "AdminResponse", "make_server", "make_wsgi_app"]

_log = logging.getLogger("threaddispatch.admin")

#: Items per page when ``limit`` is not given, and the most a page may hold.
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: The largest request body accepted (bytes); larger ones get 413.
MAX_BODY_SIZE = 64 * 1024
_MAX_REPLAY_ALL = 100_000
#: Every number a request gives must fit a signed 64-bit integer (the stores' INTEGER).
_INT64_MAX = 2**63 - 1
_MUTATIONS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_SAME_ORIGIN_FETCH_SITES = frozenset({"same-origin", "none"})


class _HttpError(Exception):
    """An error answered as JSON with ``status``; ``parameter`` names a bad parameter."""

    def __init__(
        self, status: int, code: str, message: str, *, parameter: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.parameter = parameter
        self.headers = list(headers)


def _bad(parameter: str, message: str) -> _HttpError:
    return _HttpError(400, "bad_parameter", message, parameter=parameter)


def _shorten(value: object, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters, for echoing a bad value in a message."""
    text = repr(value)
    return text if len(text) <= width else f"{text[: width - 3]}..."


def _check_text(name: str, value: str) -> None:
    """Refuse text no store can hold: a NUL character or a lone surrogate (not encodable as UTF-8)."""
    if "\x00" in value:
        raise _bad(name, f"{name} must not contain a NUL character, got {_shorten(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(name, f"{name} must be valid Unicode text (no lone surrogates), got {_shorten(value)}") from None


@dataclass(frozen=True)
class AdminResponse:
    """A response of :meth:`AdminApp.handle`: status code, headers and the JSON body bytes. Immutable."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def status_line(self) -> str:
        """``"200 OK"``: the WSGI status string."""
        return f"{self.status} {HTTPStatus(self.status).phrase}"

    def json(self) -> Any:
        """The body decoded (for tests and framework glue)."""
        return json.loads(self.body)


def _json_default(value: object) -> object:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, Mapping):
        return dict(value)
    return str(value)


def _encode_json(data: object) -> bytes:
    text = json.dumps(data, default=_json_default, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace")  # a lone surrogate must not fail the answer


def _load_json(raw: bytes | str) -> object:
    """``json.loads``; raises ValueError for anything it cannot decode, too deep nesting included."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeDecodeError as error:
        raise ValueError(str(error)) from None


def _respond(status: int, data: object, headers: Iterable[tuple[str, str]] = ()) -> AdminResponse:
    body = _encode_json(data)
    return AdminResponse(
        status,
        [
            ("Content-Type", "application/json; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            *headers,
        ],
        body,
    )


def _error_response(error: _HttpError) -> AdminResponse:
    detail: dict[str, object] = {"code": error.code, "message": error.message}
    if error.parameter is not None:
        detail["parameter"] = error.parameter
    return _respond(error.status, {"error": detail}, error.headers)


# Built once: answering it cannot fail.
_INTERNAL_ERROR = _error_response(_HttpError(500, "internal_error", "internal error; see the server log"))


class _Request:
    """One parsed request: method, path (relative to the app), parameters, mount prefix."""

    def __init__(self, method: str, path: str, params: dict[str, object], script_name: str) -> None:
        self.method = method
        self.path = path
        self.params = params
        self.script_name = script_name

    def raw(self, name: str) -> object:
        return self.params.get(name)

    def text(self, name: str) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value or value != value.strip():
            raise _bad(name, f"{name} must be a non-empty string without surrounding spaces, got {value!r}")
        _check_text(name, value)
        return value

    def flag(self, name: str) -> bool | None:
        """A boolean parameter: JSON true/false or the text "true"/"false"; None when absent."""
        value = self.raw(name)
        if value is None:
            return None
        if isinstance(value, bool):
            return value
        if value in ("true", "false"):
            return value == "true"
        raise _bad(name, f"{name} must be true or false, got {value!r}")

    def integer(self, name: str, default: int | None, low: int, high: int) -> int | None:
        value = self.raw(name)
        if value is None:
            return default
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}", value):
            number = int(value)
        if number is None or not low <= number <= high:
            raise _bad(name, f"{name} must be a whole number from {low} to {high}, got {_shorten(value)}")
        return number

    def seconds(self, name: str) -> float | None:
        value = self.raw(name)
        if value is None:
            return None
        number: float | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = float(value) if 0 <= value <= _INT64_MAX else None  # float() of a huge int overflows
        elif isinstance(value, float):
            number = value
        elif isinstance(value, str) and len(value) <= 40:
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number) or not 0 <= number <= _INT64_MAX:
            raise _bad(name, f"{name} must be a number of seconds from 0 to {_INT64_MAX}, got {_shorten(value)}")
        return number

    def state(self) -> JobState | None:
        value = self.text("state")
        if value is None:
            return None
        try:
            return JobState(value)
        except ValueError:
            known = ", ".join(s.value for s in JobState)
            raise _bad("state", f"unknown job state {value!r}; known: {known}") from None


# -- cursors ------------------------------------------------------------------------------------------


def _encode_cursor(kind: str, filters: list[object], anchor: tuple[str, float], position: int) -> str:
    data = {"v": 1, "k": kind, "f": filters, "a": [anchor[0], anchor[1]], "p": position}
    raw = json.dumps(data, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_cursor(text: str, kind: str, filters: list[object]) -> tuple[tuple[str, float], int]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = _load_json(raw)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        anchor_id, anchor_time = data["a"]
        position = data["p"]
        valid = (
            data.get("v") == 1 and data.get("k") == kind and isinstance(anchor_id, str)
            and isinstance(anchor_time, (int, float)) and not isinstance(anchor_time, bool)
            and math.isfinite(anchor_time)  # OverflowError for an int past float
            and isinstance(position, int) and not isinstance(position, bool) and 0 <= position <= _INT64_MAX
        )  # fmt: skip
        if valid:
            _check_text("cursor", anchor_id)
        given_filters = data.get("f")
    except (binascii.Error, ValueError, TypeError, KeyError, OverflowError, _HttpError):
        valid = False
    if not valid:
        raise _bad("cursor", "cursor is not a cursor this listing returned")
    if given_filters != filters:
        raise _bad("cursor", "cursor was returned for other filters; repeat the same filters or drop the cursor")
    return (anchor_id, float(anchor_time)), position


# -- routing ------------------------------------------------------------------------------------------

_Handler = Callable[["AdminApp", _Request, tuple[str, ...]], tuple[int, object]]


@dataclass(frozen=True)
class _Route:
    """A path pattern and, per method, its handler and the parameters it accepts."""

    pattern: re.Pattern[str]
    template: str
    methods: Mapping[str, tuple[_Handler, frozenset[str]]]


_ROUTES: list[_Route] = []


def _route(template: str, pattern: str, method: str, params: Iterable[str] = ()) -> Callable[[_Handler], _Handler]:
    """Register the decorated method for ``method`` on ``pattern``; ``params``: the parameters it accepts."""

    def register(handler: _Handler) -> _Handler:
        entry = (handler, frozenset(params))
        for index, route in enumerate(_ROUTES):
            if route.pattern.pattern == pattern:
                _ROUTES[index] = _Route(route.pattern, template, {**route.methods, method: entry})
                return handler
        _ROUTES.append(_Route(re.compile(pattern), template, {method: entry}))
        return handler

    return register


class AdminApp:
    """The admin WSGI application over one engine (build it with :func:`make_wsgi_app`).

    Each request makes one to a few short store calls on the serving thread; nothing
    else blocks. Thread-safe: it holds no mutable state, so any threaded WSGI server may
    call it concurrently.
    """

    def __init__(
        self, engine: JobEngine, *, base_path: str, token: str | None, allow_unauthenticated: bool = False
    ) -> None:
        from threaddispatch.jobs import JobEngine

        if not isinstance(engine, JobEngine):
            raise ConfigurationError(f"engine must be a threaddispatch JobEngine, got {engine!r}")
        if not isinstance(base_path, str) or (base_path and (not base_path.startswith("/") or base_path == "/")):
            raise ConfigurationError(f"base_path must be '' or start with '/', like '/api/dispatch'; got {base_path!r}")
        if token is not None and (not isinstance(token, str) or not token.strip() or token != token.strip()):
            raise ConfigurationError("token must be a non-empty str without surrounding spaces")
        if token is None and not allow_unauthenticated:
            raise ConfigurationError(
                "the admin API needs a bearer token (token=...); pass allow_unauthenticated=True to serve it "
                "without one, only behind your own authentication"
            )
        self.engine = engine
        self.base_path = base_path.rstrip("/")
        self._token = None if token is None else token.encode("utf-8")

    @property
    def requires_token(self) -> bool:
        """Whether requests must carry the bearer token (False only for an unauthenticated app)."""
        return self._token is not None

    # -- WSGI -------------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI entry point: answers every request with a JSON body."""
        response = self.handle_environ(environ)
        start_response(response.status_line, list(response.headers))  # a copy: servers may add headers to it
        return [] if str(environ.get("REQUEST_METHOD", "GET")).upper() == "HEAD" else [response.body]

    def handle_environ(self, environ: WSGIEnvironment) -> AdminResponse:
        """Answer the request in a WSGI ``environ``; reads at most MAX_BODY_SIZE + 1 bytes of ``wsgi.input``.

        Never raises: every failure is a JSON error response.
        """
        try:
            return self._handle_environ(environ)
        except _HttpError as error:
            return _error_response(error)
        except Exception:  # noqa: BLE001 - documented never to raise: a 500, logged
            _log.exception("admin request failed: %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            return _INTERNAL_ERROR

    def _handle_environ(self, environ: WSGIEnvironment) -> AdminResponse:
        script_name = _from_wsgi(str(environ.get("SCRIPT_NAME", "")))
        path = _from_wsgi(str(environ.get("PATH_INFO", ""))) or "/"
        if self.base_path:
            if path != self.base_path and not path.startswith(self.base_path + "/"):
                raise _HttpError(404, "not_found", f"no such route: {path}")
            script_name += self.base_path
            path = path[len(self.base_path) :] or "/"
        return self.handle(
            str(environ.get("REQUEST_METHOD", "GET")),
            path,
            query=str(environ.get("QUERY_STRING", "")),
            authorization=environ.get("HTTP_AUTHORIZATION"),
            body=_read_body(environ),
            content_type=environ.get("CONTENT_TYPE"),
            script_name=script_name,
            origin=environ.get("HTTP_ORIGIN"),
            sec_fetch_site=environ.get("HTTP_SEC_FETCH_SITE"),
            host=_wsgi_host(environ),
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
    ) -> AdminResponse:
        """Answer one request given its parts; used by the WSGI entry point and by framework glue.

        ``path`` is relative to the app (``/jobs/abc``, base path already removed);
        ``body`` holds POST parameters as a JSON object (``content_type`` must be
        ``application/json``); ``script_name`` is where the app is mounted (only echoed
        in the route list). ``authorization`` is the header as WSGI hands it (its bytes
        decoded as latin-1, PEP 3333). ``origin``, ``sec_fetch_site`` and ``host`` are the
        ``Origin``, ``Sec-Fetch-Site`` and ``Host`` headers, for the cross-site check of
        mutations (None: absent). Blocks for the route's store calls. Never raises: every
        failure is a JSON error response (an unexpected one a 500, logged).
        """
        try:
            if len(body) > MAX_BODY_SIZE:
                raise _HttpError(413, "body_too_large", f"request body over {MAX_BODY_SIZE} bytes")
            self._authenticate(authorization)
            method = method.upper()
            if method in _MUTATIONS:
                _refuse_cross_site(origin, sec_fetch_site, host)
            return self._dispatch(method, path, query, body, content_type=content_type or "", script_name=script_name)
        except _HttpError as error:
            return _error_response(error)
        except Exception:  # noqa: BLE001 - documented never to raise: a 500, logged
            _log.exception("admin %r %r failed", method, path)
            return _INTERNAL_ERROR

    def _authenticate(self, authorization: str | None) -> None:
        if self._token is None:
            return
        challenge = [("WWW-Authenticate", 'Bearer realm="threaddispatch"')]
        if not authorization:
            raise _HttpError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)",
                             headers=challenge)  # fmt: skip
        scheme, _, credentials = authorization.strip().partition(" ")
        # compare_digest on bytes: constant time in the token's content, whatever it holds.
        if scheme.lower() != "bearer" or not hmac.compare_digest(_header_bytes(credentials.strip()), self._token):
            invalid = [("WWW-Authenticate", 'Bearer realm="threaddispatch", error="invalid_token"')]
            raise _HttpError(401, "unauthorized", "invalid bearer token", headers=invalid)

    def _dispatch(
        self, method: str, path: str, query: str, body: bytes, *, content_type: str, script_name: str
    ) -> AdminResponse:
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        for route in _ROUTES:
            match = route.pattern.fullmatch(path)
            if match is None:
                continue
            entry = route.methods.get("GET" if method == "HEAD" else method)
            if entry is None:
                allowed = ", ".join(sorted({*route.methods, *(["HEAD"] if "GET" in route.methods else [])}))
                raise _HttpError(405, "method_not_allowed", f"{method} is not allowed on {route.template}; "
                                 f"allowed: {allowed}", headers=[("Allow", allowed)])  # fmt: skip
            handler, accepted = entry
            params = self._params(method, query, body, content_type)
            unknown = sorted(set(params) - accepted)
            if unknown:
                raise _bad(unknown[0], f"unknown parameter {unknown[0]!r} for {method} {route.template}")
            for group in match.groups():
                _check_text("path", group)
            request = _Request(method, path, params, script_name)
            try:
                status, data = handler(self, request, match.groups())
            except _HttpError:
                raise
            except JobNotFoundError as error:
                raise _HttpError(404, "not_found", str(error)) from None
            except InvalidStateError as error:
                raise _HttpError(409, "conflict", str(error)) from None
            except (ConfigurationError, PayloadError) as error:
                raise _HttpError(400, "bad_parameter", str(error)) from None
            except StoreUnavailableError as error:
                _log.warning("admin %s %s: store unavailable: %s", method, path, error)
                raise _HttpError(503, "store_unavailable", "the job store is unavailable; try again") from None
            except StoreError:
                _log.exception("admin %s %s: store error", method, path)
                raise _HttpError(500, "store_error", "the job store failed; see the server log") from None
            except Exception:  # noqa: BLE001 - one failing request must answer 500, not kill the server
                _log.exception("admin %s %s failed", method, path)
                raise _HttpError(500, "internal_error", "internal error; see the server log") from None
            return _respond(status, data)
        raise _HttpError(404, "not_found", f"no such route: {path}")

    @staticmethod
    def _form(text: str, what: str) -> dict[str, object]:
        try:
            parsed = parse_qs(text, keep_blank_values=True, strict_parsing=False, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise _HttpError(400, "bad_request", f"the {what} is not valid UTF-8") from None
        params: dict[str, object] = {}
        for name, values in parsed.items():
            if len(values) > 1:
                raise _bad(name, f"parameter {name!r} is given {len(values)} times")
            params[name] = values[0]
        return params

    @classmethod
    def _params(cls, method: str, query: str, body: bytes, content_type: str) -> dict[str, object]:
        params = cls._form(query, "query string")
        if not body.strip():
            return params
        if method != "POST":
            raise _HttpError(400, "bad_request", f"{method} takes no request body")
        # Only JSON: an HTML form (urlencoded, multipart, text/plain) from another site cannot send it.
        media = content_type.partition(";")[0].strip().lower()
        if media != "application/json":
            raise _HttpError(415, "unsupported_media_type", "send a request body as a JSON object with "
                             f"Content-Type: application/json (got {media or 'no Content-Type'}), "
                             "or give the parameters in the query string")  # fmt: skip
        try:
            data = _load_json(body)
        except ValueError:
            raise _bad("body", "the request body is not JSON (or is nested too deeply)") from None
        if not isinstance(data, dict):
            raise _bad("body", "the request body must be a JSON object of parameters")
        for name, value in data.items():
            if value is None:
                raise _bad(name, f"parameter {name!r} is null; leave it out or give a value")
            if name in params and params[name] != value:
                raise _bad(name, f"parameter {name!r} is given in the query string and the body")
            params[name] = value
        return params

    # -- jobs ---------------------------------------------------------------------------------------------

    @_route("/", r"/", "GET")
    def _index(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        prefix = request.script_name
        routes = [f"{method} {prefix}{route.template}" for route in _ROUTES for method in route.methods]
        return 200, {"routes": routes}

    @_route("/jobs", r"/jobs", "GET", ("state", "queue", "limit", "cursor"))
    def _list_jobs(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        state = request.state()
        queue = request.text("queue")
        limit = request.integer("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        assert limit is not None
        cursor = request.text("cursor")
        filters: list[object] = [None if state is None else state.value, queue]
        after, position = _decode_cursor(cursor, "jobs", filters) if cursor else (None, 0)
        jobs = self.engine.store.list_jobs_after(after, state=state, queue=queue, limit=limit + 1, position=position)
        page = jobs[:limit]
        next_cursor = None
        if len(jobs) > limit:
            last = page[-1]
            next_cursor = _encode_cursor("jobs", filters, (last.id, last.created_at), position + len(page))
        return 200, {"jobs": [job.to_dict() for job in page], "next_cursor": next_cursor}

    @_route("/jobs/counts", r"/jobs/counts", "GET", ("queue",))
    def _counts(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        counts = self.engine.counts(queue=request.text("queue"))
        return 200, {"counts": counts, "total": sum(counts.values())}

    @_route("/jobs/{id}", r"/jobs/([^/]+)", "GET")
    def _get_job(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        return 200, {"job": self.engine.get_job(groups[0]).to_dict()}

    @_route("/jobs/{id}/cancel", r"/jobs/([^/]+)/cancel", "POST")
    def _cancel_job(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        # One conditional store statement, no check before it: a job a worker claimed meanwhile
        # is running, so it is refused (its handler runs) rather than cancelled under the handler.
        try:
            self.engine.cancel(groups[0], running=False)
        except InvalidStateError as error:
            raise _HttpError(409, "conflict", f"{error} (only pending or retrying jobs can be cancelled)") from None
        return 200, {"job": self.engine.get_job(groups[0]).to_dict()}

    @_route("/jobs/{id}/retry", r"/jobs/([^/]+)/retry", "POST")
    def _retry_job(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        job = self.engine.get_job(groups[0])
        if job.state is not JobState.FAILED:
            raise _HttpError(409, "conflict", f"job {job.id!r} is {job.state.value}; only failed jobs can be retried")
        self.engine.retry(job.id)
        return 200, {"job": self.engine.get_job(job.id).to_dict()}

    # -- dead letters -------------------------------------------------------------------------------------

    @_route("/dlq", r"/dlq", "GET", ("queue", "limit", "cursor"))
    def _list_dlq(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        queue = request.text("queue")
        limit = request.integer("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        assert limit is not None
        cursor = request.text("cursor")
        filters: list[object] = [queue]
        after, position = _decode_cursor(cursor, "dlq", filters) if cursor else (None, 0)
        letters = self.engine.store.list_dead_letters_after(after, queue=queue, limit=limit + 1, position=position)
        page = letters[:limit]
        next_cursor = None
        if len(letters) > limit:
            last = page[-1]
            next_cursor = _encode_cursor("dlq", filters, (last.id, last.failed_at), position + len(page))
        return 200, {"dead_letters": [letter.to_dict() for letter in page], "next_cursor": next_cursor}

    @_route("/dlq/replay-all", r"/dlq/replay-all", "POST", ("queue", "limit"))
    def _replay_all(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        queue = request.text("queue")
        limit = request.integer("limit", None, 1, _MAX_REPLAY_ALL)
        job_ids = self.engine.replay_all(queue, limit=limit)
        return 200, {"replayed": len(job_ids), "job_ids": job_ids}

    @_route("/dlq/purge", r"/dlq/purge", "POST", ("older_than", "all"))
    def _purge_dlq(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        # Purging everything takes an explicit all=true: no missing or null parameter widens it.
        older_than = request.seconds("older_than")
        everything = request.flag("all")
        if everything is False:
            raise _bad("all", "all must be true to purge every dead letter; to purge by age give only older_than")
        if everything and older_than is not None:
            raise _bad("all", "give older_than or all=true, not both")
        if older_than is None and not everything:
            raise _bad("older_than", "give older_than (seconds) to purge older dead letters, or all=true for every one")
        return 200, {"purged": self.engine.purge_dlq(older_than)}

    @_route("/dlq/{id}", r"/dlq/([^/]+)", "GET")
    def _get_dead_letter(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        letter = self.engine.store.get_dead_letter(groups[0])
        if letter is None:
            raise JobNotFoundError(f"no dead letter with id {groups[0]!r}")
        return 200, {"dead_letter": letter.to_dict()}

    @_route("/dlq/{id}/replay", r"/dlq/([^/]+)/replay", "POST")
    def _replay(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        return 200, {"job_id": self.engine.replay(groups[0])}

    # -- crons --------------------------------------------------------------------------------------------

    @_route("/crons", r"/crons", "GET")
    def _list_crons(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        return 200, {"crons": [entry.to_dict() for entry in self.engine.crons()]}

    # A cron name may hold "/" (its default name is "<job>@<expression>"): the name is
    # everything between "/crons/" and the last segment.
    @_route("/crons/{name}/enable", r"/crons/(.+)/enable", "POST")
    def _enable_cron(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        return 200, {"cron": self.engine.enable_cron(groups[0]).to_dict()}

    @_route("/crons/{name}/disable", r"/crons/(.+)/disable", "POST")
    def _disable_cron(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        return 200, {"cron": self.engine.disable_cron(groups[0]).to_dict()}

    # -- queues -------------------------------------------------------------------------------------------

    @_route("/queues", r"/queues", "GET")
    def _list_queues(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        engine = self.engine
        stats = engine.stats()
        served = set(stats.get("queues", ())) if stats.get("state") == "running" else set()
        running_here: Mapping[str, int] = stats.get("running_by_queue", {})
        limits = {config.name: config for config in engine.config.queue_configs}
        paused = engine.paused_queues()
        names = {*engine.config.queues, *limits, *served, *paused}
        names.update(definition.queue for definition in engine.definitions().values())
        names.update(entry.queue for entry in engine.crons())
        queues = []
        for name in sorted(names):
            config = limits.get(name)
            queues.append({
                "name": name,
                "paused": name in paused,
                "counts": engine.counts(queue=name),
                "served_here": name in served,
                "running_here": running_here.get(name, 0),
                "max_concurrency": None if config is None else config.max_concurrency,
                "rate_limit": None if config is None else config.rate_limit,
                "rate_burst": None if config is None else config.rate_burst,
            })  # fmt: skip
        return 200, {"queues": queues}

    @_route("/queues/{name}/pause", r"/queues/(.+)/pause", "POST")
    def _pause_queue(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        self._check_queue_name(groups[0])
        self.engine.pause_queue(groups[0])
        return 200, {"queue": groups[0], "paused": True}

    @_route("/queues/{name}/resume", r"/queues/(.+)/resume", "POST")
    def _resume_queue(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        self._check_queue_name(groups[0])
        self.engine.resume_queue(groups[0])
        return 200, {"queue": groups[0], "paused": False}

    @staticmethod
    def _check_queue_name(name: str) -> None:
        if not name or name != name.strip():
            raise _bad("name", f"queue name must be non-empty without surrounding spaces, got {name!r}")

    # -- stats and health ---------------------------------------------------------------------------------

    @_route("/stats", r"/stats", "GET")
    def _stats(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        return 200, {
            "engine": self.engine.stats(),
            "counts": self.engine.counts(),
            "store": dict(self.engine.store.describe()),
        }

    @_route("/health", r"/health", "GET")
    def _health(self, request: _Request, groups: tuple[str, ...]) -> tuple[int, object]:
        try:
            self.engine.store.paused_queues()  # one cheap read: does the store answer?
        except StoreError as error:
            _log.warning("admin health check: the store does not answer: %s", error)
            return 503, {"status": "unavailable", "store": "unavailable", "engine": self.engine.stats()["state"]}
        return 200, {"status": "ok", "store": "ok", "engine": self.engine.stats()["state"]}

    def __repr__(self) -> str:
        auth = "token" if self._token is not None else "unauthenticated"
        return f"<AdminApp {self.base_path or '/'} {auth} {self.engine!r}>"


def _from_wsgi(text: str) -> str:
    """WSGI hands paths as latin-1 decoded bytes (PEP 3333); recover the UTF-8 text."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _header_bytes(value: str) -> bytes:
    """The bytes of a header value as WSGI hands it (latin-1 decoded, PEP 3333).

    A str holding characters past U+00FF was not decoded that way (framework glue passed
    real text): its UTF-8 bytes then.
    """
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")


def _read_body(environ: WSGIEnvironment) -> bytes:
    """At most MAX_BODY_SIZE + 1 bytes of the body: Content-Length of them, or to the end when terminated."""
    declared = str(environ.get("CONTENT_LENGTH") or "").strip()
    if declared:
        if not re.fullmatch(r"[0-9]+", declared):
            raise _HttpError(400, "bad_request", f"Content-Length is not a whole number: {_shorten(declared)}")
        length = int(declared) if len(declared) <= 18 else MAX_BODY_SIZE + 1
        if length > MAX_BODY_SIZE:
            raise _HttpError(413, "body_too_large", f"request body over {MAX_BODY_SIZE} bytes")
    elif environ.get("wsgi.input_terminated"):
        length = MAX_BODY_SIZE + 1  # no length (chunked): read to the end, at most one byte too many
    else:
        return b""
    if length == 0:
        return b""
    try:
        body = environ["wsgi.input"].read(length)
    except (OSError, ValueError) as error:
        raise _HttpError(400, "bad_request", f"the request body could not be read: {error}") from None
    if not isinstance(body, bytes):
        raise TypeError(f"wsgi.input.read() returned {type(body).__name__}, not bytes")
    return body


def _wsgi_host(environ: WSGIEnvironment) -> str | None:
    """The request's host[:port]: the Host header, else SERVER_NAME:SERVER_PORT (PEP 3333)."""
    host = environ.get("HTTP_HOST")
    if host:
        return str(host)
    name, port = environ.get("SERVER_NAME"), environ.get("SERVER_PORT")
    return f"{name}:{port}" if name and port else None


def _refuse_cross_site(origin: str | None, sec_fetch_site: str | None, host: str | None) -> None:
    """403 for a mutation a browser sent from another site (see "Cross-site requests" above)."""
    if sec_fetch_site is not None and sec_fetch_site.strip().lower() not in _SAME_ORIGIN_FETCH_SITES:
        raise _HttpError(403, "cross_site_request", f"refused a cross-site request (Sec-Fetch-Site: "
                         f"{_shorten(sec_fetch_site)}); send it from the same origin or without a browser")  # fmt: skip
    if origin is not None and not _same_origin(origin, host):
        raise _HttpError(403, "cross_site_request", f"refused a cross-site request: Origin {_shorten(origin)} is "
                         f"not this host ({_shorten(host)})")  # fmt: skip


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether ``Origin`` names the host and port of ``Host`` (ports defaulting to the origin's scheme)."""
    if not host or any(c in host for c in "/\\@?#"):
        return False
    try:
        source = urlsplit(origin.strip())
        target = urlsplit(f"//{host.strip()}")
        if source.scheme.lower() not in ("http", "https") or not source.hostname or source.path not in ("", "/"):
            return False
        default = 443 if source.scheme.lower() == "https" else 80
        return source.hostname == target.hostname and (source.port or default) == (target.port or default)
    except ValueError:  # a port that is no number or out of range
        return False


def make_wsgi_app(
    engine: JobEngine,
    base_path: str = "/api/dispatch",
    token: str | None = None,
    *,
    allow_unauthenticated: bool = False,
) -> AdminApp:
    """Build the admin WSGI app for ``engine`` under ``base_path`` (``""`` when mounted by another app).

    ``token`` is the bearer token every request must carry. Without one this raises
    ConfigurationError, unless ``allow_unauthenticated=True`` (serve it only behind
    your own authentication). The engine need not be started: the admin reads and
    manages the store. Non-blocking; the app is thread-safe.
    """
    return AdminApp(engine, base_path=base_path, token=token, allow_unauthenticated=allow_unauthenticated)


# -- a small threaded server, for ``threaddispatch serve`` and tests --------------------------------------


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
    front of :func:`make_wsgi_app` for anything else.
    """
    return _wsgiref_make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
