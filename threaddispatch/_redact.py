"""Password redaction for store URLs and DSNs: the one place that knows where a password hides.

Every message, ``repr`` and log line that names a store passes the URL or DSN through
:func:`redact` first; text that may quote one (a driver's error message) goes through
:func:`scrub`. Recognised, in any combination:

- URL userinfo: ``scheme://user:PASSWORD@host`` for any scheme (``postgresql+psycopg``,
  ``mysql``, ``redis://:PASSWORD@``...), also without a scheme (``user:PASSWORD@host``),
  with raw ``@``, ``/`` or ``:`` in the password (it runs to the last ``@``);
- ``key=value`` pairs whose key is ``password``, ``passwd``, ``pwd``, ``pass``,
  ``secret`` or ends in ``password`` (``sslpassword``, ``db_password``), any case, in a
  libpq DSN (``host=x password=PASSWORD``, spaces around ``=``, ``'quoted \\' values'``),
  a URL query string (``?password=PASSWORD&...``) or an ODBC string (``Pwd={PASSWORD};``).

When in doubt it masks more, never less. Pure functions; thread-safe.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["MASK", "passwords", "redact", "scrub"]

MASK = "***"

_SCHEME_USER = re.compile(r"://[^:/?#@\s\[\]]*:")
_BARE_USER = re.compile(r"[^:/?#@\s=]*:")
_SECRET_KEY = re.compile(
    r"(?<![A-Za-z0-9])(?:[A-Za-z0-9_.-]*(?:password|passwd|pwd|secret)|pass)\s*=\s*", re.IGNORECASE
)
_MIN_PIECE = 3
_CLOSING = {"'": "'", '"': '"', "{": "}"}


def _value_end(text: str, start: int, *, in_url: bool) -> int:
    """Where the value starting at ``start`` ends: after its closing quote, else at a separator."""
    if start < len(text) and text[start] in _CLOSING:
        closing = _CLOSING[text[start]]
        index = start + 1
        while index < len(text):
            if text[index] == "\\" and closing != "}":
                index += 2
                continue
            if text[index] == closing:
                return index + 1
            index += 1
        return len(text)  # an unterminated quote: everything after it
    separators = " \t\r\n\f\v&#;" if in_url else " \t\r\n\f\v"
    index = start
    while index < len(text) and text[index] not in separators:
        index += 1
    return index


def _spans(dsn: str, *, bare: bool = True) -> list[tuple[int, int]]:
    """The (start, end) ranges of ``dsn`` that hold a password, merged and in order.

    ``bare``: also read ``user:password@host`` without a scheme (only for a whole DSN:
    in free text a leading ``word:`` is not a user name).
    """
    in_url = "://" in dsn
    found: list[tuple[int, int]] = []
    for match in _SECRET_KEY.finditer(dsn):
        found.append((match.end(), _value_end(dsn, match.end(), in_url=in_url)))
    last_at = dsn.rfind("@")
    user = _SCHEME_USER.search(dsn) if in_url else _BARE_USER.match(dsn) if bare else None
    if user is not None and user.end() <= last_at:
        found.append((user.end(), last_at))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(span for span in found if span[1] > span[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def redact(dsn: str) -> str:
    """``dsn`` (a store URL or DSN) with every password replaced by ``***``; other parts kept."""
    return _mask(dsn, _spans(dsn))


def _mask(dsn: str, spans: list[tuple[int, int]]) -> str:
    parts: list[str] = []
    position = 0
    for start, end in spans:
        parts += [dsn[position:start], MASK]
        position = end
    parts.append(dsn[position:])
    return "".join(parts)


def passwords(dsn: str) -> list[str]:
    """The passwords in ``dsn`` as written, unquoted and percent-decoded; longest first.

    Also the pieces (3+ characters) of a password split at ``@ / : ? #``, which another
    parser may have read as a host or path.
    """
    found: set[str] = set()
    for start, end in _spans(dsn):
        raw = dsn[start:end]
        found |= {raw, unquote(raw)}
        # A driver may split a raw "pa@ss/word" elsewhere than we do: hide its pieces too.
        found |= {piece for piece in re.split(r"[@/:?#]", raw) if len(piece) >= _MIN_PIECE}
        if len(raw) >= 2 and raw[0] in _CLOSING:
            inner = raw[1:-1] if raw[-1] == _CLOSING[raw[0]] else raw[1:]
            found |= {inner, re.sub(r"\\(.)", r"\1", inner)}
    return sorted((secret for secret in found if secret), key=len, reverse=True)


def scrub(text: str, dsn: str) -> str:
    """``text`` with every password of ``dsn`` masked, and any DSN-shaped password in it too.

    For messages built by other code (a driver's error) that may quote the DSN.
    """
    for secret in passwords(dsn):
        text = text.replace(secret, MASK)
    return _mask(text, _spans(text, bare=False))
