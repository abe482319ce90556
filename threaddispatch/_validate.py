"""Argument checks for the faces, the job engine and its stores: one function per check.

Each returns the checked value or raises :class:`~threaddispatch.errors.ConfigurationError`
naming the argument and the bad value (shortened when long). Integers are bounded by the
stores' signed 64-bit columns, so a value that passes here never overflows a store.
"""

from __future__ import annotations

import math
import os
import threading

from threaddispatch._show import show
from threaddispatch.errors import ConfigurationError

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_WAIT",
    "check_bool",
    "check_int",
    "check_path",
    "check_positive_number",
    "check_seconds",
    "check_text",
    "check_wait",
    "encodable",
    "show",
]

#: The range of the stores' integer columns (SQLite INTEGER, PostgreSQL BIGINT).
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

#: The longest timeout or interval a thread waits for, in seconds: 1e9 (about 31 years), or
#: ``threading.TIMEOUT_MAX`` where that is lower (Windows: about 49.7 days). A longer wait raises
#: OverflowError in ``Lock.acquire``/``Condition.wait``, so :func:`check_wait` refuses it at the call.
MAX_WAIT = min(1e9, threading.TIMEOUT_MAX)


def check_int(name: str, value: object, minimum: int = INT64_MIN, maximum: int = INT64_MAX) -> int:
    """``value`` if it is an int (not a bool) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigurationError(f"{name} must be an int from {minimum} to {maximum}, got {show(value)}")
    return value


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1 (not a bool), else ConfigurationError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, got {show(value)}")
    return value


def check_seconds(name: str, value: object, *, allow_zero: bool = True) -> float:
    """``value`` as float seconds: a finite real number >= 0 (> 0 unless ``allow_zero``), not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number of seconds, got {show(value)}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{name} must be a finite number {bound}, got {show(value)}")
    return seconds


def check_wait(name: str, value: object, *, allow_zero: bool = True) -> float:
    """``value`` as float seconds a thread will wait: as :func:`check_seconds`, and at most :data:`MAX_WAIT`."""
    seconds = check_seconds(name, value, allow_zero=allow_zero)
    if seconds > MAX_WAIT:
        raise ConfigurationError(
            f"{name} must be at most {MAX_WAIT:.0f} seconds (the longest a thread can wait), got {show(value)}"
        )
    return seconds


def check_positive_number(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number > 0 (not a bool; an int past float range is not finite)."""
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
        if 0 < number < math.inf:
            return number
    raise ConfigurationError(f"{name} must be a finite number > 0, got {show(value)}")


def check_path(name: str, value: object) -> str:
    """``value`` (a str or an ``os.PathLike`` giving one) as a non-empty file path without NUL that encodes as UTF-8.

    A lone surrogate (``os.fsdecode`` of undecodable bytes) is refused: SQLite cannot open such a path.
    """
    path = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(path, str) or not path:
        raise ConfigurationError(f"{name} must be a file path, got {show(value)}")
    if "\x00" in path:
        raise ConfigurationError(f"{name} must be a file path without NUL characters, got {show(value)}")
    if not path.isascii() and not encodable(path):
        raise ConfigurationError(f"{name} must be a file path SQLite can open (no lone surrogates), got {show(value)}")
    return path


def encodable(value: str) -> bool:
    """Whether ``value`` encodes as UTF-8: False when it holds a lone surrogate (``"\\ud800"``).

    ``os.fsdecode``, ``sys.argv`` and the environment make lone surrogates of undecodable
    bytes; neither SQLite nor PostgreSQL can store one. ASCII text is answered without encoding.
    """
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(name: str, value: object, *, strip: bool = False) -> str:
    """``value`` if it is a non-empty str without NUL characters (and, with ``strip``, without surrounding spaces)
    that encodes as UTF-8 (no lone surrogate).

    NUL and lone surrogates are refused for every store: PostgreSQL cannot store NUL in text,
    neither SQLite nor PostgreSQL can store a lone surrogate, so every store (memory too) refuses both.
    """
    if not isinstance(value, str) or not value or "\x00" in value or (strip and value != value.strip()):
        extra = " or surrounding spaces" if strip else ""
        raise ConfigurationError(f"{name} must be a non-empty str without NUL characters{extra}, got {show(value)}")
    if not value.isascii() and not encodable(value):  # isascii inline: no call on the hot path
        raise ConfigurationError(f"{name} must be valid Unicode text (no lone surrogates), got {show(value)}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False``; anything else (``"no"``, ``0``, ``None``) raises, never read as truthy.

    Two identity tests: cheap enough for a hot path.
    """
    if value is True or value is False:
        return value is True
    raise ConfigurationError(f"{name} must be a bool (True or False), got {show(value)}")
