"""The engine API the admin app manages through: keyset pages, dead letter lookup, queue stats in one store call."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from threaddispatch.admin import make_wsgi_app
from threaddispatch.errors import ConfigurationError, JobNotFoundError
from threaddispatch.jobs import JobEngine, QueueConfig
from threaddispatch.stores import Store
from threaddispatch.stores.base import JobState

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def engine(store: Store) -> Iterator[JobEngine]:
    """An engine (not started) with a no-op job on "default" and one on "mail", and a failing job."""
    made = JobEngine(store, queue_configs=[QueueConfig("mail", max_concurrency=2)])
    made.register("noop", lambda ctx, payload: payload)
    made.register("letter", lambda ctx, payload: payload, queue="mail")
    yield made
    made.stop(5)


class CountingStore:
    """Wraps a store and counts the calls of each of its methods (delegates everything)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return attribute(*args, **kwargs)

        return counted


def _dead_letter(engine: JobEngine, payload: object) -> str:
    """Make a dead letter of a new "noop" job on queue "dead" through the store (no worker); returns its id."""
    job_id = engine.enqueue("noop", payload, max_retries=0, queue="dead")
    [claimed] = engine.store.claim(["dead"], 1, worker_id="w", now=time.time() + 1)
    assert claimed.id == job_id
    engine.store.fail(job_id, worker_id="w", attempts=claimed.attempts, error="boom", now=time.time())
    [letter] = [d for d in engine.dlq(limit=500) if d.job_id == job_id]
    return letter.id


def test_queue_listing_counts_every_queue_in_one_store_call(engine: JobEngine) -> None:
    """GET /queues asks the store for the counts of all its queues at once, not once per queue."""
    for queue in ("default", "mail", "mail", "other"):
        engine.enqueue("noop", 1, queue=queue)
    counting = CountingStore(engine.store)
    real, engine.store = engine.store, counting  # type: ignore[assignment]
    try:
        response = make_wsgi_app(engine, allow_unauthenticated=True).handle("GET", "/queues")
    finally:
        engine.store = real
    assert response.status == 200
    queues = {q["name"]: q for q in response.json()["queues"]}
    assert set(queues) == {"default", "mail"}  # the known queues: config, definitions, crons, paused
    assert queues["mail"]["counts"]["pending"] == 2 and queues["mail"]["max_concurrency"] == 2
    assert queues["default"]["counts"] == {**dict.fromkeys((s.value for s in JobState), 0), "pending": 1}
    assert counting.calls.get("counts", 0) == 0
    assert counting.calls["counts_by_queue"] == 1


def test_queue_stats_lists_known_queues_sorted_with_counts_and_limits(engine: JobEngine) -> None:
    """queue_stats() names every known queue once, sorted, with counts (zeros too), pause state and limits."""
    engine.enqueue("letter", 1)
    engine.pause_queue("archive")
    stats = engine.queue_stats()
    assert [q["name"] for q in stats] == ["archive", "default", "mail"]
    archive, default, mail = stats
    assert archive["paused"] and not default["paused"] and not mail["paused"]
    assert mail["counts"]["pending"] == 1 and sum(default["counts"].values()) == 0
    assert mail["max_concurrency"] == 2 and default["max_concurrency"] is None
    assert not mail["served_here"] and mail["running_here"] == 0


def test_counts_by_queue_matches_counts_per_queue(store: Store) -> None:
    """Store.counts_by_queue gives counts(queue=q) for each asked queue, also the base class default."""
    engine = JobEngine(store)
    engine.register("noop", lambda ctx, payload: payload)
    for queue in ("a", "a", "b", "c"):
        engine.enqueue("noop", 1, queue=queue)
    expected = {q: store.counts(queue=q) for q in ("a", "b", "none")}
    assert store.counts_by_queue(["a", "b", "none"]) == expected
    assert Store.counts_by_queue(store, ["a", "b", "none"]) == expected
    assert store.counts_by_queue([]) == {}


def test_list_jobs_after_pages_without_skipping(engine: JobEngine) -> None:
    """list_jobs_after walks the listing by keyset; list_dead_letters_after likewise for dead letters."""
    ids = [engine.enqueue("noop", n) for n in range(7)]
    listing = [job.id for job in engine.list_jobs(limit=50)]
    assert sorted(listing) == sorted(ids)
    first = engine.list_jobs_after(None, limit=3)
    rest = engine.list_jobs_after((first[-1].id, first[-1].created_at), limit=50, position=3)
    assert [job.id for job in first + rest] == listing
    assert [job.id for job in engine.list_jobs_after(None, state=JobState.COMPLETED)] == []
    letters = [_dead_letter(engine, n) for n in range(3)]
    page = engine.list_dead_letters_after(None, limit=2)
    tail = engine.list_dead_letters_after((page[-1].id, page[-1].failed_at), limit=5, position=2)
    assert sorted(d.id for d in page + tail) == sorted(letters)


def test_get_dead_letter_and_describe_store(engine: JobEngine) -> None:
    """get_dead_letter returns the letter or raises JobNotFoundError; describe_store is the store's description."""
    letter_id = _dead_letter(engine, "x")
    assert engine.get_dead_letter(letter_id).id == letter_id
    with pytest.raises(JobNotFoundError, match="no-such"):
        engine.get_dead_letter("no-such")
    assert engine.describe_store() == dict(engine.store.describe())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda e: e.list_jobs_after(None, limit=-1), "limit"),
        (lambda e: e.list_jobs_after(None, position=True), "position"),
        (lambda e: e.list_jobs_after(None, state="nope"), "nope"),
        (lambda e: e.list_jobs_after(None, queue=""), "queue"),
        (lambda e: e.list_jobs_after(("id", float("nan"))), "after"),
        (lambda e: e.list_jobs_after(["id", 1.0]), "after"),
        (lambda e: e.list_dead_letters_after(("id\x00", 1.0)), "after"),
        (lambda e: e.list_dead_letters_after(None, limit="5"), "limit"),
        (lambda e: e.get_dead_letter(""), "dead letter id"),
    ],
)
def test_engine_listing_refuses_bad_input(engine: JobEngine, call: Any, match: str) -> None:
    """Bad arguments get ConfigurationError naming the bad value."""
    with pytest.raises(ConfigurationError, match=match):
        call(engine)
