"""Process lifecycle shared by every component: one exit drain, one fork hook, one way to close.

Components register themselves here by weak reference, so registration never keeps
one alive. At interpreter exit one ``atexit`` hook drains every live component
against a single global deadline and logs what was delivered and what was lost.
After ``fork()`` every live component is reset in the child (empty buffers, fresh
locks, a fresh worker), so the parent's work is delivered once, by the parent.

Fork hook order: just before ``fork()`` every component that has ``_prepare_for_fork``
quiesces (a store takes its own locks so that no thread is inside a library call that
the child could inherit half-done); after the fork the parent calls
``_resume_after_fork`` on those components in reverse order, and the child calls
``_reset_after_fork`` on every component. A ``_prepare_for_fork`` takes only its own
component's locks, never while holding another's, and no thread holds two components'
locks at once: so the order components are prepared in cannot deadlock.

Module state that a forked child must renew (a module-wide lock, an id prefix, a loop
generation) registers a function with :func:`at_fork_child`; in the child those run
first, in registration order, then the components reset: so a component's reset may
rely on fresh module state. The one ``os.register_at_fork`` is installed when this
module is imported; the ``atexit`` drain only when the first component registers, so
importing the package never puts a hook ahead of the user's own ``atexit`` hooks.

:class:`Closing` is the one implementation of what every face does to be closed: a
context manager, an idempotent ``close(timeout)`` that validates its timeout, a
``closed`` property, and a close begun by the garbage collector (never at exit, where
the drain has the component) that must not block nor take a lock.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, TypeVar

from threaddispatch._validate import check_wait

__all__ = [
    "Closing",
    "Lifecycle",
    "at_fork_child",
    "drained",
    "exiting",
    "get_exit_timeout",
    "register",
    "set_exit_timeout",
]

_log = logging.getLogger("threaddispatch")


class Lifecycle(Protocol):
    """What a component implements to take part in the exit drain and fork reset."""

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        """Deliver what is pending by ``deadline`` (monotonic); return (delivered, lost). No new thread."""

    def _reset_after_fork(self) -> None:
        """In a forked child: drop the parent's pending work and state; make the component usable."""


# Optional, looked up with getattr (a component without them is only reset in the child):
#   _prepare_for_fork(self) -> None: just before fork(), in the forking thread; quiesce and
#       take the component's own locks, each wait bounded; never call user code.
#   _resume_after_fork(self) -> None: in the parent after fork(); release what prepare took.
#   _after_exit_drain(self) -> None: once, after the exit drain's last pass (so a delivery
#       of one pass may still feed it in the next): refuse what would now never be
#       delivered. Never blocks unbounded, never calls user code.


# _registry_lock guards _components and _atexit_installed. It is replaced in the forked
# child, where a copy held by another parent thread at fork time would never be released.
_registry_lock = threading.Lock()
_components: weakref.WeakSet[Lifecycle] = weakref.WeakSet()
_atexit_installed = False
# Called in a forked child before any component resets, in registration order. Appended
# only at import time of the modules that own the state (under the import lock), read
# only in the child: no lock.
_child_hooks: list[Callable[[], None]] = []
_exit_timeout = 5.0
_exiting = threading.Event()
_drained = threading.Event()  # set after the drain's last pass, before the after-drain hooks run
_MAX_EXIT_PASSES = 5
# The components prepared for a fork in progress, by forking thread (two threads may fork
# at once: the second one's preparation waits on the locks the first one holds). Each
# entry is touched only by its own thread, between its before and after hooks.
_prepared: dict[int, list[Lifecycle]] = {}


def set_exit_timeout(seconds: float) -> None:
    """Set the one deadline, in seconds, that the exit drain of all dispatchers shares (default 5).

    From 0 to ``MAX_WAIT`` (``check_wait``): the drain waits that long, so a longer one is refused here.
    """
    global _exit_timeout
    _exit_timeout = check_wait("exit timeout", seconds)


def get_exit_timeout() -> float:
    """The deadline, in seconds, that the exit drain of all dispatchers shares."""
    return _exit_timeout


def exiting() -> bool:
    """True once the interpreter's exit drain has begun: no component may start a thread then."""
    return _exiting.is_set()


def drained() -> bool:
    """True once the interpreter's exit drain has ended: what a component accepts now nothing delivers."""
    return _drained.is_set()


def at_fork_child(renew: Callable[[], None]) -> None:
    """Call ``renew()`` in every forked child, before any component resets. Never blocks.

    For module state a child must not inherit (a lock a parent thread may hold at fork
    time, a per-process id prefix). ``renew`` must not raise; if it does, the error is
    logged and the other hooks still run.
    """
    _child_hooks.append(renew)


def register(component: Lifecycle) -> None:
    """Include ``component`` in the exit drain and the fork reset for as long as it lives."""
    global _atexit_installed
    with _registry_lock:
        _components.add(component)
        if not _atexit_installed:
            # Installed at first use, not at import: atexit runs hooks last-in first-out,
            # so the drain runs before the atexit hooks the user registered before it.
            atexit.register(_drain_all_at_exit)
            _atexit_installed = True


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
    try:
        _drain_passes()
    finally:
        _drained.set()
        # A fresh snapshot: a component made during the passes is included.
        for component in _snapshot():
            after = getattr(component, "_after_exit_drain", None)
            if after is None:
                continue
            try:
                after()
            except Exception:  # noqa: BLE001 - one broken component must not stop the others
                _log.exception("threaddispatch: closing %r after the exit drain failed", component)


def _drain_passes() -> None:
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


def _prepare_all_for_fork() -> None:
    prepared: list[Lifecycle] = []
    _prepared[threading.get_ident()] = prepared
    for component in _snapshot():
        prepare = getattr(component, "_prepare_for_fork", None)
        if prepare is None:
            continue
        try:
            prepare()
        except Exception:  # noqa: BLE001 - the fork goes on whatever one component does
            _log.exception("threaddispatch: preparing %r for fork failed", component)
            continue
        prepared.append(component)


def _resume_all_after_fork() -> None:
    for component in reversed(_prepared.pop(threading.get_ident(), [])):
        try:
            component._resume_after_fork()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - the parent must keep running whatever one component does
            _log.exception("threaddispatch: resuming %r after fork failed", component)


def _reset_all_after_fork() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    _prepared.clear()  # the child resets every component, prepared or not
    _exiting.clear()
    _drained.clear()
    for renew in _child_hooks:
        try:
            renew()
        except Exception:  # noqa: BLE001 - the child must keep running whatever one hook does
            _log.exception("threaddispatch: fork hook %r failed", renew)
    for component in list(_components):
        try:
            component._reset_after_fork()
        except Exception:  # noqa: BLE001 - the child must keep running whatever one component does
            _log.exception("threaddispatch: reset of %r after fork failed", component)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_prepare_all_for_fork,
        after_in_parent=_resume_all_after_fork,
        after_in_child=_reset_all_after_fork,
    )


_Self = TypeVar("_Self", bound="Closing")


class Closing:
    """Mixin: context manager, idempotent ``close(timeout)``, and close from a finalizer.

    A face implements two methods and calls :meth:`_init_closing` in its constructor:

    - ``_begin_close()``: runs once, under ``_close_lock``, at the first ``close()``: stop
      intake (so no entry is accepted after it). It must not call user code nor wait.
    - ``_finish_close(deadline)``: runs at every ``close()``, without the lock: deliver
      what is pending and stop the workers by ``deadline`` (monotonic, or None for no
      limit); return whether everything was delivered without a failure.

    ``_init_closing(on_collect, *args)`` arms a ``weakref.finalize``: if the face is
    collected unclosed, ``on_collect(*args)`` begins a close in the background. It runs
    on whatever thread the collector runs on (perhaps one holding the face's locks), so
    it must neither block nor take a lock; it never runs at interpreter exit, where the
    exit drain has the component. ``on_collect`` must not refer to the face itself.
    """

    _closed: bool
    _close_lock: threading.Lock
    _finalizer: weakref.finalize[Any, Any] | None

    def _init_closing(self, on_collect: Callable[..., object] | None = None, *args: object) -> None:
        self._closed = False
        # Guards the open -> closed transition: _closed and what _begin_close changes.
        self._close_lock = threading.Lock()
        self._finalizer = None
        if on_collect is not None:
            finalizer = weakref.finalize(self, on_collect, *args)
            finalizer.atexit = False  # at exit the lifecycle drain has it, and no thread may start
            self._finalizer = finalizer

    def _begin_close(self) -> None:
        raise NotImplementedError

    def _finish_close(self, deadline: float | None) -> bool:
        raise NotImplementedError

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting work, deliver what is pending and stop the workers. Idempotent.

        Blocks up to ``timeout`` seconds (None: no limit), whatever user code does.
        Returns whether everything was delivered in time without a failure. Raises
        ConfigurationError for a ``timeout`` that is not None nor a number from 0 to
        ``MAX_WAIT`` (:func:`~threaddispatch._validate.check_wait`, as every wait), before
        anything changes: a refused close leaves the face open.
        """
        if timeout is not None:
            timeout = check_wait("timeout", timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._begin_close()
                if self._finalizer is not None:
                    self._finalizer.detach()  # closed: nothing left for the collector to do
        return self._finish_close(deadline)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _reset_closing_after_fork(self) -> None:
        """In a forked child: a fresh close lock (a parent thread may have held it at fork)."""
        self._close_lock = threading.Lock()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
