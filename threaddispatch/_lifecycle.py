"""Process lifecycle shared by every component: one exit drain and one fork hook.

Components register themselves here by weak reference, so registration never keeps
one alive. At interpreter exit one ``atexit`` hook drains every live component
against a single global deadline and logs what was delivered and what was lost.
After ``fork()`` every live component is reset in the child (empty buffers, fresh
locks, a fresh worker), so the parent's work is delivered once, by the parent.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import Protocol

from threaddispatch.backoff import check_seconds

__all__ = ["Lifecycle", "exiting", "get_exit_timeout", "register", "set_exit_timeout"]

_log = logging.getLogger("threaddispatch")


class Lifecycle(Protocol):
    """What a component implements to take part in the exit drain and fork reset."""

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        """Deliver what is pending by ``deadline`` (monotonic); return (delivered, lost). No new thread."""

    def _reset_after_fork(self) -> None:
        """In a forked child: drop the parent's pending work and state; make the component usable."""


# _registry_lock guards _components and _hook_installed. It is replaced in the forked
# child, where a copy held by another parent thread at fork time would never be released.
_registry_lock = threading.Lock()
_components: weakref.WeakSet[Lifecycle] = weakref.WeakSet()
_hook_installed = False
_exit_timeout = 5.0
_exiting = threading.Event()
_MAX_EXIT_PASSES = 5


def set_exit_timeout(seconds: float) -> None:
    """Set the one deadline, in seconds, that the exit drain of all dispatchers shares (default 5)."""
    global _exit_timeout
    _exit_timeout = check_seconds("exit timeout", seconds)


def get_exit_timeout() -> float:
    """The deadline, in seconds, that the exit drain of all dispatchers shares."""
    return _exit_timeout


def exiting() -> bool:
    """True once the interpreter's exit drain has begun: no component may start a thread then."""
    return _exiting.is_set()


def register(component: Lifecycle) -> None:
    """Include ``component`` in the exit drain and the fork reset for as long as it lives."""
    global _hook_installed
    with _registry_lock:
        _components.add(component)
        if not _hook_installed:
            atexit.register(_drain_all_at_exit)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_reset_all_after_fork)
            _hook_installed = True


def unregister(component: Lifecycle) -> None:
    """Leave the exit drain and the fork reset (after a clean close)."""
    with _registry_lock:
        _components.discard(component)


def _snapshot() -> list[Lifecycle]:
    with _registry_lock:
        return list(_components)


def _drain_order(component: Lifecycle) -> int:
    """A component that feeds others (an AsyncDispatcher feeding a BatchedDispatcher) sets an
    optional ``_drain_order`` below 0 so it drains while what it feeds still accepts work."""
    order = getattr(component, "_drain_order", 0)
    return order if isinstance(order, int) else 0


def _drain_all_at_exit() -> None:
    _exiting.set()
    components = sorted(_snapshot(), key=_drain_order)
    if not components:
        return
    deadline = time.monotonic() + _exit_timeout
    delivered = lost = 0
    # A component's delivery may feed another (a send that logs through a batching
    # handler): drain in passes until a pass delivers nothing or the deadline passes.
    for _pass in range(_MAX_EXIT_PASSES):
        delivered_this_pass = lost = 0
        for component in components:
            try:
                sent, missed = component._drain_at_exit(deadline)
            except Exception:  # noqa: BLE001 - one broken component must not stop the others draining
                _log.exception("threaddispatch: exit drain of %r failed", component)
                continue
            delivered_this_pass += sent
            lost += missed
        delivered += delivered_this_pass
        if not delivered_this_pass or time.monotonic() >= deadline:
            break
    if lost:
        _log.warning(
            "threaddispatch: exit drain delivered %d entries and lost %d (exit timeout %.3gs)",
            delivered,
            lost,
            _exit_timeout,
        )
    elif delivered:
        _log.info("threaddispatch: exit drain delivered %d entries", delivered)


def _reset_all_after_fork() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    _exiting.clear()
    for component in list(_components):
        try:
            component._reset_after_fork()
        except Exception:  # noqa: BLE001 - the child must keep running whatever one component does
            _log.exception("threaddispatch: reset of %r after fork failed", component)
