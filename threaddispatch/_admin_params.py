"""The admin app's request parameters: query string and JSON body merged, read back through typed getters.

:func:`parse_params` merges the query string and a JSON object body into one mapping,
refusing a repeated, conflicting or ``null`` parameter and a body that is not JSON;
:class:`Request` reads each parameter as text, flag, integer, seconds or job state,
raising a 400 :class:`~threaddispatch._wsgi.HttpError` that names the bad one.
Stateless; thread-safe.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs

from threaddispatch._wsgi import HttpError, bad, check_text, load_json, shorten
from threaddispatch.stores.base import JobState

#: Every number a request gives must fit a signed 64-bit integer (the stores' INTEGER).
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Request:
    """One parsed request: method, path (relative to the app), parameters, mount prefix, its route's path groups."""

    method: str
    path: str
    params: Mapping[str, object]
    script_name: str
    groups: tuple[str, ...] = ()

    def raw(self, name: str) -> object:
        return self.params.get(name)

    def text(self, name: str) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value or value != value.strip():
            raise bad(name, f"{name} must be a non-empty string without surrounding spaces, got {value!r}")
        check_text(name, value)
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
        raise bad(name, f"{name} must be true or false, got {value!r}")

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
            raise bad(name, f"{name} must be a whole number from {low} to {high}, got {shorten(value)}")
        return number

    def seconds(self, name: str) -> float | None:
        value = self.raw(name)
        if value is None:
            return None
        number: float | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = float(value) if 0 <= value <= INT64_MAX else None  # float() of a huge int overflows
        elif isinstance(value, float):
            number = value
        elif isinstance(value, str) and len(value) <= 40:
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number) or not 0 <= number <= INT64_MAX:
            raise bad(name, f"{name} must be a number of seconds from 0 to {INT64_MAX}, got {shorten(value)}")
        return number

    def state(self) -> JobState | None:
        value = self.text("state")
        if value is None:
            return None
        try:
            return JobState(value)
        except ValueError:
            known = ", ".join(s.value for s in JobState)
            raise bad("state", f"unknown job state {value!r}; known: {known}") from None


def _form(text: str, what: str) -> dict[str, object]:
    try:
        parsed = parse_qs(text, keep_blank_values=True, strict_parsing=False, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "bad_request", f"the {what} is not valid UTF-8") from None
    params: dict[str, object] = {}
    for name, values in parsed.items():
        if len(values) > 1:
            raise bad(name, f"parameter {name!r} is given {len(values)} times")
        params[name] = values[0]
    return params


def parse_params(method: str, query: str, body: bytes, content_type: str) -> dict[str, object]:
    """The parameters of the query string and of a JSON object body (POST only), merged."""
    params = _form(query, "query string")
    if not body.strip():
        return params
    if method != "POST":
        raise HttpError(400, "bad_request", f"{method} takes no request body")
    # Only JSON: an HTML form (urlencoded, multipart, text/plain) from another site cannot send it.
    media = content_type.partition(";")[0].strip().lower()
    if media != "application/json":
        raise HttpError(415, "unsupported_media_type", "send a request body as a JSON object with "
                        f"Content-Type: application/json (got {media or 'no Content-Type'}), "
                        "or give the parameters in the query string")  # fmt: skip
    try:
        data = load_json(body)
    except ValueError:
        raise bad("body", "the request body is not JSON (or is nested too deeply)") from None
    if not isinstance(data, dict):
        raise bad("body", "the request body must be a JSON object of parameters")
    for name, value in data.items():
        if value is None:
            raise bad(name, f"parameter {name!r} is null; leave it out or give a value")
        if name in params and params[name] != value:
            raise bad(name, f"parameter {name!r} is given in the query string and the body")
        params[name] = value
    return params
