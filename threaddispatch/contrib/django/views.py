"""The Django view in front of the admin app.

CSRF: the view is exempt from Django's CSRF middleware only for a request authenticated
by the admin app's bearer token (an app with a token, a request with
``Authorization: Bearer ...``; the app then checks the token, 401 when wrong): no
browser adds that header to a cross-site request. Every other request (an app built with
``ALLOW_UNAUTHENTICATED`` behind the project's session login, say) goes through
``csrf_protect``, as any Django view relying on cookies does. The admin app's own
cross-site checks (JSON-only bodies, ``Origin``/``Sec-Fetch-Site`` on mutations) apply
to both; see :mod:`threaddispatch.admin`.

With ``ADMIN_AUTH = "staff"`` the Django session decides instead of the token: the view
is ``staff_member_required`` (anyone else is redirected to the admin login) and
``csrf_protect``; a page the admin app serves (the dashboard) sets the CSRF cookie, and a
mutation must send it back as ``X-CSRFToken``, as for any Django session view.
"""

from __future__ import annotations

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import get_token
from django.views.decorators.csrf import csrf_exempt, csrf_protect

from threaddispatch.admin import MAX_BODY_SIZE
from threaddispatch.contrib.django.conf import get_admin_app, get_settings

__all__ = ["admin_api"]


@csrf_exempt
def admin_api(request: HttpRequest, path: str) -> HttpResponse:
    """Answer a request below the include with the admin app (``path`` is the rest of the URL).

    Blocks for the admin app's store calls (and reads at most MAX_BODY_SIZE + 1 bytes of
    the body). Exempt from CSRF only when the bearer token authenticates the request.
    """
    if get_settings().admin_auth == "staff":
        return _answer_staff(request, path)
    if get_admin_app().requires_token and _carries_bearer(request):
        return _answer(request, path)
    return _answer_csrf_protected(request, path)


def _carries_bearer(request: HttpRequest) -> bool:
    scheme, _, _ = str(request.META.get("HTTP_AUTHORIZATION", "")).strip().partition(" ")
    return scheme.lower() == "bearer"


def _answer(request: HttpRequest, path: str) -> HttpResponse:
    full = request.path
    script_name = full[: len(full) - len(path)] if path and full.endswith(path) else full
    meta = request.META
    answer = get_admin_app().handle(
        request.method or "GET",
        "/" + path,
        query=meta.get("QUERY_STRING", ""),
        authorization=meta.get("HTTP_AUTHORIZATION"),
        body=_body(request),
        content_type=meta.get("CONTENT_TYPE"),
        script_name=script_name.rstrip("/"),
        origin=meta.get("HTTP_ORIGIN"),
        sec_fetch_site=meta.get("HTTP_SEC_FETCH_SITE"),
        host=request.get_host(),  # honours ALLOWED_HOSTS and USE_X_FORWARDED_HOST
        accept=meta.get("HTTP_ACCEPT"),
    )
    if any(name.lower() == "content-type" and value.startswith("text/html") for name, value in answer.headers):
        get_token(request)  # the page's mutations send the CSRF cookie back (a session-authenticated page)
    response = HttpResponse(answer.body if request.method != "HEAD" else b"", status=answer.status)
    for name, value in answer.headers:
        if name.lower() != "content-length":
            response[name] = value
    return response


_answer_csrf_protected = csrf_protect(_answer)
_answer_staff = staff_member_required(_answer_csrf_protected)


def _body(request: HttpRequest) -> bytes:
    """The raw body, at most MAX_BODY_SIZE + 1 bytes (the admin app answers 413 past the limit)."""
    if request.content_type == "multipart/form-data":
        # Parsed already (by the CSRF check) or parseable: Django's test client sends an empty
        # multipart form for a bare ``client.post(url)``, which carries no parameter. A form
        # with fields is a body of another type than JSON: handed on non-empty, it gets 415.
        return b"multipart form" if request.POST or request.FILES else b""
    return request.read(MAX_BODY_SIZE + 1)
