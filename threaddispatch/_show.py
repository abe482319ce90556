"""``show``: a value as error messages quote it (shortened, never raising): its one job.

Its own module, importing nothing of the package, so that :mod:`threaddispatch.errors`
(which every module imports) can use it without an import cycle.
"""

from __future__ import annotations

__all__ = ["show"]

_SHOWN = 200  # characters of a bad value quoted in a message


def show(value: object) -> str:
    """``repr(value)`` for an error message, shortened past 200 characters (huge ints included)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 600:
        return f"<int of {value.bit_length()} bits>"  # repr may exceed sys.get_int_max_str_digits
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= _SHOWN else f"{text[: _SHOWN - 3]}..."
