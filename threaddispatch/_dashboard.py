"""The admin app's web dashboard: static HTML, CSS and JS shipped in ``threaddispatch/dashboard``, no token needed.

The page is served at the app's base path to a browser (``GET {base}/`` whose ``Accept``
prefers ``text/html`` over JSON; API clients keep getting the JSON route list there), its
assets at ``{base}/ui/<file>``. Neither holds anything secret, so neither needs the token:
the page asks for it and sends it with every API call it makes. The files are read once,
on first use, and kept (immutable bytes; a race reads them twice, harmlessly).

Every answer carries a Content-Security-Policy allowing only this origin's script, style
and fetches (no inline script), ``X-Content-Type-Options: nosniff`` and no framing.
"""

from __future__ import annotations

import html
from importlib import resources

from threaddispatch._wsgi import AdminResponse

#: Where the page's assets are served, under the app's base path.
ASSET_PREFIX = "/ui/"
_TYPES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# File name -> its bytes, filled on first use. Written without a lock: a racing thread stores equal bytes.
_files: dict[str, bytes] = {}


def wants_page(method: str, path: str, accept: str | None) -> bool:
    """Whether a request is for the page: GET/HEAD of ``/`` from a client that prefers HTML to JSON."""
    return method in ("GET", "HEAD") and path in ("", "/") and _prefers_html(accept or "")


def is_asset(method: str, path: str) -> bool:
    """Whether a request is for one of the page's assets (``/ui/<file>``)."""
    return method in ("GET", "HEAD") and path.startswith(ASSET_PREFIX) and path[len(ASSET_PREFIX) :] in _TYPES


def page(script_name: str) -> AdminResponse:
    """The dashboard's HTML, its asset and API addresses under ``script_name`` (where the app is mounted)."""
    text = _read("index.html").decode("utf-8").replace("{{BASE}}", html.escape(script_name, quote=True))
    return _answer(text.encode("utf-8"), "text/html; charset=utf-8", vary=True)


def asset(path: str) -> AdminResponse:
    """One asset's bytes (``path`` as :func:`is_asset` accepted it)."""
    name = path[len(ASSET_PREFIX) :]
    return _answer(_read(name), _TYPES[name], vary=False)


def _read(name: str) -> bytes:
    data = _files.get(name)
    if data is None:
        data = resources.files("threaddispatch").joinpath("dashboard").joinpath(name).read_bytes()
        _files[name] = data
    return data


def _answer(body: bytes, content_type: str, *, vary: bool) -> AdminResponse:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-cache"),
        ("X-Content-Type-Options", "nosniff"),
        ("Content-Security-Policy", _POLICY),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
    ]
    if vary:
        headers.append(("Vary", "Accept"))
    return AdminResponse(200, headers, body)


def _prefers_html(accept: str) -> bool:
    """Whether ``accept`` ranks text/html above application/json (an explicit JSON preference wins ties)."""
    html_q = json_q = 0.0
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        quality = _quality(params)
        media = media.strip().lower()
        if media in ("text/html", "application/xhtml+xml"):
            html_q = max(html_q, quality)
        elif media == "application/json":
            json_q = max(json_q, quality)
    return html_q > json_q


def _quality(params: str) -> float:
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "q":
            try:
                return min(max(float(value), 0.0), 1.0)
            except ValueError:
                return 0.0
    return 1.0
