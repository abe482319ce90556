"""The Django view in front of the admin app."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from threaddispatch.contrib.django.conf import get_admin_app

__all__ = ["admin_api"]


@csrf_exempt
def admin_api(request: HttpRequest, path: str) -> HttpResponse:
    """Answer a request below the include with the admin app (``path`` is the rest of the URL).

    Blocks for the admin app's store calls. Authentication is the admin app's bearer
    token, not Django's session, hence ``csrf_exempt``.
    """
    full = request.path
    script_name = full[: len(full) - len(path)] if path and full.endswith(path) else full
    body, content_type = request.body, request.content_type
    if request.method == "POST" and content_type == "multipart/form-data":
        # Django parsed the form already; hand its fields on as a urlencoded form.
        body, content_type = request.POST.urlencode().encode("utf-8"), "application/x-www-form-urlencoded"
    answer = get_admin_app().handle(
        request.method or "GET",
        "/" + path,
        query=request.META.get("QUERY_STRING", ""),
        authorization=request.META.get("HTTP_AUTHORIZATION"),
        body=body,
        content_type=content_type,
        script_name=script_name.rstrip("/"),
    )
    response = HttpResponse(answer.body if request.method != "HEAD" else b"", status=answer.status)
    for name, value in answer.headers:
        if name.lower() != "content-length":
            response[name] = value
    return response
