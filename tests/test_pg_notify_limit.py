"""PostgresStore: a queue name too long for a NOTIFY payload still works, and still wakes the listeners.

PostgreSQL refuses a ``pg_notify`` payload of 8,000 bytes or more (failing the statement
whose trigger sent it). Migration 12's triggers, and a resumed queue's wake-up, send a
payload that would not fit without its queue: JSON null, "look at every queue", with the
schema and run_at. Each test here goes through one of the paths that notify (the insert
trigger, the ready trigger, the released trigger, the serial lock's trigger, a resume) with
such a queue, and checks the listener of a second store hears ``(None, run_at)``.

On conftest's session server and shared schema (emptied after each test). Skipped without
PostgreSQL binaries or psycopg (failed on CI).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import test_stores
from conftest import PG_SCHEMA
from pg_server import PostgresServer

from threaddispatch.stores import JobState
from threaddispatch.stores.base import Completion
from threaddispatch.testing import wait_for

try:
    from threaddispatch.stores.postgres import PostgresStore
except ImportError:  # the 'postgres' extra is not installed
    pytest.skip("psycopg is not installed", allow_module_level=True)

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]

T0 = test_stores.T0
Heard = list[tuple[str | None, float | None]]

#: Names whose payload (JSON-escaped, UTF-8) is past 8,000 bytes: plain, multi-byte, and
#: short enough raw but doubled by JSON's escapes.
LONG = [
    pytest.param("q" * 9_000, id="9000-ascii"),
    pytest.param("€" * 2_700, id="8100-utf8-bytes"),
    pytest.param('"' * 4_000, id="4000-quotes-escaped-to-8000"),
]


@pytest.fixture
def make_store(pg_server: PostgresServer, pg_url: str) -> Iterator[Callable[..., PostgresStore]]:
    """PostgresStores on the shared schema (``pg_url`` empties it after the test); all closed at the end."""
    made: list[PostgresStore] = []

    def make(**options: Any) -> PostgresStore:
        store = PostgresStore(pg_server.dsn, schema=PG_SCHEMA, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def heard(make_store: Callable[..., PostgresStore]) -> Iterator[Heard]:
    """The wake-ups a subscriber on a store of its own receives, from the moment its LISTEN is in place."""
    listener = make_store()
    listener.migrate()
    got: Heard = []
    unsubscribe = listener.subscribe_wakeups(lambda queue, run_at: got.append((queue, run_at)))
    wait_for(lambda: (None, None) in got, 10, message="listener connected")  # "look now", on connecting
    got.clear()
    yield got
    unsubscribe()


def _quiet(store: PostgresStore, heard: Heard) -> None:
    """Wait until the wake-ups of what was stored so far arrived (a marker job's comes after them), then forget them."""
    marker = test_stores.job(queue="marker")
    store.enqueue([marker])
    wait_for(lambda: any(queue == "marker" for queue, _ in heard), 10, message="the marker's wake-up")
    heard.clear()
    assert store.cancel(marker.id, now=T0)


def _wait_anywhere(heard: Heard, run_at: float) -> None:
    """A wake-up naming no queue and due at ``run_at``: the payload that fits, for a queue too long to name."""
    wait_for(lambda: (None, run_at) in heard, 10, message=f"a wake-up for every queue at {run_at}, heard {heard!r}")


@pytest.mark.parametrize("queue", LONG)
def test_an_enqueue_into_a_long_queue_wakes_every_queue(
    make_store: Callable[..., PostgresStore], heard: Heard, queue: str
) -> None:
    store = make_store()
    one, many = test_stores.job(queue=queue), [test_stores.job(queue=queue) for _ in range(20)]  # INSERT, then COPY
    store.enqueue([one])
    _wait_anywhere(heard, T0)
    heard.clear()
    store.enqueue(many)
    _wait_anywhere(heard, T0)
    claimed = store.claim([queue], 30, worker_id="w", now=T0 + 1)
    assert sorted(job.id for job in claimed) == sorted(job.id for job in [one, *many])
    assert {job.queue for job in claimed} == {queue}


def test_a_job_of_a_long_queue_handed_back_wakes_every_queue(
    make_store: Callable[..., PostgresStore], heard: Heard
) -> None:
    queue = "q" * 9_000
    store = make_store()
    job = test_stores.job(queue=queue)
    store.enqueue([job])
    [claimed] = store.claim([queue], 1, worker_id="w", now=T0 + 1)
    _quiet(store, heard)
    assert store.release([claimed.id], worker_id="w", now=T0 + 2) == 1
    _wait_anywhere(heard, T0 + 2)
    assert [again.id for again in store.claim([queue], 1, worker_id="w", now=T0 + 3)] == [job.id]


def test_a_dependent_of_a_long_queue_released_wakes_every_queue(
    make_store: Callable[..., PostgresStore], heard: Heard
) -> None:
    queue = "€" * 2_700
    store = make_store()
    first = test_stores.job(queue="a")
    second = test_stores.job(queue=queue, depends_on=(first.id,))
    store.enqueue([first])
    store.enqueue([second])
    [claimed] = store.claim(["a"], 1, worker_id="w", now=T0 + 1)
    _quiet(store, heard)
    store.complete_many([Completion(claimed.id, "w", claimed.attempts, None, None)], now=T0 + 2)
    _wait_anywhere(heard, T0 + 2)
    stored = store.get(second.id)
    assert stored is not None and stored.state is JobState.PENDING


def test_the_next_job_of_a_lock_on_a_long_queue_wakes_every_queue(
    make_store: Callable[..., PostgresStore], heard: Heard
) -> None:
    queue = "q" * 9_000
    store = make_store()
    first, second = test_stores.job(queue="a", lock="L"), test_stores.job(queue=queue, lock="L")
    store.enqueue([first])
    store.enqueue([second])
    [claimed] = store.claim(["a"], 1, worker_id="w", now=T0 + 1)
    _quiet(store, heard)
    store.complete_many([Completion(claimed.id, "w", claimed.attempts, None, None)], now=T0 + 2)
    _wait_anywhere(heard, T0 + 2)
    assert [job.id for job in store.claim([queue], 1, worker_id="w", now=T0 + 3)] == [second.id]


@pytest.mark.parametrize("queue", LONG)
def test_a_long_queue_resumed_wakes_every_queue(
    make_store: Callable[..., PostgresStore], heard: Heard, queue: str
) -> None:
    store = make_store()
    store.set_queue_paused(queue, True, now=T0)
    assert store.paused_queues() == {queue}
    _quiet(store, heard)
    store.set_queue_paused(queue, False, now=T0 + 1)
    _wait_anywhere(heard, T0 + 1)
    assert store.paused_queues() == set()


def test_a_queue_name_that_fits_is_still_named(make_store: Callable[..., PostgresStore], heard: Heard) -> None:
    """The longest names whose payload fits keep their queue (no spare wake-up for every queue)."""
    queue = "q" * 7_900
    store = make_store()
    store.enqueue([test_stores.job(queue=queue)])
    wait_for(lambda: (queue, T0) in heard, 10, message="the named wake-up")
    assert all(name is not None for name, _ in heard)
