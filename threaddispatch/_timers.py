"""One delay queue for everything that comes due by time: retries, ``put_later`` entries, timers.

:class:`DelayQueue` is a heap of ``(due, seq, handle)`` on a monotonic clock, with
cancel by handle, ``pop_due(now)`` and ``next_due()``. It is meant to replace the
three heaps the faces keep today (``BatchEngine._scheduled``, AsyncDispatcher's retry
heap, RequestDispatcher's retry heap), each of which lives under its owner's one lock
and is waited on by the owner's own loop through a Condition on that lock.

Locking: the queue has no lock of its own. It is built on a ``threading.Condition``
(``condition=``: the owner's, so the queue shares the owner's one lock; or a new one)
and the caller must hold that Condition's lock for every method call. That keeps the
owner's invariant "one mutex guards all my state" (CPython ``queue.py``'s model) and
costs nothing extra per push. :meth:`DelayQueue.push` notifies the Condition when the
new entry became the earliest, so a loop waiting "until next_due()" re-computes its wait.

Why the queue owns no thread: every face that needs timers already has a thread that
waits on a Condition for other reasons (the engine's worker waits for windows, the
async loop for messages, the request timer for the connectivity probe), and each
computes its wait as ``min(own timeout, next_due() - now)``. A single shared timer
thread would have to call back into every face to release what came due: a second
thread taking each face's lock, a cross-component lock order to keep, a thread to
restart after fork and to keep out of the exit drain, and one slow face delaying
every other face's timers. It would save one thread only for the request timer.

Time: due times are on ``clock`` (``time.monotonic`` unless a test injects one);
:meth:`DelayQueue.wait_due` waits in real seconds, so tests with an injected clock
use ``pop_due``/``next_due`` and leave the waiting to their own code.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from threaddispatch._validate import check_seconds, show
from threaddispatch.errors import ConfigurationError

__all__ = ["DelayQueue", "TimerHandle"]

T = TypeVar("T")

# A heap this many entries long, more than half of them cancelled, is rebuilt without them.
_COMPACT_AT = 64


class TimerHandle(Generic[T]):
    """One scheduled entry: what :meth:`DelayQueue.push` returns and :meth:`DelayQueue.cancel` takes.

    ``due`` is the entry's time on the queue's clock. ``active`` is True until the
    entry is popped or cancelled. Read it with the queue's lock held.
    """

    __slots__ = ("_queue", "active", "due", "item")

    def __init__(self, queue: DelayQueue[T], due: float, item: T) -> None:
        self._queue = queue
        self.due = due
        self.item = item
        self.active = True

    def __repr__(self) -> str:
        state = "active" if self.active else "done"
        return f"<TimerHandle due={self.due:.6f} {state} item={show(self.item)}>"


class DelayQueue(Generic[T]):
    """Entries that come due at a time, earliest first (FIFO among equal times); no thread.

    Not thread-safe by itself: hold ``self.condition``'s lock around every call (see
    the module docstring). No method calls user code or blocks, except :meth:`wait_due`.
    """

    def __init__(
        self, condition: threading.Condition | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if condition is not None and not isinstance(condition, threading.Condition):
            raise ConfigurationError(f"condition must be a threading.Condition, got {show(condition)}")
        if not callable(clock):
            raise ConfigurationError(f"clock must be a callable returning seconds, got {show(clock)}")
        self.condition = condition if condition is not None else threading.Condition(threading.Lock())
        self.clock = clock
        # Invariant (under condition's lock): _heap holds every active handle once, plus
        # cancelled ones not yet pruned; _live counts the active ones.
        self._heap: list[tuple[float, int, TimerHandle[T]]] = []
        self._seq = itertools.count()
        self._live = 0

    def __len__(self) -> int:
        """How many entries are scheduled (cancelled ones excluded)."""
        return self._live

    def __bool__(self) -> bool:
        return self._live > 0

    def push(self, item: T, delay: float) -> TimerHandle[T]:
        """Schedule ``item`` ``delay`` seconds (finite, >= 0) from now on the queue's clock."""
        return self.push_at(item, self.clock() + check_seconds("delay", delay))

    def push_at(self, item: T, due: float) -> TimerHandle[T]:
        """Schedule ``item`` at ``due`` on the queue's clock (a finite number; the past is due at once).

        Notifies ``condition`` when the entry became the earliest one.
        """
        if isinstance(due, bool) or not isinstance(due, (int, float)) or not math.isfinite(due):
            raise ConfigurationError(f"due must be a finite number on the queue's clock, got {show(due)}")
        handle = TimerHandle(self, float(due), item)
        heap = self._heap
        heapq.heappush(heap, (handle.due, next(self._seq), handle))
        self._live += 1
        if heap[0][2] is handle:
            self.condition.notify()
        return handle

    def cancel(self, handle: TimerHandle[T]) -> bool:
        """Unschedule ``handle``; returns False if it was already popped or cancelled."""
        if not isinstance(handle, TimerHandle) or handle._queue is not self:
            raise ConfigurationError(f"handle must be a TimerHandle of this queue, got {show(handle)}")
        if not handle.active:
            return False
        handle.active = False
        self._live -= 1
        heap = self._heap
        if len(heap) >= _COMPACT_AT and self._live * 2 < len(heap):
            self._heap = [entry for entry in heap if entry[2].active]
            heapq.heapify(self._heap)
        return True

    def _prune(self) -> None:
        """Drop cancelled entries from the top of the heap."""
        heap = self._heap
        while heap and not heap[0][2].active:
            heapq.heappop(heap)

    def next_due(self) -> float | None:
        """The due time of the earliest entry, or None when nothing is scheduled."""
        self._prune()
        heap = self._heap
        return heap[0][0] if heap else None

    def timeout(self, now: float | None = None) -> float | None:
        """Seconds from ``now`` (default: the clock) until the earliest entry (>= 0), or None if there is none."""
        due = self.next_due()
        if due is None:
            return None
        return max(0.0, due - (self.clock() if now is None else now))

    def pop_due(self, now: float | None = None) -> list[T]:
        """Remove and return the items due by ``now`` (default: the clock), earliest first."""
        if now is None:
            now = self.clock()
        heap = self._heap
        due: list[T] = []
        while heap and heap[0][0] <= now:
            handle = heapq.heappop(heap)[2]
            if handle.active:
                handle.active = False
                self._live -= 1
                due.append(handle.item)
        return due

    def pop_next(self, now: float | None = None) -> TimerHandle[T] | None:
        """Remove and return the earliest entry if it is due by ``now`` (default: the clock; ``math.inf``:
        whatever its time, as a drain does), else None. For loops that take one entry per turn."""
        self._prune()
        heap = self._heap
        if not heap or heap[0][0] > (self.clock() if now is None else now):
            return None
        handle = heapq.heappop(heap)[2]
        handle.active = False
        self._live -= 1
        return handle

    def pop_all(self) -> list[T]:
        """Remove and return every item, due or not, earliest first (for close and drain)."""
        entries = sorted(entry for entry in self._heap if entry[2].active)
        self._heap = []
        self._live = 0
        for entry in entries:
            entry[2].active = False
        return [entry[2].item for entry in entries]

    def clear(self) -> None:
        """Unschedule everything."""
        self.pop_all()

    def wait_due(self, timeout: float | None = None) -> list[T]:
        """Wait until an entry is due, or ``timeout`` seconds (None: no limit), and pop what is due.

        Call with the lock held; it is released while waiting (``Condition.wait``), so a
        ``push`` of an earlier entry, or any ``notify`` of the condition, re-computes the
        wait. Returns [] at the timeout or on a notify with nothing due: the caller's loop
        re-checks its own state then. Every wait is bounded by one deadline.
        """
        deadline = None if timeout is None else time.monotonic() + check_seconds("timeout", timeout)
        until = self.timeout()
        if until is not None and until <= 0:
            return self.pop_due()
        if deadline is not None:
            left = deadline - time.monotonic()
            until = left if until is None else min(until, left)
        if until is None or until > 0:
            self.condition.wait(until)
        return self.pop_due()

    def __repr__(self) -> str:
        return f"<DelayQueue scheduled={self._live}>"
