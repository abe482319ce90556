"""Lanes: the per-key buffers of the batching engine.

A lane holds the entries waiting for one key and the trigger the lock-free
``enqueue`` compares its length with. The engine's lock guards every field except
``append`` and ``len`` on a FIFO lane, which producers call without it (both are
single C calls, atomic under the GIL).

"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Generic, Protocol, TypeVar

from threaddispatch.errors import DispatcherClosedError

__all__ = ["ClosedFifoLane", "FifoLane", "Lane", "PriorityLane"]

T = TypeVar("T")

INACTIVE = 1  # trigger of a lane with no open window: the first append opens one


class Lane(Protocol[T]):
    """What the engine needs of a per-key buffer."""

    key: Hashable
    trigger: int
    deadline: float | None
    due: bool

    def append(self, item: T, /) -> None: ...
    def requeue(self, item: T, /) -> None:
        """Append for the engine itself (a ``put_later`` entry coming due): allowed on a closed lane."""

    def __len__(self) -> int: ...
    def take(self, count: int) -> list[T]: ...
    def drop_newest(self) -> T: ...
    def drop_oldest(self) -> T: ...


class FifoLane(deque[Any]):
    """First in, first out. ``append`` and ``len`` are safe without the engine lock."""

    __slots__ = ("deadline", "due", "key", "owner", "trigger")

    def __init__(self, key: Hashable = None, owner: str = "dispatcher") -> None:
        super().__init__()
        self.key = key
        self.owner = owner  # names the dispatcher in ClosedFifoLane's error
        self.trigger = INACTIVE
        self.deadline: float | None = None  # when the open window closes; None: no window
        self.due = False  # send without waiting for the window (size trigger, flush, close)

    # The lock-free enqueue appends through this name, which only lanes have: a stray
    # positional argument bound in a lane's place raises AttributeError (see background.py).
    lock_free_append = deque.append

    # Not overridden by ClosedFifoLane: the engine's own entries still go.
    requeue = deque.append

    def take(self, count: int) -> list[Any]:
        # starmap calls popleft at C speed with no per-item comparison; only the engine
        # worker removes entries, so the lane holds at least ``count`` here.
        count = min(count, len(self))
        return list(itertools.starmap(self.popleft, itertools.repeat((), count)))

    drop_newest = deque.pop
    drop_oldest = deque.popleft

    def __hash__(self) -> int:  # type: ignore[override]  # lanes are identities, used as dict keys by the engine
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


class ClosedFifoLane(FifoLane):
    """What a closed dispatcher's lane becomes (``lane.__class__ = ClosedFifoLane``): ``append`` raises.

    Swapping the class of the one lane object, rather than replacing the object, also
    closes enqueue callables that hold the lane itself. The worker still takes what the
    lane held before the swap.
    """

    __slots__ = ()

    def append(self, item: Any, /) -> None:
        raise DispatcherClosedError(f"{self.owner} is closed; entry {_short(item)} was not accepted")

    lock_free_append = append


class PriorityLane(deque[T], Generic[T]):
    """Highest priority first, first in first out within a priority. Needs the engine lock throughout.

    One object per lane while every entry has the same priority (the usual case, and what a
    keyed face with 100k lanes pays for): the lane is itself the deque of its entries. Entries
    of a second priority split it into one deque per priority present, with those priorities
    highest first, until it empties again. Either way ``append`` and ``take`` are deque
    operations at C speed with no per-item tuple, so the engine's lock is held briefly (a
    Python loop under it can lose the GIL midway and convoy producers), and a full garbage
    collection visits one object per single-priority lane, not four.
    """

    __slots__ = ("_buckets", "_order", "_priority_of", "_size", "_top", "deadline", "due", "key", "trigger")

    def __init__(self, key: Hashable, priority_of: Callable[[T], int]) -> None:
        super().__init__()
        self.key = key
        self.trigger = INACTIVE
        self.deadline: float | None = None
        self.due = False
        self._priority_of = priority_of
        self._size = 0
        self._top = 0  # the one priority of the entries held in the lane itself (no buckets)
        # Split form: priority -> its items, oldest first, and the negated priorities ascending.
        # None while the lane holds one priority; the lane itself is then empty.
        self._buckets: dict[int, deque[T]] | None = None
        self._order: list[int] | None = None

    def append(self, item: T, /) -> None:
        priority = self._priority_of(item)
        buckets = self._buckets
        if buckets is None:
            if not self._size or priority == self._top:
                self._top = priority
                deque.append(self, item)
                self._size += 1
                return
            buckets = self._split()
        bucket = buckets.get(priority)
        if bucket is None:
            bucket = buckets[priority] = deque()
            assert self._order is not None
            bisect.insort(self._order, -priority)
        bucket.append(item)
        self._size += 1

    requeue = append

    def _split(self) -> dict[int, deque[T]]:
        """Move the lane's one-priority entries into a bucket: the form for several priorities."""
        buckets = {self._top: deque(self)}
        deque.clear(self)
        self._order = [-self._top]
        self._buckets = buckets
        return buckets

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def take(self, count: int) -> list[T]:
        count = min(count, self._size)
        self._size -= count
        buckets, order = self._buckets, self._order
        if buckets is None or order is None:
            return list(itertools.starmap(self.popleft, itertools.repeat((), count)))
        taken: list[T] = []
        while count:
            priority = -order[0]
            bucket = buckets[priority]
            if len(bucket) <= count:
                count -= len(bucket)
                taken.extend(bucket)
                del buckets[priority]
                del order[0]
            else:
                taken.extend(itertools.starmap(bucket.popleft, itertools.repeat((), count)))
                count = 0
        self._unsplit_if_empty()
        return taken

    def _unsplit_if_empty(self) -> None:
        if not self._size:
            self._buckets = None
            self._order = None

    def _pop_bucket(self, index: int) -> deque[T]:
        buckets, order = self._buckets, self._order
        assert buckets is not None and order is not None
        priority = -order[index]
        bucket = buckets[priority]
        if len(bucket) == 1:
            del buckets[priority]
            del order[index]
        self._size -= 1
        return bucket

    def drop_newest(self) -> T:
        # The newest of the lowest priority: what would be sent last.
        if self._buckets is None:
            self._size -= 1
            return deque.pop(self)
        item = self._pop_bucket(-1).pop()
        self._unsplit_if_empty()
        return item

    def drop_oldest(self) -> T:
        # The oldest of the highest priority: what would be sent first.
        if self._buckets is None:
            self._size -= 1
            return deque.popleft(self)
        item = self._pop_bucket(0).popleft()
        self._unsplit_if_empty()
        return item

    def items(self) -> list[T]:
        """The waiting items in send order (a copy)."""
        buckets, order = self._buckets, self._order
        if buckets is None or order is None:
            return list(self)
        return [item for negated in order for item in buckets[-negated]]

    def __repr__(self) -> str:  # never raises, even for a half-made instance (no _size yet)
        return f"<PriorityLane {getattr(self, 'key', None)!r}: {getattr(self, '_size', 0)} entries>"

    # Lanes are identities, used as dict keys by the engine (a deque has no hash).
    __hash__ = FifoLane.__hash__  # type: ignore[assignment]
    __eq__ = FifoLane.__eq__


def _short(item: object) -> str:
    text = repr(item)
    return text if len(text) <= 80 else text[:77] + "..."
