"""Lock holds on every store: a serial lock stays held past its job's running state while its handler runs.

A handler past its timeout, or whose running job an operator cancelled, goes on until it
returns (a thread cannot be killed). The engine stores a hold before it ends such a claim
(``Store.hold_locks``), an operator's ``cancel`` of a running job makes one in its own
transaction, and the worker deletes it when the handler returns (``release_holds``). Until
then no job of the lock is claimed, the job's own retry included; a hold whose worker died
(its heartbeat stopped) is reaped by ``reap_stale``; cron ``overlap="skip"`` sees holds.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import SHARED_STORE_PARAMS
from test_stores import T0, job

from threaddispatch.stores import JobState, Store
from threaddispatch.stores.base import CronEntry, JobRecord, LockHold
from threaddispatch.testing import wait_for

LATER = T0 + 100  # "now" for claims: every job is due


def _locked(store: Store, count: int = 2, *, lock: str = "customer:42", **fields: object) -> list[JobRecord]:
    """``count`` jobs of queue q holding ``lock``, stored in order."""
    jobs = [job(queue="q", lock=lock, **fields) for _ in range(count)]
    store.enqueue(jobs)
    return jobs


def _claim(store: Store, worker: str = "w", now: float = LATER) -> list[str]:
    return [claimed.id for claimed in store.claim(["q"], 10, worker_id=worker, now=now)]


def _claim_first(store: Store, jobs: list[JobRecord]) -> JobRecord:
    claimed = store.claim(["q"], 10, worker_id="w", now=LATER)
    assert [found.id for found in claimed] == [jobs[0].id]
    return claimed[0]


def test_a_hold_keeps_the_lock_after_its_job_failed_until_it_is_released(store: Store) -> None:
    first, second = _locked(store)
    claimed = _claim_first(store, [first, second])
    assert store.hold_locks([(first.id, claimed.attempts)], worker_id="w", now=LATER) == {first.id}
    assert store.fail(first.id, worker_id="w", attempts=claimed.attempts, error="timed out", now=LATER)
    assert store.get(first.id).state is JobState.FAILED  # type: ignore[union-attr]
    assert _claim(store) == []  # the handler still runs: the lock is held
    assert store.list_holds() == [LockHold("customer:42", first.id, claimed.attempts, "w", LATER)]
    assert store.release_holds([(first.id, claimed.attempts)], worker_id="w") == 1
    assert store.release_holds([(first.id, claimed.attempts)], worker_id="w") == 0  # idempotent
    assert store.list_holds() == []
    assert _claim(store) == [second.id]


def test_a_hold_keeps_the_jobs_own_retry_waiting(store: Store) -> None:
    """A timed-out attempt retried: its next attempt would run beside the first one's handler."""
    (only,) = _locked(store, 1)
    claimed = _claim_first(store, [only])
    store.hold_locks([(only.id, claimed.attempts)], worker_id="w", now=LATER)
    assert store.retry_later(only.id, worker_id="w", attempts=1, run_at=LATER, error="timed out", now=LATER)
    assert _claim(store) == []
    store.release_holds([(only.id, 1)], worker_id="w")
    assert _claim(store) == [only.id]


def test_holds_name_a_claim_and_only_their_own_lock(store: Store) -> None:
    first, second = _locked(store)
    other = _locked(store, 1, lock="customer:7")[0]
    plain = job(queue="q")
    store.enqueue([plain])
    claimed = store.claim(["q"], 10, worker_id="w", now=LATER)
    assert {found.id for found in claimed} == {first.id, other.id, plain.id}
    # Not the claim (another worker, another attempt), or no lock: no hold.
    assert store.hold_locks([(first.id, 1)], worker_id="someone-else", now=LATER) == set()
    assert store.hold_locks([(first.id, 2)], worker_id="w", now=LATER) == set()
    assert store.hold_locks([(plain.id, 1)], worker_id="w", now=LATER) == set()
    assert store.hold_locks([(first.id, 1), (first.id, 1)], worker_id="w", now=LATER) == {first.id}  # idempotent
    assert [hold.job_id for hold in store.list_holds()] == [first.id]
    assert store.list_holds(lock="customer:7") == []
    for done in (first, other, plain):
        assert store.complete(done.id, worker_id="w", attempts=1, result=None, now=LATER)
    assert _claim(store) == []  # customer:42 held; customer:7 has no next job
    more = _locked(store, 1, lock="customer:7")[0]
    assert _claim(store) == [more.id]  # another lock is free
    store.release_holds([(first.id, 1)], worker_id="w")
    assert _claim(store) == [second.id]


def test_an_operators_cancel_of_a_running_locked_job_holds_its_lock(store: Store) -> None:
    first, second, third = _locked(store, 3)
    claimed = _claim_first(store, [first, second, third])
    assert store.cancel(first.id, now=LATER, error="cancelled by an operator")
    assert store.get(first.id).state is JobState.CANCELLED  # type: ignore[union-attr]
    assert store.list_holds() == [LockHold("customer:42", first.id, claimed.attempts, "w", LATER)]
    assert _claim(store) == []
    # A cancel of a job that is not running (pending) makes none.
    assert store.cancel(second.id, now=LATER)
    assert [hold.job_id for hold in store.list_holds()] == [first.id]
    assert store.release_holds([(first.id, claimed.attempts)], worker_id="w") == 1
    assert _claim(store) == [third.id]


def test_a_handlers_own_cancel_and_a_cancel_of_unclaimed_jobs_hold_nothing(store: Store) -> None:
    first, second = _locked(store)
    _claim_first(store, [first, second])
    # Cancel raised by the handler (the claim's own cancel): the handler has returned.
    assert store.cancel(first.id, now=LATER, worker_id="w", attempts=1, error="Cancel")
    assert store.list_holds() == []
    assert _claim(store) == [second.id]
    third = _locked(store, 1)[0]
    assert not store.cancel(second.id, now=LATER, include_running=False)  # running: refused, nothing held
    assert store.list_holds() == []
    assert store.cancel(third.id, now=LATER, include_running=False)


def test_heartbeats_keep_holds_and_the_reaper_deletes_those_of_dead_workers(store: Store) -> None:
    a1, a2 = _locked(store, lock="a")
    b1, b2 = _locked(store, lock="b")
    assert set(_claim(store, "alive", now=T0)) == {a1.id, b1.id}
    store.hold_locks([(a1.id, 1), (b1.id, 1)], worker_id="alive", now=T0)
    for first in (a1, b1):
        assert store.fail(first.id, worker_id="alive", attempts=1, error="timed out", now=T0)
    assert store.heartbeat_holds([a1.id], worker_id="alive", now=T0 + 50) == {a1.id}
    assert store.heartbeat_holds([b1.id], worker_id="someone-else", now=T0 + 50) == set()
    # b's hold was last beaten at T0: its worker is taken for dead, the hold reaped; a's beaten at T0 + 50 stays.
    assert store.reap_stale(older_than=T0 + 10, now=T0 + 60) == []  # holds are not among the jobs recovered
    assert [(hold.job_id, hold.heartbeat_at) for hold in store.list_holds()] == [(a1.id, T0 + 50)]
    assert _claim(store, now=T0 + 60) == [b2.id]
    assert store.reap_stale(older_than=T0 + 51, now=T0 + 61) == []  # b2 claimed at T0 + 60 is live; a's hold goes
    assert store.list_holds() == []
    assert a2.id in _claim(store, now=T0 + 62)


def test_skip_cron_stores_no_job_while_a_hold_keeps_its_lock(store: Store) -> None:
    store.upsert_cron(CronEntry("every", "@every 1s", "task", "null", queue="q", last_tick=T0), now=T0)
    lock = "cron:every"
    (first,) = [job(queue="q", lock=lock)]
    assert store.fire_cron("every", tick=T0 + 1, job=first)
    claimed = _claim_first(store, [first])
    store.hold_locks([(first.id, claimed.attempts)], worker_id="w", now=LATER)
    assert store.fail(first.id, worker_id="w", attempts=1, error="timed out", now=LATER)
    second = job(queue="q", lock=lock)
    assert store.fire_cron("every", tick=T0 + 2, job=second)  # fired (the tick passed)...
    assert store.get(second.id) is None  # ...but stored nothing: the previous run's handler still runs
    store.release_holds([(first.id, 1)], worker_id="w")
    third = job(queue="q", lock=lock)
    assert store.fire_cron("every", tick=T0 + 3, job=third)
    assert store.get(third.id) is not None


def test_queue_cron_stores_its_job_which_waits_for_the_hold(store: Store) -> None:
    store.upsert_cron(CronEntry("every", "@every 1s", "task", "null", queue="q", last_tick=T0, overlap="queue"), now=T0)
    first, second = job(queue="q", lock="cron:every"), job(queue="q", lock="cron:every")
    assert store.fire_cron("every", tick=T0 + 1, job=first)
    claimed = _claim_first(store, [first])
    assert store.cancel(first.id, now=LATER)  # an operator's cancel: the handler may still run
    assert store.fire_cron("every", tick=T0 + 2, job=second)
    assert store.get(second.id) is not None
    assert _claim(store) == []
    store.release_holds([(first.id, claimed.attempts)], worker_id="w")
    assert _claim(store) == [second.id]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("store_kind", SHARED_STORE_PARAMS, indirect=True)
def test_releasing_a_hold_wakes_the_subscribers_of_other_stores(make_store: Callable[[], Store]) -> None:
    """The release is announced as a lock freed by a finished job is: its next job's queue."""
    store, listener = make_store(), make_store()
    first, _second = _locked(store)
    claimed = _claim_first(store, [first, _second])
    store.hold_locks([(first.id, claimed.attempts)], worker_id="w", now=LATER)
    assert store.fail(first.id, worker_id="w", attempts=1, error="timed out", now=LATER)
    got: list[tuple[str | None, float | None]] = []
    unsubscribe = listener.subscribe_wakeups(lambda queue, run_at: got.append((queue, run_at)))
    try:
        wait_for(lambda: (None, None) in got, 20, message="the listener's first look")
        marker = job(queue="marker")
        store.enqueue([marker])  # heard after whatever the fail announced: then forgotten
        wait_for(lambda: any(queue == "marker" for queue, _ in got), 20, message="the marker's wake-up")
        got.clear()
        assert store.release_holds([(first.id, 1)], worker_id="w") == 1
        wait_for(lambda: any(queue == "q" for queue, _ in got), 20, message="a wake-up for the lock's next job")
    finally:
        unsubscribe()
