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

__all__ = ["SHARD_MASK", "SPLIT_AT", "ClosedFifoLane", "FifoLane", "Lane", "LaneTable", "PriorityLane"]

T = TypeVar("T")
L = TypeVar("L")

INACTIVE = 1  # trigger of a lane with no open window: the first append opens one
SHARD_MASK = 15  # a split LaneTable has SHARD_MASK + 1 dicts; the one of a key is at hash(key) & SHARD_MASK
SPLIT_AT = 4096  # lanes from which a LaneTable spreads them over several dicts


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
        # worker removes entries, so the lane holds at least ``count`` here. Never list() and
        # clear(): an append without the lock between the two would be lost.
        count = min(count, len(self))
        if count == 1:
            return [self.popleft()]  # a batch of one (a keyed face with many keys): no iterator objects
        return list(itertools.starmap(self.popleft, itertools.repeat((), count)))

    drop_newest = deque.pop
    drop_oldest = deque.popleft

    # Lanes are identities, used as dict keys by the engine (a deque has no hash): object's own
    # hash, at C speed (the engine hashes a lane several times per batch), and identity equality.
    __hash__ = object.__hash__  # type: ignore[assignment]

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


class LaneTable(Generic[L]):
    """Lanes by key: one dict, then, past ``SPLIT_AT`` lanes, 16 dicts by the key's hash. Guarded by the engine's lock.

    A dict grows by copying every entry into a table twice as large, at once: one dict of
    100k lanes stops the insert that passes ~87k for ~7 ms, with the engine's lock held
    (every producer waits). Spread over 16 dicts, each copies a 16th of the lanes, each at
    its own time; below ``SPLIT_AT`` lanes one dict's growth is cheap, and a lookup then
    needs no hash of its own. The split itself copies ``SPLIT_AT`` lanes, once.

    Readers without the lock (the engine's lock-free ``put``) take the dict holding a key
    as :meth:`dict_of` does, and look it up there (a dict lookup is atomic under the GIL).
    One that took ``one`` just before the split may find a lane there that was deleted
    since (the engine's kick adopts what lands in it) or none (it takes the locked path).
    Iteration is dict by dict (after the split, not in the order the lanes were made) and
    returns lists, so the caller may change the table meanwhile.
    """

    __slots__ = ("one", "shards")

    def __init__(self) -> None:
        self.one: dict[Hashable, L] | None = {}  # every lane, until the split; None after it
        self.shards: tuple[dict[Hashable, L], ...] = ()  # after the split: the lane of key at hash(key) & SHARD_MASK

    def dict_of(self, key: Hashable) -> dict[Hashable, L]:
        """The dict that holds (or would hold) the lane of ``key``."""
        one = self.one
        return one if one is not None else self.shards[hash(key) & SHARD_MASK]

    def get(self, key: Hashable) -> L | None:
        return self.dict_of(key).get(key)

    def __setitem__(self, key: Hashable, lane: L) -> None:
        one = self.one
        if one is None:
            self.shards[hash(key) & SHARD_MASK][key] = lane
            return
        one[key] = lane
        if len(one) >= SPLIT_AT:
            self._split(one)

    def _split(self, one: dict[Hashable, L]) -> None:
        shards: tuple[dict[Hashable, L], ...] = tuple({} for _ in range(SHARD_MASK + 1))
        for key, lane in one.items():
            shards[hash(key) & SHARD_MASK][key] = lane
        self.shards = shards  # before one goes: a reader that sees one None finds the shards
        self.one = None
        one.clear()  # a reader still holding it finds no lane there: the locked path

    def __delitem__(self, key: Hashable) -> None:
        del self.dict_of(key)[key]

    def _dicts(self) -> tuple[dict[Hashable, L], ...]:
        one = self.one
        return self.shards if one is None else (one,)

    def __len__(self) -> int:
        return sum(map(len, self._dicts()))

    def values(self) -> list[L]:
        return [lane for lanes in self._dicts() for lane in lanes.values()]

    def items(self) -> list[tuple[Hashable, L]]:
        return [item for lanes in self._dicts() for item in lanes.items()]


class PriorityLane(deque[T], Generic[T]):
    """Highest priority first, first in first out within a priority. Needs the engine lock throughout.

    One object per lane while every entry has the same priority (the usual case, and what a
    keyed face with 100k lanes pays for): the lane is itself the deque of its entries, and
    ``len``, ``bool`` and the drops are the deque's own, at C speed. Entries of a second
    priority turn it into a :class:`_SplitPriorityLane` (its ``__class__`` is swapped, as
    ClosedFifoLane's is: the engine keeps the same object) holding one deque per priority
    present, highest first, until it empties again. Either way ``append`` and ``take`` are
    deque operations with no per-item tuple, so the engine's lock is held briefly (a Python
    loop under it can lose the GIL midway and convoy producers), and a full garbage
    collection visits one object per single-priority lane, not four.
    """

    __slots__ = ("_buckets", "_order", "_priority_of", "_size", "_top", "deadline", "due", "key", "trigger")

    _size: int
    _buckets: dict[int, deque[T]]
    _order: list[int]

    def __init__(self, key: Hashable, priority_of: Callable[[T], int]) -> None:
        # No deque.__init__: deque.__new__ made the lane an empty deque already (one call less per endpoint).
        self.key = key
        self.trigger = INACTIVE
        self.deadline: float | None = None
        self.due = False
        self._priority_of = priority_of
        self._top = 0  # the one priority of the entries the lane itself holds
        # _size, _buckets and _order (split form only: how many entries, priority -> its items,
        # oldest first, and the negated priorities ascending; the lane itself is then empty) stay
        # unset until the first split: three stores less per endpoint, and three slots fewer for a
        # full collection to visit in each of 100k lanes. Nothing reads them before _split sets them.

    def append(self, item: T, /) -> None:
        priority = self._priority_of(item)
        if priority == self._top or not deque.__len__(self):
            self._top = priority
            deque.append(self, item)
        else:
            self._split()
            self.append(item)

    requeue = append

    def _split(self) -> None:
        """Move the lane's one-priority entries into a bucket: the form for several priorities."""
        self._size = deque.__len__(self)
        self._buckets = {self._top: deque(self)}
        self._order = [-self._top]
        deque.clear(self)
        self.__class__ = _SplitPriorityLane

    def take(self, count: int) -> list[T]:
        if count >= deque.__len__(self):
            # The whole lane (the usual batch with many endpoints): two C calls, no iterator
            # objects. Safe here, where every append holds the engine's lock, as this take does.
            items = list(self)
            deque.clear(self)
            return items
        # starmap calls popleft at C speed; only the engine (under its lock) removes entries.
        return list(itertools.starmap(self.popleft, itertools.repeat((), count)))

    # The newest of the lowest priority (what would be sent last), the oldest of the highest (first).
    drop_newest = deque.pop
    drop_oldest = deque.popleft

    def items(self) -> list[T]:
        """The waiting items in send order (a copy)."""
        return list(self)

    def __repr__(self) -> str:  # never raises, even for a half-made instance
        return f"<{type(self).__name__} {getattr(self, 'key', None)!r}: {len(self)} entries>"

    # Lanes are identities, used as dict keys by the engine (a deque has no hash).
    __hash__ = object.__hash__  # type: ignore[assignment]
    __eq__ = FifoLane.__eq__


class _SplitPriorityLane(PriorityLane[T]):
    """A PriorityLane holding entries of several priorities: one deque per priority in ``_buckets``.

    Back to a PriorityLane (``__class__`` swapped) once it is empty.
    """

    __slots__ = ()

    def append(self, item: T, /) -> None:
        priority = self._priority_of(item)
        buckets = self._buckets
        bucket = buckets.get(priority)
        if bucket is None:
            bucket = buckets[priority] = deque()
            bisect.insort(self._order, -priority)
        bucket.append(item)
        self._size += 1

    requeue = append

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def take(self, count: int) -> list[T]:
        count = min(count, self._size)
        self._size -= count
        buckets, order = self._buckets, self._order
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
            # Unset again, as in a new lane: a one-priority lane costs the collector no dict or list of its own.
            del self._size, self._buckets, self._order
            self.__class__ = PriorityLane  # type: ignore[assignment]  # the same object, one priority again

    def _pop_bucket(self, index: int) -> deque[T]:
        buckets, order = self._buckets, self._order
        priority = -order[index]
        bucket = buckets[priority]
        if len(bucket) == 1:
            del buckets[priority]
            del order[index]
        self._size -= 1
        return bucket

    def drop_newest(self) -> T:
        item = self._pop_bucket(-1).pop()
        self._unsplit_if_empty()
        return item

    def drop_oldest(self) -> T:
        item = self._pop_bucket(0).popleft()
        self._unsplit_if_empty()
        return item

    def items(self) -> list[T]:
        return [item for negated in self._order for item in self._buckets[-negated]]

    def __repr__(self) -> str:
        return f"<PriorityLane {getattr(self, 'key', None)!r}: {getattr(self, '_size', 0)} entries, split>"


def _short(item: object) -> str:
    text = repr(item)
    return text if len(text) <= 80 else text[:77] + "..."
