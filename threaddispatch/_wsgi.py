"""HTTP plumbing of the admin app: JSON responses and errors, reading a WSGI environ, the cross-site check.

Framework-free and stateless: :class:`HttpError` is how every layer of the admin app
refuses a request, :func:`error_response` turns it into the JSON answer, and the
``environ`` readers recover the path, body and headers as PEP 3333 hands them. The
rules these enforce are documented in :mod:`threaddispatch.admin`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from threaddispatch._show import show
from threaddispatch._validate import encodable

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

#: The largest request body accepted (bytes); larger ones get 413.
MAX_BODY_SIZE = 64 * 1024
_SAME_ORIGIN_FETCH_SITES = frozenset({"same-origin", "none"})


class HttpError(Exception):
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


def bad(parameter: str, message: str) -> HttpError:
    """A 400 naming the bad ``parameter``."""
    return HttpError(400, "bad_parameter", message, parameter=parameter)


def shorten(value: object, width: int = 60) -> str:
    """``show(value)`` (a repr that never raises) cut to ``width`` characters, for an HTTP error message."""
    text = show(value)
    return text if len(text) <= width else f"{text[: width - 3]}..."


def check_text(name: str, value: str) -> None:
    """Refuse text no store can hold: a NUL character or a lone surrogate (not encodable as UTF-8)."""
    if "\x00" in value:
        raise bad(name, f"{name} must not contain a NUL character, got {shorten(value)}")
    if not encodable(value):
        raise bad(name, f"{name} must be valid Unicode text (no lone surrogates), got {shorten(value)}")


_PATH_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")  # RFC 3986 pchar and "/", no %-escape


def url_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a mount path a request reaches (None: it can).

    A request's path arrives decoded, so a ``%``-escape in a mount path never matches
    it; ``.`` and ``..`` segments are resolved away by clients, and an empty segment,
    a control character, a space, ``?``, ``#`` or ``\\`` cannot be meant. Non-ASCII
    text is allowed (a client sends it %-encoded as UTF-8) if it is valid Unicode.
    """
    if not encodable(path):
        return "it is not valid Unicode text (a lone surrogate)"
    ascii_part = "".join(char for char in path if char.isascii())
    if not _PATH_CHARACTERS.fullmatch(ascii_part):
        bad_char = next(char for char in ascii_part if not _PATH_CHARACTERS.fullmatch(char))
        return f"it contains {bad_char!r} (a request's path arrives decoded: no %-escapes, spaces or controls)"
    if any(not char.isprintable() for char in path if not char.isascii()):
        return "it contains a control or unprintable character"
    segments = path.strip("/").split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return "it has an empty, '.' or '..' segment"
    return None


# -- responses ------------------------------------------------------------------------------------------


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


def load_json(raw: bytes | str) -> object:
    """``json.loads``; raises ValueError for anything it cannot decode, too deep nesting included."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeDecodeError as error:
        raise ValueError(str(error)) from None


def respond(status: int, data: object, headers: Iterable[tuple[str, str]] = ()) -> AdminResponse:
    """``data`` as a JSON response, never cached nor sniffed."""
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


def error_response(error: HttpError) -> AdminResponse:
    """``{"error": {"code", "message"[, "parameter"]}}`` with the error's status and headers."""
    detail: dict[str, object] = {"code": error.code, "message": error.message}
    if error.parameter is not None:
        detail["parameter"] = error.parameter
    return respond(error.status, {"error": detail}, error.headers)


# Built once: answering it cannot fail.
INTERNAL_ERROR = error_response(HttpError(500, "internal_error", "internal error; see the server log"))


# -- reading the environ --------------------------------------------------------------------------------


def from_wsgi(text: str, parameter: str = "path") -> str:
    """WSGI hands paths as latin-1 decoded bytes (PEP 3333); recover the UTF-8 text.

    Bytes that are not UTF-8 (``%ff``, an encoded lone surrogate) are a 400 naming
    ``parameter``, as a query string that is not UTF-8 is: never a route run on their
    latin-1 text. A str holding characters past U+00FF was not decoded that way
    (framework glue passed real text): it is returned as it is.
    """
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        return text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        shown = shorten(quote(raw, safe="/"))
        raise bad(parameter, f"the {parameter} is not valid UTF-8, got {shown}") from None


def header_bytes(value: str) -> bytes:
    """The bytes of a header value as WSGI hands it (latin-1 decoded, PEP 3333).

    A str holding characters past U+00FF was not decoded that way (framework glue passed
    real text): its UTF-8 bytes then.
    """
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")


def read_body(environ: WSGIEnvironment) -> bytes:
    """At most MAX_BODY_SIZE + 1 bytes of the body: Content-Length of them, or to the end when terminated."""
    declared = str(environ.get("CONTENT_LENGTH") or "").strip()
    if declared:
        if not re.fullmatch(r"[0-9]+", declared):
            raise HttpError(400, "bad_request", f"Content-Length is not a whole number: {shorten(declared)}")
        length = int(declared) if len(declared) <= 18 else MAX_BODY_SIZE + 1
        if length > MAX_BODY_SIZE:
            raise HttpError(413, "body_too_large", f"request body over {MAX_BODY_SIZE} bytes")
    elif environ.get("wsgi.input_terminated"):
        length = MAX_BODY_SIZE + 1  # no length (chunked): read to the end, at most one byte too many
    else:
        return b""
    if length == 0:
        return b""
    try:
        body = environ["wsgi.input"].read(length)
    except (OSError, ValueError) as error:
        raise HttpError(400, "bad_request", f"the request body could not be read: {error}") from None
    if not isinstance(body, bytes):
        raise TypeError(f"wsgi.input.read() returned {type(body).__name__}, not bytes")
    return body


def wsgi_host(environ: WSGIEnvironment) -> str | None:
    """The request's host[:port]: the Host header, else SERVER_NAME:SERVER_PORT (PEP 3333)."""
    host = environ.get("HTTP_HOST")
    if host:
        return str(host)
    name, port = environ.get("SERVER_NAME"), environ.get("SERVER_PORT")
    return f"{name}:{port}" if name and port else None


# -- the cross-site check -------------------------------------------------------------------------------


def refuse_cross_site(origin: str | None, sec_fetch_site: str | None, host: str | None) -> None:
    """403 for a mutation a browser sent from another site (see "Cross-site requests" in the admin docs)."""
    if sec_fetch_site is not None and sec_fetch_site.strip().lower() not in _SAME_ORIGIN_FETCH_SITES:
        raise HttpError(403, "cross_site_request", f"refused a cross-site request (Sec-Fetch-Site: "
                        f"{shorten(sec_fetch_site)}); send it from the same origin or without a browser")  # fmt: skip
    if origin is not None and not _same_origin(origin, host):
        raise HttpError(403, "cross_site_request", f"refused a cross-site request: Origin {shorten(origin)} is "
                        f"not this host ({shorten(host)})")  # fmt: skip


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
