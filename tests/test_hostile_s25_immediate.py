"""Hostile tests of immediate mode: handlers that enqueue follow-up jobs (a crawler's next page).

In immediate mode ``enqueue()`` runs the job, with every attempt it needs, before it
returns. A handler that enqueues the next job therefore runs it nested on its own stack,
one level (about fifteen frames) per job: a chain of a few hundred jobs, ordinary for a
paginated fetch, reaches Python's default recursion limit (the test sets it: the full suite
runs with a higher one, raised by something another test loads). The promises attacked: every job enqueued is
run and its outcome recorded ("middleware, hooks, unique_key, stored results and the
dead-letter queue behave as in normal mode"), and no job is left ``running`` (an immediate
engine has no reaper to recover one). What happens instead: near depth 70 one job fails
with RecursionError, the job above it is left ``running`` for good because recording its
failure overflowed the stack too, the rest of the chain is never enqueued, and the first
``enqueue`` returns normally. Now a job enqueued inside an immediate run is queued on the
thread and run by the outermost ``enqueue`` after its own job (a trampoline).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from threaddispatch import JobEngine
from threaddispatch.jobs import JobContext
from threaddispatch.stores import JobState, Store

pytestmark = pytest.mark.timeout(60)

PAGES = 300


@pytest.fixture(autouse=True)
def default_recursion_limit() -> Iterator[None]:
    """Python's default limit (1000) for the test: a library loaded by another test may have raised it."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(before)


def test_a_chain_of_jobs_each_enqueueing_the_next_runs_to_the_end_in_immediate_mode(store: Store) -> None:
    engine = JobEngine(store, immediate=True)
    fetched: list[int] = []

    def fetch_page(_ctx: JobContext, page: int) -> int:
        fetched.append(page)
        if page + 1 < PAGES:
            engine.enqueue("fetch_page", page + 1)
        return page

    engine.register("fetch_page", fetch_page, max_retries=0)
    first = engine.enqueue("fetch_page", 0)
    assert engine.get_job(first).state is JobState.COMPLETED
    counts = engine.counts()
    assert counts["running"] == 0, counts
    assert counts["failed"] == 0, counts
    assert fetched == list(range(PAGES))
    assert counts["completed"] == PAGES


def test_a_short_chain_of_jobs_each_enqueueing_the_next_runs_in_order_in_immediate_mode(store: Store) -> None:
    """The baseline: a chain well under the recursion limit runs to its end, each job completed."""
    engine = JobEngine(store, immediate=True)
    fetched: list[int] = []

    def fetch_page(_ctx: JobContext, page: int) -> int:
        fetched.append(page)
        if page + 1 < 10:
            engine.enqueue("fetch_page", page + 1)
        return page

    engine.register("fetch_page", fetch_page, max_retries=0)
    engine.enqueue("fetch_page", 0)
    assert fetched == list(range(10))
    assert {state: n for state, n in engine.counts().items() if n} == {"completed": 10}


def test_a_job_enqueued_by_a_handler_runs_after_it_and_the_handler_can_still_wait_for_one(store: Store) -> None:
    """The nested enqueue returns before its job ran; result() on that thread runs it then; the rest run in order."""
    engine = JobEngine(store, immediate=True)
    order: list[str] = []

    def child(_ctx: JobContext, name: str) -> str:
        order.append(name)
        return name.upper()

    def parent(_ctx: JobContext, _payload: object) -> str:
        order.append("parent")
        later = engine.enqueue("child", "later")
        assert engine.get_job(later).state is JobState.PENDING  # queued behind this handler
        awaited = engine.enqueue("child", "awaited")
        assert engine.result(awaited, timeout=10) == "AWAITED"  # run now, for the waiter
        order.append("parent done")
        return later

    engine.register("child", child, max_retries=0)
    engine.register("parent", parent, max_retries=0)
    parent_id = engine.enqueue("parent")
    later_id = engine.result(parent_id, timeout=10)
    # result() runs the awaited job as enqueue would: after what the store hands out first ("later", older).
    assert order == ["parent", "later", "awaited", "parent done"]
    assert engine.result(later_id, timeout=10) == "LATER"
    assert {state: n for state, n in engine.counts().items() if n} == {"completed": 3}
