"""RequestDispatcher's default key functions: the queue key (method, endpoint, query) and the dedupe key."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import cast
from urllib.parse import urlencode

from threaddispatch.errors import ConfigurationError

__all__ = ["default_dedupe_key", "default_queue_key"]


def default_queue_key(request: object) -> str:
    """The queue key of a request: method, endpoint and sorted query, as in ``"GET /users?a=1&b=2"``.

    A mapping is read through its ``method`` (default ``"GET"``), ``endpoint`` (or
    ``url``) and ``query`` (or ``params``: a mapping, pairs, or a string) items; any
    other object through attributes of those names; a ``str`` request is its own key.
    Query parameters are sorted, so their order does not split a queue. Raises
    ConfigurationError for a request with no endpoint: pass ``queue_key=`` then.
    Pure and thread-safe.
    """
    if isinstance(request, str):
        return request

    def field(*names: str) -> object:
        for name in names:
            value = request.get(name) if isinstance(request, Mapping) else getattr(request, name, None)
            if value is not None:
                return value
        return None

    endpoint = field("endpoint", "url")
    if not isinstance(endpoint, str):
        raise ConfigurationError(
            f"cannot derive a queue key from {request!r}: it has no str endpoint (or url); pass queue_key="
        )
    method = field("method")
    key = f"{str(method).upper() if method is not None else 'GET'} {endpoint}"
    query = field("query", "params")
    if query:
        if isinstance(query, str):
            pairs = sorted(part for part in query.lstrip("?").split("&") if part)
            encoded = "&".join(pairs)
        else:
            items = query.items() if isinstance(query, Mapping) else query
            encoded = urlencode(sorted((str(k), str(v)) for k, v in cast("Sequence[tuple[object, object]]", items)))
        if encoded:
            key += ("&" if "?" in endpoint else "?") + encoded
    return key


def default_dedupe_key(request: object) -> str:
    """What makes two requests of one queue the same call: the request's canonical JSON (sorted keys), or its ``repr``.

    A ``str`` request is its own key. Two requests whose keys differ are never joined,
    so a ``repr`` that includes an address only loses deduplication, never mixes calls.
    Pure and thread-safe.
    """
    if isinstance(request, str):
        return request
    try:
        return json.dumps(request, sort_keys=True, separators=(",", ":"), default=repr)
    except (TypeError, ValueError, RecursionError):
        return repr(request)
