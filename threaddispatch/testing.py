"""Helpers for testing code that uses threaddispatch (and for threaddispatch's own tests).

Public and supported: import them in your own test suite.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from typing import Generic, TypeVar

from threaddispatch import _immediate
from threaddispatch.errors import ConfigurationError, DispatchTimeoutError

__all__ = ["RecordingDispatcher", "immediate", "live_dispatch_threads", "wait_for"]

R = TypeVar("R")
T = TypeVar("T")


def wait_for(predicate: Callable[[], R], timeout: float = 5.0, *, interval: float = 0.002, message: str = "") -> R:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Blocks up to ``timeout`` seconds, then raises DispatchTimeoutError (a TimeoutError)
    naming ``message``. Use it instead of ``sleep()``-then-assert.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DispatchTimeoutError(f"condition not met within {timeout}s: {message or predicate!r}")
        time.sleep(min(interval, remaining))


@contextlib.contextmanager
def immediate() -> Iterator[None]:
    """Run the batching faces' work on the caller's thread while the block is open (tests, serverless).

    ``with immediate():`` (or ``@immediate()`` on a function) makes every
    BackgroundDispatcher (and so every logging BatchingHandler), BatchedDispatcher and
    AsyncDispatcher, live or made inside the block, send each entry before the call that
    gave it (``enqueue``, ``submit``, ``emit``, ``put``) returns, on that thread, as
    ``JobEngine(immediate=True)`` does for jobs. Retries, ``Retry``/``Cancel``, error
    handlers, ``submit()`` Futures and ``stats()`` behave as usual, with these differences:
    a retry goes at once (the backoff and a ``Retry(delay=...)`` are not waited for); a
    per-call timeout cannot interrupt the caller, so a call that ran past it fails with
    DispatchTimeoutError when it returns; a BatchedDispatcher's ``hold_delays`` delay is
    not waited for (the message is sent at once). Entries a face holds when the block
    opens go first, in order, at its first call inside the block. Blocks may nest and
    may be open on several threads: the switch is process-wide and stays on until the
    last one closes. Opening and closing never block.
    """
    _immediate.switch(True)
    try:
        yield
    finally:
        _immediate.switch(False)


def live_dispatch_threads() -> list[threading.Thread]:
    """Threads started by threaddispatch (named ``threaddispatch-*``) that are still alive."""
    return [t for t in threading.enumerate() if t.name.startswith("threaddispatch-") and t.is_alive()]


def _message_key(message: object) -> object:
    """Messages are told apart by equality, or by identity when they are not hashable."""
    try:
        hash(message)
    except TypeError:
        return ("id", id(message))
    return ("eq", message)


def _default_error(message: object) -> BaseException:
    return RuntimeError(f"RecordingDispatcher: {message!r} was set to fail")


class RecordingDispatcher(Generic[T]):
    """A :class:`~threaddispatch.buffered.Dispatcher` for tests: records messages per target, fails chosen ones.

    ``dispatch`` records the message under its target (and its ``delay_seconds``, see
    :meth:`delays`) and returns an id (``"msg-1"``, ``"msg-2"``, ...), or raises for a
    message chosen to fail. Choose with ``fail``: a predicate ``message -> bool`` or a
    collection of messages (compared by equality). ``fail_times`` makes a chosen message
    fail that many times and then go through (None: fail every time); ``error`` builds
    the exception raised for a message (default: a RuntimeError naming it). With
    ``with_submit=True`` it also has ``submit(message, target) -> Future``, resolved
    before it returns, so :class:`~threaddispatch.buffered.AsyncDispatcher` takes its
    submit path.

    Thread-safe; nothing blocks except :meth:`wait_for_count`. The predicate and
    ``error`` are called without the recorder's lock held.
    """

    submit: Callable[..., Future[str | None]]  # set only with with_submit=True

    def __init__(
        self,
        *,
        fail: Callable[[T], bool] | Collection[T] | None = None,
        fail_times: int | None = None,
        error: Callable[[T], BaseException] | None = None,
        with_submit: bool = False,
    ) -> None:
        # _lock guards every field below; fail rules are swapped whole under it.
        self._lock = threading.Lock()
        self._sent: list[tuple[str, T]] = []
        self._delays: list[tuple[str, int | None]] = []  # one per entry of _sent
        self._failures: list[tuple[str, T, BaseException]] = []
        self._attempts: dict[object, int] = {}
        self._serial = 0
        self._submits = 0
        self._fail: Callable[[T], bool] | None = None
        self._fail_times: int | None = None
        self._error: Callable[[T], BaseException] = _default_error
        self.set_failing(fail, fail_times=fail_times, error=error)
        if with_submit:
            self.submit = self._submit

    def set_failing(
        self,
        fail: Callable[[T], bool] | Collection[T] | None,
        *,
        fail_times: int | None = None,
        error: Callable[[T], BaseException] | None = None,
    ) -> None:
        """Choose which messages fail from now on (None: none), how often, and with what error."""
        predicate: Callable[[T], bool] | None
        if fail is None or callable(fail):
            predicate = fail
        elif isinstance(fail, Collection):
            chosen: Collection[T]
            try:
                chosen = frozenset(fail)
            except TypeError:  # unhashable messages: compare one by one
                chosen = list(fail)
            predicate = chosen.__contains__
        else:
            raise ConfigurationError(f"fail must be a predicate, a collection of messages or None, got {fail!r}")
        if fail_times is not None and (
            isinstance(fail_times, bool) or not isinstance(fail_times, int) or fail_times < 1
        ):
            raise ConfigurationError(f"fail_times must be an int >= 1 or None, got {fail_times!r}")
        if error is not None and not callable(error):
            raise ConfigurationError(f"error must be callable message -> exception, got {error!r}")
        with self._lock:
            self._fail = predicate
            self._fail_times = fail_times
            self._error = _default_error if error is None else error

    def dispatch(self, message: T, target: str, *, delay_seconds: int | None = None) -> str:
        """Record ``message`` for ``target`` and return its id, or raise if it was chosen to fail."""
        if not isinstance(target, str) or not target:
            raise ConfigurationError(f"target must be a non-empty str, got {target!r}")
        with self._lock:
            predicate, fail_times, make_error = self._fail, self._fail_times, self._error
        chosen = predicate is not None and bool(predicate(message))
        key = _message_key(message)
        with self._lock:
            attempt = self._attempts.get(key, 0) + 1
            self._attempts[key] = attempt
            if not chosen or (fail_times is not None and attempt > fail_times):
                self._serial += 1
                self._sent.append((target, message))
                self._delays.append((target, delay_seconds))
                return f"msg-{self._serial}"
        error = make_error(message)
        with self._lock:
            self._failures.append((target, message, error))
        raise error

    def _submit(self, message: T, target: str, *, delay_seconds: int | None = None) -> Future[str | None]:
        """Like :meth:`dispatch`, but return a Future (already resolved) with the id or the error."""
        future: Future[str | None] = Future()
        with self._lock:
            self._submits += 1
        try:
            future.set_result(self.dispatch(message, target, delay_seconds=delay_seconds))
        except Exception as error:  # noqa: BLE001 - delivered through the Future, as a real submit would
            future.set_exception(error)
        return future

    @property
    def submits(self) -> int:
        """How many messages came through ``submit`` (0 without ``with_submit``)."""
        return self._submits

    def messages(self, target: str | None = None) -> list[T]:
        """Messages dispatched successfully to ``target`` (None: to any target), in arrival order."""
        with self._lock:
            return [message for to, message in self._sent if target is None or to == target]

    def delays(self, target: str | None = None) -> list[int | None]:
        """The ``delay_seconds`` each message of :meth:`messages` came with (None: none), in the same order."""
        with self._lock:
            return [delay for to, delay in self._delays if target is None or to == target]

    def targets(self) -> list[str]:
        """Targets that received at least one message, in order of their first message."""
        with self._lock:
            return list(dict.fromkeys(to for to, _message in self._sent))

    def failures(self, target: str | None = None) -> list[tuple[T, BaseException]]:
        """``(message, error)`` for every failed dispatch to ``target`` (None: any target), in order."""
        with self._lock:
            return [(message, error) for to, message, error in self._failures if target is None or to == target]

    def attempts(self, message: T) -> int:
        """How many times ``message`` was dispatched, failures included."""
        with self._lock:
            return self._attempts.get(_message_key(message), 0)

    def count(self, target: str | None = None) -> int:
        """How many messages were dispatched successfully to ``target`` (None: to any target)."""
        with self._lock:
            if target is None:
                return len(self._sent)
            return sum(1 for to, _message in self._sent if to == target)

    def wait_for_count(self, count: int, target: str | None = None, timeout: float = 5.0) -> None:
        """Block until at least ``count`` messages were dispatched to ``target``.

        Waits up to ``timeout`` seconds, then raises DispatchTimeoutError.
        """
        wait_for(lambda: self.count(target) >= count, timeout, message=f"{count} message(s) to {target!r}")

    def clear(self) -> None:
        """Forget every record and attempt count (the failure rules stay)."""
        with self._lock:
            self._sent.clear()
            self._delays.clear()
            self._failures.clear()
            self._attempts.clear()

    def __repr__(self) -> str:
        with self._lock:
            return f"<RecordingDispatcher sent={len(self._sent)} failed={len(self._failures)}>"
