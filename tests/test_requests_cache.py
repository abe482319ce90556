"""RequestDispatcher's response cache: cache_time, stale_time, get_cached, invalidate, the cache event; both stores."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from threaddispatch.errors import ConfigurationError
from threaddispatch.request_storage import SQLiteRequestStorage
from threaddispatch.requests import (
    CachedResponse,
    CancellationToken,
    MemoryResponseCache,
    RequestDispatcher,
    RequestEvent,
    default_dedupe_key,
)

pytestmark = pytest.mark.timeout(30)


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Backend:
    """A send that counts calls per request and answers with the count."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}

    def __call__(self, request: Any, token: CancellationToken) -> dict[str, Any]:
        key = default_dedupe_key(request)
        with self.lock:
            self.calls[key] = self.calls.get(key, 0) + 1
            return {"call": self.calls[key]}

    def total(self) -> int:
        with self.lock:
            return sum(self.calls.values())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def backend() -> Backend:
    return Backend()


@pytest.fixture(params=["memory", "sqlite"])
def rd(
    request: pytest.FixtureRequest, tmp_path: Path, backend: Backend, clock: Clock
) -> Iterator[RequestDispatcher[Any, Any]]:
    options: dict[str, Any] = {}
    if request.param == "sqlite":
        options["storage"] = SQLiteRequestStorage(tmp_path / "requests.db")
    dispatcher: RequestDispatcher[Any, Any] = RequestDispatcher(backend, **options)
    dispatcher._core.wall_clock = clock
    yield dispatcher
    dispatcher.close(5)


USERS = {"method": "GET", "endpoint": "/users", "query": {"page": 1}}


def test_fresh_response_is_served_from_the_cache_without_a_send(
    rd: RequestDispatcher[Any, Any], backend: Backend, clock: Clock
) -> None:
    """Within cache_time an equal request is answered from the cache: no send, a settled Future, cached=True."""
    first = rd.add(USERS, cache_time=60)
    assert first.future.result(5) == {"call": 1} and not first.cached
    clock.now += 59
    second = rd.add(USERS, cache_time=60)
    assert second.cached and second.future.done() and second.future.result(0) == {"call": 1}
    assert backend.total() == 1
    clock.now += 2  # past cache_time: sent again
    third = rd.add(USERS, cache_time=60)
    assert not third.cached and third.future.result(5) == {"call": 2}


def test_requests_without_cache_time_neither_read_nor_write_the_cache(
    rd: RequestDispatcher[Any, Any], backend: Backend
) -> None:
    """By default nothing is cached: every add sends."""
    assert rd.add(USERS).future.result(5) == {"call": 1}
    assert rd.add(USERS).future.result(5) == {"call": 2}
    assert rd.get_cached(default_dedupe_key(USERS)) is None


def test_stale_entry_is_kept_for_get_cached_but_not_served(
    rd: RequestDispatcher[Any, Any], backend: Backend, clock: Clock
) -> None:
    """After cache_time the entry is stale: get_cached returns it (not fresh) until stale_time passes; add sends."""
    key = default_dedupe_key(USERS)
    rd.add(USERS, cache_time=10, stale_time=100).future.result(5)
    entry = rd.get_cached(key)
    assert isinstance(entry, CachedResponse) and entry.response == {"call": 1}
    assert entry.is_fresh(clock.now) and entry.key == key
    clock.now += 50
    stale = rd.get_cached(key)
    assert stale is not None and not stale.is_fresh(clock.now)
    assert rd.add(USERS, cache_time=10, stale_time=100).future.result(5) == {"call": 2}
    clock.now += 200
    assert rd.get_cached(key) is None or rd.get_cached(key).response == {"call": 2}  # type: ignore[union-attr]
    clock.now += 200
    assert rd.get_cached(key) is None


def test_invalidate_by_key_and_by_prefix(rd: RequestDispatcher[Any, Any], backend: Backend) -> None:
    """invalidate(key) drops one entry; invalidate(prefix) every key that starts with it; both return the count."""
    events: list[RequestEvent] = []
    rd.on("cache", events.append)
    for page in (1, 2, 3):
        rd.add({"endpoint": "/users", "page": page}, cache_key=f"users/{page}", cache_time=60).future.result(5)
    rd.add({"endpoint": "/items"}, cache_key="items", cache_time=60).future.result(5)
    assert [e.reason for e in events] == ["stored"] * 4 and events[0].cache_key == "users/1"
    assert rd.invalidate("users/2") == 1
    assert rd.get_cached("users/2") is None and rd.get_cached("users/1") is not None
    assert rd.invalidate("users/") == 2
    assert rd.get_cached("items") is not None and rd.invalidate("nothing") == 0
    assert [(e.reason, e.cache_key, e.size) for e in events[4:]] == [
        ("invalidated", "users/2", 1),
        ("invalidated", "users/", 2),
        ("invalidated", "nothing", 0),
    ]
    again = rd.add({"endpoint": "/users", "page": 1}, cache_key="users/1", cache_time=60)
    assert not again.cached and again.future.result(5) == {"call": 2}


def test_cache_hit_event_and_failures_are_not_cached(rd: RequestDispatcher[Any, Any], clock: Clock) -> None:
    """A hit emits a cache event (reason "hit"); a failed send stores nothing."""
    events: list[RequestEvent] = []
    rd.on("cache", events.append)
    rd.add(USERS, cache_time=60).future.result(5)
    hit = rd.add(USERS, cache_time=60)
    assert [e.reason for e in events] == ["stored", "hit"]
    assert events[1].request_id == hit.request_id and events[1].response == {"call": 1}

    def failing(request: Any, token: CancellationToken) -> Any:
        raise ValueError("down")

    other: RequestDispatcher[Any, Any] = RequestDispatcher(failing)
    try:
        with pytest.raises(ValueError):
            other.add(USERS, cache_time=60).future.result(5)
        assert other.get_cached(default_dedupe_key(USERS)) is None
    finally:
        other.close(5)


def test_cache_defaults_from_the_constructor_and_a_cache_key_function(backend: Backend) -> None:
    """cache_time/stale_time/cache_key given to the dispatcher apply to every add; add's arguments override them."""
    rd: RequestDispatcher[Any, Any] = RequestDispatcher(
        backend, cache_time=60, cache_key=lambda request: request["endpoint"]
    )
    try:
        rd.add({"endpoint": "/a", "x": 1}).future.result(5)
        assert rd.add({"endpoint": "/a", "x": 2}).cached  # same cache key
        assert rd.get_cached("/a") is not None
        assert not rd.add({"endpoint": "/a"}, cache_time=0).cached  # per-add override: no cache
    finally:
        rd.close(5)


def test_sqlite_cache_survives_a_restart(tmp_path: Path, backend: Backend) -> None:
    """With a SQLite request storage the cache is in the same file: a new dispatcher serves what the old one cached."""
    path = tmp_path / "requests.db"
    first: RequestDispatcher[Any, Any] = RequestDispatcher(backend, storage=SQLiteRequestStorage(path))
    first.add(USERS, cache_time=3600).future.result(5)
    first.close(5)
    second: RequestDispatcher[Any, Any] = RequestDispatcher(backend, storage=SQLiteRequestStorage(path))
    try:
        handle = second.add(USERS, cache_time=3600)
        assert handle.cached and handle.future.result(0) == {"call": 1}
        assert backend.total() == 1
    finally:
        second.close(5)


def test_unserialisable_response_is_not_cached_in_sqlite(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A response SQLite cannot keep is delivered anyway and logged; nothing is cached."""
    rd: RequestDispatcher[Any, Any] = RequestDispatcher(
        lambda request, token: object(), storage=SQLiteRequestStorage(tmp_path / "r.db")
    )
    try:
        rd.add("x", cache_time=60).future.result(5)  # delivered though it cannot be cached
        assert rd.get_cached("x") is None
        assert "cannot cache" in caplog.text
    finally:
        rd.close(5)


def test_explicit_cache_object_and_bad_options(backend: Backend) -> None:
    """cache= takes a store object; bad cache options raise ConfigurationError naming them."""
    store = MemoryResponseCache()
    rd: RequestDispatcher[Any, Any] = RequestDispatcher(backend, cache=store)
    try:
        rd.add("x", cache_time=60).future.result(5)
        assert len(store) == 1
        for options, named in (
            ({"cache_time": -1}, "cache_time"),
            ({"stale_time": "x"}, "stale_time"),
            ({"cache_key": 5}, "cache_key"),
        ):
            with pytest.raises(ConfigurationError, match=named):
                rd.add("x", **options)
    finally:
        rd.close(5)
    with pytest.raises(ConfigurationError, match="cache"):
        RequestDispatcher(backend, cache="memory")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cache_key"):
        RequestDispatcher(backend, cache_key="k")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_expired_entries_of_keys_never_read_again_are_swept(kind: str, tmp_path: Path) -> None:
    """Puts sweep expired entries now and then: keys nobody asks for again do not pile up."""
    store: Any = MemoryResponseCache() if kind == "memory" else SQLiteRequestStorage(tmp_path / "c.db").response_cache()
    try:
        for i in range(store.SWEEP_EVERY - 1):
            store.put(CachedResponse(f"old/{i}", i, 0.0, 1.0, 2.0))
        store.put(CachedResponse("new", "n", 10.0, 20.0, 30.0))  # the sweeping put, at time 10
        assert store.invalidate("old/") == 0
        assert store.get("new", 10.0) is not None
    finally:
        store.close()
