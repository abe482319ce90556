"""The immediate switch: whether the batching faces run their work on the caller's thread.

``threaddispatch.testing.immediate()`` turns it on for a ``with`` block (for tests and
serverless handlers, like celery's ``task_always_eager`` or PostHog's ``sync_mode``). A
face that supports it implements ``_set_immediate(on: bool) -> None`` and registers with
:mod:`threaddispatch._lifecycle`; :func:`switch` calls that on every live component, and a
face made while the switch is on calls it from its constructor (``if active(): ...``), so
no face pays for the switch on its hot path: it swaps its own methods instead.
"""

from __future__ import annotations

import threading

from threaddispatch import _lifecycle

__all__ = ["active", "switch"]

# _depth counts the immediate() blocks open in this process; guarded by _lock. Nested and
# concurrent blocks are allowed: the switch is on while any block is open.
_lock = threading.Lock()
_depth = 0


def active() -> bool:
    """Whether an ``immediate()`` block is open in this process."""
    return _depth > 0


def switch(on: bool) -> None:
    """Open (``on``) or close one immediate block; on the first open and the last close, tell every
    live component that has ``_set_immediate``. Never calls user code; does not block."""
    global _depth
    with _lock:
        before = _depth > 0
        _depth = _depth + 1 if on else max(0, _depth - 1)
        after = _depth > 0
        if before == after:
            return
        components = _lifecycle._snapshot()
    for component in components:
        set_immediate = getattr(component, "_set_immediate", None)
        if set_immediate is not None:
            set_immediate(after)


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()


_lifecycle.at_fork_child(_reset_after_fork)
