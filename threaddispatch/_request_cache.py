"""RequestDispatcher's response cache: the entry type, the store contract, the memory store, and the policy.

A response is cached under the request's cache key (default: its dedupe key) when the
request was added with ``cache_time`` or ``stale_time``. For ``cache_time`` seconds the
entry is fresh: an equal request is answered from it without a send. For
``stale_time`` seconds more it is stale: kept (``get_cached`` returns it) but not
served. Then it is gone. Times are wall-clock (``time.time()``) so that a SQLite store
(:meth:`~threaddispatch.request_storage.SQLiteRequestStorage.response_cache`) keeps its
meaning across a restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from threaddispatch._validate import check_seconds, show
from threaddispatch.errors import ConfigurationError

__all__ = ["CachedResponse", "MemoryResponseCache", "RequestCache", "ResponseCache"]

_log = logging.getLogger("threaddispatch.requests")


@dataclass(frozen=True)
class CachedResponse:
    """One cached response: its key, the response, when it was stored and until when it is fresh, then kept."""

    key: str
    response: object
    stored_at: float
    fresh_until: float
    stale_until: float

    def is_fresh(self, now: float) -> bool:
        """Whether the entry may still be served at wall-clock time ``now``."""
        return now < self.fresh_until


@runtime_checkable
class ResponseCache(Protocol):
    """Where cached responses live. Every method must be thread-safe; none is called with a dispatcher lock held."""

    def get(self, key: str, now: float) -> CachedResponse | None:
        """The entry of ``key`` unless it expired (``stale_until <= now``); expired entries may be dropped."""

    def put(self, entry: CachedResponse) -> None:
        """Keep ``entry``, replacing the key's previous one; PayloadError if its response cannot be kept."""

    def invalidate(self, prefix: str) -> int:
        """Drop every entry whose key starts with ``prefix`` (an exact key included); return how many."""

    def close(self) -> None:
        """Release resources; idempotent. A later call may reopen them."""


class MemoryResponseCache:
    """Cached responses in a dict (the default store). Thread-safe; blocks only on a short internal lock.

    Expired entries are dropped when read, and swept every ``SWEEP_EVERY`` puts, so
    keys that are never asked for again do not accumulate.
    """

    SWEEP_EVERY = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _entries and _puts
        self._entries: dict[str, CachedResponse] = {}
        self._puts = 0

    def get(self, key: str, now: float) -> CachedResponse | None:
        """The unexpired entry of ``key``, or None (an expired one is dropped)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.stale_until <= now:
                del self._entries[key]
                return None
            return entry

    def put(self, entry: CachedResponse) -> None:
        """Keep ``entry``; every ``SWEEP_EVERY`` puts, drop what expired by its ``stored_at``."""
        with self._lock:
            self._entries[entry.key] = entry
            self._puts += 1
            if self._puts % self.SWEEP_EVERY == 0:
                now = entry.stored_at
                for key in [key for key, kept in self._entries.items() if kept.stale_until <= now]:
                    del self._entries[key]

    def invalidate(self, prefix: str) -> int:
        """Drop the entries whose key starts with ``prefix``."""
        with self._lock:
            doomed = [key for key in self._entries if key.startswith(prefix)]
            for key in doomed:
                del self._entries[key]
            return len(doomed)

    def close(self) -> None:
        """Nothing to release; entries are kept."""

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class RequestCache:
    """A store bound to the key function and the defaults; the dispatcher's one entry to its cache. Thread-safe."""

    __slots__ = ("cache_time", "key_fn", "name", "stale_time", "store")

    def __init__(
        self,
        store: ResponseCache,
        key_fn: Callable[[object], str],
        *,
        cache_time: float,
        stale_time: float,
        name: str,
    ) -> None:
        if not isinstance(store, ResponseCache):
            raise ConfigurationError(f"cache must implement ResponseCache (or be None), got {show(store)}")
        if not callable(key_fn):
            raise ConfigurationError(f"cache_key must be callable or None, got {show(key_fn)}")
        self.store = store
        self.key_fn = key_fn
        self.cache_time = check_seconds("cache_time", cache_time)
        self.stale_time = check_seconds("stale_time", stale_time)
        self.name = name

    def plan(
        self, request: object, cache_key: str | None, cache_time: float | None, stale_time: float | None
    ) -> tuple[str, float, float] | None:
        """``(key, cache_time, stale_time)`` for a request that uses the cache, else None. Calls the key function."""
        fresh = self.cache_time if cache_time is None else check_seconds("cache_time", cache_time)
        stale = self.stale_time if stale_time is None else check_seconds("stale_time", stale_time)
        if cache_key is not None and not isinstance(cache_key, str):
            raise ConfigurationError(f"cache_key must be a str, got {show(cache_key)}")
        if not (fresh or stale):
            return None
        if cache_key is None:
            cache_key = self.key_fn(request)
            if not isinstance(cache_key, str):
                raise ConfigurationError(f"the cache_key function returned {show(cache_key)}; it must return a str")
        return cache_key, fresh, stale

    def lookup(self, key: str, now: float) -> CachedResponse | None:
        """The fresh entry of ``key``, or None; a failing store is logged and counts as a miss."""
        try:
            entry = self.store.get(key, now)
        except Exception:  # noqa: BLE001 - a broken cache must not stop the request: it is sent
            _log.exception("%s: reading the response cache failed for %r", self.name, key)
            return None
        return entry if entry is not None and entry.is_fresh(now) else None

    def get(self, key: str, now: float) -> CachedResponse | None:
        """The unexpired entry of ``key`` (fresh or stale), or None. Store errors propagate."""
        return self.store.get(key, now)

    def save(self, plan: tuple[str, float, float], response: object, now: float) -> CachedResponse | None:
        """Cache ``response`` under the plan's key; returns the entry, or None if the store refused it (logged)."""
        key, fresh, stale = plan
        entry = CachedResponse(key, response, now, now + fresh, now + fresh + stale)
        try:
            self.store.put(entry)
        except Exception as error:  # noqa: BLE001 - the response is still delivered; only caching failed
            _log.warning("%s: cannot cache the response for %r: %s", self.name, key, error)
            return None
        return entry
