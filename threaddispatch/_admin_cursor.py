"""The admin app's pagination: opaque keyset cursors and the page they lead to.

A cursor is URL-safe base64 of a small JSON object naming the listing (``kind``), the
filters it was made for, the last item's ``(id, timestamp)`` anchor and its position.
:func:`keyset_page` reads ``limit`` and ``cursor`` from a request, fetches one item more
than a page and returns the page with the cursor of the next one. Stateless; thread-safe.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

from threaddispatch._admin_params import INT64_MAX, Request
from threaddispatch._wsgi import HttpError, bad, check_text, load_json

#: Items per page when ``limit`` is not given, and the most a page may hold.
DEFAULT_LIMIT = 50
MAX_LIMIT = 500

T = TypeVar("T")
Anchor = tuple[str, float]


def encode_cursor(kind: str, filters: list[object], anchor: Anchor, position: int) -> str:
    """The cursor of the page after ``anchor``, the item at ``position`` of listing ``kind`` with ``filters``."""
    data = {"v": 1, "k": kind, "f": filters, "a": [anchor[0], anchor[1]], "p": position}
    raw = json.dumps(data, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(text: str, kind: str, filters: list[object]) -> tuple[Anchor, int]:
    """``(anchor, position)`` of a cursor :func:`encode_cursor` made for ``kind`` and ``filters``; else a 400."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = load_json(raw)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        anchor_id, anchor_time = data["a"]
        position = data["p"]
        valid = (
            data.get("v") == 1 and data.get("k") == kind and isinstance(anchor_id, str) and anchor_id != ""
            and isinstance(anchor_time, (int, float)) and not isinstance(anchor_time, bool)
            and math.isfinite(anchor_time)  # OverflowError for an int past float
            and isinstance(position, int) and not isinstance(position, bool) and 0 <= position <= INT64_MAX
        )  # fmt: skip
        if valid:
            check_text("cursor", anchor_id)
        given_filters = data.get("f")
    except (binascii.Error, ValueError, TypeError, KeyError, OverflowError, HttpError):
        valid = False
    if not valid:
        raise bad("cursor", "cursor is not a cursor this listing returned")
    if given_filters != filters:
        raise bad("cursor", "cursor was returned for other filters; repeat the same filters or drop the cursor")
    return (anchor_id, float(anchor_time)), position


def keyset_page(
    request: Request,
    kind: str,
    filters: list[object],
    fetch: Callable[[Anchor | None, int, int], Sequence[T]],
    anchor_of: Callable[[T], Anchor],
) -> tuple[Sequence[T], str | None]:
    """The page the request's ``limit`` and ``cursor`` ask for, and the next page's cursor (None: the last page).

    ``fetch(after, limit, position)`` lists the items after the anchor ``after``.
    """
    limit = request.integer("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    assert limit is not None
    cursor = request.text("cursor")
    after, position = decode_cursor(cursor, kind, filters) if cursor else (None, 0)
    items = fetch(after, limit + 1, position)  # one more: is there a next page?
    page = items[:limit]
    if len(items) <= limit:
        return page, None
    return page, encode_cursor(kind, filters, anchor_of(page[-1]), position + len(page))
