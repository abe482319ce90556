"""``Store.replay_dead_letter`` places the new job as ``Store.requeue`` places a job run again, atomically.

In the transaction that deletes the dead letter: a ``unique_key`` an active job holds, or a
failed or cancelled dependency under policy ``"cancel"``, refuses the replay (InvalidStateError;
the dead letter and every job left as they were); an unfinished dependency makes the job
waiting; a dependency no longer stored counts as finished; a ``lock`` takes its turn behind
the lock's running holder. Every store kind, driven directly (no engine).
"""

from __future__ import annotations

import threading

import pytest
from test_stores import T0, job

from threaddispatch.errors import InvalidStateError, JobNotFoundError
from threaddispatch.stores import JobRecord, JobState, Store


def _dead_letter(store: Store, **fields: object) -> str:
    """The id of the dead letter of one job (of ``fields``) claimed and failed for good."""
    failed = job(max_retries=0, **fields)
    store.enqueue([failed])
    (claimed,) = store.claim([failed.queue], 1, worker_id="w", now=T0)
    letter = store.fail(failed.id, worker_id="w", attempts=claimed.attempts, error="boom", now=T0)
    assert letter is not None
    return letter.id


def _finish(store: Store, record: JobRecord, state: JobState) -> None:
    """Claim ``record`` (alone in its queue) and end it ``state`` (completed or failed)."""
    (claimed,) = store.claim([record.queue], 1, worker_id="w", now=T0)
    assert claimed.id == record.id
    if state is JobState.COMPLETED:
        assert store.complete(record.id, worker_id="w", attempts=claimed.attempts, result="1", now=T0)
    else:
        assert store.fail(record.id, worker_id="w", attempts=claimed.attempts, error="x", now=T0) is not None


def _unchanged(store: Store, letter_id: str, new: JobRecord) -> None:
    assert store.get_dead_letter(letter_id) is not None
    assert store.get(new.id) is None


def test_a_held_unique_key_refuses_the_replay(store: Store) -> None:
    """An active job holding the key: InvalidStateError naming the letter and the holder; nothing changes."""
    letter_id = _dead_letter(store, queue="a", unique_key="k")
    holder = job(queue="b", unique_key="k")
    store.enqueue([holder])
    new = job(queue="a", unique_key="k")
    with pytest.raises(InvalidStateError, match=rf"dead letter '{letter_id}'.*'k' is held by active job '{holder.id}'"):
        store.replay_dead_letter(letter_id, job=new)
    _unchanged(store, letter_id, new)
    assert store.enqueue([job(queue="c", unique_key="k")]) == [holder.id]


def test_a_replayed_job_holds_its_unique_key(store: Store) -> None:
    """With the key free the replayed job holds it: an enqueue with it returns the replayed job's id."""
    letter_id = _dead_letter(store, queue="a", unique_key="k")
    new = job(queue="a", unique_key="k")
    assert store.replay_dead_letter(letter_id, job=new) == new.id
    assert store.get_dead_letter(letter_id) is None
    assert store.enqueue([job(queue="a", unique_key="k")]) == [new.id]


@pytest.mark.parametrize("ended", [JobState.FAILED, JobState.CANCELLED])
def test_a_failed_or_cancelled_dependency_refuses_a_cancel_policy_replay(store: Store, ended: JobState) -> None:
    """Under policy "cancel" the replay is refused while a dependency is failed or cancelled (retry it first)."""
    dependency = job(queue="d")
    store.enqueue([dependency])
    if ended is JobState.FAILED:
        _finish(store, dependency, JobState.FAILED)
    else:
        assert store.cancel(dependency.id, now=T0)
    letter_id = _dead_letter(store, queue="a")
    new = job(queue="a", depends_on=(dependency.id,))
    with pytest.raises(InvalidStateError, match=rf"dependency '{dependency.id}' is {ended.value}"):
        store.replay_dead_letter(letter_id, job=new)
    _unchanged(store, letter_id, new)
    run = job(queue="a", depends_on=(dependency.id,), on_dependency_failure="run")
    assert store.replay_dead_letter(letter_id, job=run) == run.id
    assert store.get(run.id).state is JobState.PENDING  # type: ignore[union-attr]


def test_an_unfinished_dependency_makes_the_replay_wait(store: Store) -> None:
    """A pending dependency: the job is waiting (never claimed) and becomes pending when it completes."""
    dependency, done = job(queue="d"), job(queue="e")
    store.enqueue([dependency, done])
    _finish(store, done, JobState.COMPLETED)
    letter_id = _dead_letter(store, queue="a")
    new = job(queue="a", depends_on=(done.id, dependency.id))
    assert store.replay_dead_letter(letter_id, job=new) == new.id
    stored = store.get(new.id)
    assert stored is not None and (stored.state, stored.waiting_on) == (JobState.WAITING, 1)
    assert store.claim(["a"], 5, worker_id="w", now=T0) == []
    _finish(store, dependency, JobState.COMPLETED)
    stored = store.get(new.id)
    assert stored is not None and (stored.state, stored.waiting_on) == (JobState.PENDING, 0)
    assert [claimed.id for claimed in store.claim(["a"], 5, worker_id="w", now=T0)] == [new.id]


def test_a_dependency_no_longer_stored_counts_as_finished(store: Store) -> None:
    """A purged dependency blocks nothing (a replay is not refused for it, as an enqueue would be)."""
    letter_id = _dead_letter(store, queue="a")
    new = job(queue="a", depends_on=("job-purged-long-ago",))
    assert store.replay_dead_letter(letter_id, job=new) == new.id
    assert store.get(new.id).state is JobState.PENDING  # type: ignore[union-attr]


def test_a_replayed_locked_job_waits_for_the_running_holder(store: Store) -> None:
    """The replayed job's lock is honoured: not claimed while a job of its lock runs; claimed after."""
    letter_id = _dead_letter(store, queue="a", lock="customer:1")
    holder = job(queue="a", lock="customer:1")
    store.enqueue([holder])
    (claimed,) = store.claim(["a"], 5, worker_id="w", now=T0)
    new = job(queue="a", lock="customer:1")
    store.replay_dead_letter(letter_id, job=new)
    assert store.claim(["a"], 5, worker_id="w2", now=T0) == []
    assert store.complete(holder.id, worker_id="w", attempts=claimed.attempts, result=None, now=T0)
    assert [again.id for again in store.claim(["a"], 5, worker_id="w2", now=T0)] == [new.id]


@pytest.mark.timeout(60)
def test_a_letter_replayed_by_many_threads_at_once_with_a_key_makes_one_job(store: Store) -> None:
    """Eight threads replay one keyed letter, each with its own record: one job; the others JobNotFoundError."""
    letter_id = _dead_letter(store, queue="a", unique_key="k", lock="l")
    barrier = threading.Barrier(8, timeout=30)
    outcomes: list[object] = []
    guard = threading.Lock()

    def replay(record: JobRecord) -> None:
        barrier.wait()
        try:
            outcome: object = store.replay_dead_letter(letter_id, job=record)
        except JobNotFoundError:
            outcome = "gone"
        with guard:
            outcomes.append(outcome)

    records = [job(queue="a", unique_key="k", lock="l") for _ in range(8)]
    threads = [
        threading.Thread(target=replay, args=(record,), name=f"threaddispatch-test-replay-{n}")
        for n, record in enumerate(records)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    made = [outcome for outcome in outcomes if outcome != "gone"]
    assert len(made) == 1 and outcomes.count("gone") == 7, outcomes
    stored = [record.id for record in records if store.get(record.id) is not None]
    assert stored == made
    assert store.get(stored[0]).unique_key == "k"  # type: ignore[union-attr]
