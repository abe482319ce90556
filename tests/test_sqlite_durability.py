"""SQLiteStore(durability=...): its validation, and the group commit of concurrent enqueues (every durability)."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlite_threads import run_threads

from threaddispatch.errors import ConfigurationError, StoreError
from threaddispatch.stores import JobRecord, JobState, SQLiteStore
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)

#: Every durability joins concurrent enqueues; "full" also shares the fsync (and lingers for a group).
DURABILITIES = pytest.mark.parametrize("durability", ["normal", "full"])


def _job(job_id: str | None = None) -> JobRecord:
    now = time.time()
    return JobRecord(
        id=job_id or uuid.uuid4().hex, name="noop", payload="null", run_at=now, created_at=now, updated_at=now
    )


@pytest.mark.parametrize("durability", ["fast", "FULL", "", None, ["full"], 1])
def test_an_unknown_durability_is_refused_naming_it(tmp_path: Path, durability: object) -> None:
    with pytest.raises(ConfigurationError, match="durability") as caught:
        SQLiteStore(tmp_path / "jobs.db", durability=durability)  # type: ignore[arg-type]
    assert repr(durability) in str(caught.value)


def test_full_durability_refuses_a_weaker_synchronous(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="'NORMAL'"):
        SQLiteStore(tmp_path / "jobs.db", durability="full", synchronous="NORMAL")


def test_an_unknown_synchronous_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="'sometimes'"):
        SQLiteStore(tmp_path / "jobs.db", synchronous="sometimes")


_LEVELS = [("normal", None, 1), ("full", None, 1), ("normal", "full", 2), ("full", "EXTRA", 3)]


@pytest.mark.parametrize(("durability", "synchronous", "level"), _LEVELS)
def test_the_durability_sets_each_connections_synchronous(
    tmp_path: Path, durability: str, synchronous: str | None, level: int
) -> None:
    store = SQLiteStore(tmp_path / "jobs.db", durability=durability, synchronous=synchronous)
    try:
        assert store.describe()["durability"] == durability
        with store._connections.slot().lock:
            assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == level
    finally:
        store.close()


@DURABILITIES
@pytest.mark.timeout(120)
def test_group_commit_keeps_every_job_of_four_threads_each_committed_before_its_enqueue_returns(
    tmp_path: Path, durability: str
) -> None:
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path, durability=durability)
    missing: list[str] = []
    start = threading.Barrier(4)

    def produce() -> None:
        check = sqlite3.connect(path, timeout=30)
        try:
            start.wait(30)
            for _ in range(40):
                job = _job()
                store.enqueue([job])
                # Another connection sees it at once: the enqueue returned after its own commit.
                if check.execute("SELECT 1 FROM dispatch_jobs WHERE id = ?", (job.id,)).fetchone() is None:
                    missing.append(job.id)
        finally:
            check.close()

    try:
        assert run_threads([produce] * 4) == []
        assert missing == []
        assert store.counts()[JobState.PENDING] == 160
    finally:
        store.close()


class _HeldFirstCommit:
    """Wraps a store's ``_write_jobs``: the first call waits for ``release``; records each group's size."""

    def __init__(self, store: SQLiteStore) -> None:
        self.inner = store._write_jobs
        self.release = threading.Event()
        self.entered = threading.Event()
        self.groups: list[int] = []

    def __call__(self, requests: Sequence[Sequence[JobRecord]]) -> list[list[str]]:
        self.groups.append(len(requests))
        if len(self.groups) == 1:
            self.entered.set()
            assert self.release.wait(30)
        return self.inner(requests)


def _enqueue_in_threads(store: SQLiteStore, batches: list[list[JobRecord]]) -> list[object]:
    """Enqueue each batch on its own thread while a first commit is held; each thread's ids or error."""
    held = _HeldFirstCommit(store)
    store._write_jobs = held  # type: ignore[method-assign]
    outcomes: list[object] = [None] * len(batches)

    def run(index: int) -> None:
        try:
            outcomes[index] = store.enqueue(batches[index])
        except StoreError as error:
            outcomes[index] = error

    first = threading.Thread(target=run, args=(0,), name="leader")
    first.start()
    assert held.entered.wait(30)
    others = [threading.Thread(target=run, args=(n,), name=f"follower-{n}") for n in range(1, len(batches))]
    for thread in others:
        thread.start()
    assert store._committer is not None
    committer = store._committer
    wait_for(lambda: len(committer._queue) == len(others), 30, message="the followers to queue")
    held.release.set()
    for thread in (first, *others):
        thread.join(30)
        assert not thread.is_alive()
    assert held.groups[:2] == [1, len(others)]  # the followers shared one commit
    return outcomes


@DURABILITIES
@pytest.mark.timeout(120)
def test_enqueues_queued_during_a_commit_share_the_next_one(tmp_path: Path, durability: str) -> None:
    store = SQLiteStore(tmp_path / "jobs.db", durability=durability)
    try:
        batches = [[_job()] for _ in range(4)]
        outcomes = _enqueue_in_threads(store, batches)
        assert outcomes == [[batch[0].id] for batch in batches]
        assert store.counts()[JobState.PENDING] == 4
    finally:
        store.close()


@DURABILITIES
@pytest.mark.timeout(120)
def test_a_bad_enqueue_in_a_group_fails_only_its_caller(tmp_path: Path, durability: str) -> None:
    store = SQLiteStore(tmp_path / "jobs.db", durability=durability)
    try:
        taken = _job()
        store.enqueue([taken])
        batches = [[_job()], [_job()], [_job(taken.id)], [_job()]]
        outcomes = _enqueue_in_threads(store, batches)
        assert isinstance(outcomes[2], StoreError)
        for index in (0, 1, 3):
            assert outcomes[index] == [batches[index][0].id]
        assert store.counts()[JobState.PENDING] == 4
    finally:
        store.close()


def test_full_durability_keeps_the_wal_small_so_each_fsync_rewrites_it_in_place(tmp_path: Path) -> None:
    """With ``durability="full"`` the WAL is checkpointed every 1,000 pages and restarts: commits overwrite
    its blocks instead of growing the file (growing it, each commit's fsync also journals the new size:
    measured 1.5-3x slower per commit on ext4), so it never holds much more than 1,000 pages."""
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path, durability="full")
    wal = Path(f"{path}-wal")
    try:
        with store._connections.slot().lock:
            page = int(store._conn().execute("PRAGMA page_size").fetchone()[0])
        largest = 0
        for _ in range(500):  # each transaction some 8 pages (5 rows, 5 random places in the id index)
            store.enqueue([_job() for _ in range(5)])
            largest = max(largest, wal.stat().st_size)
        assert largest < 2_000 * (page + 24), f"the WAL grew to {largest / (page + 24):.0f} pages"
        assert store.counts()[JobState.PENDING] == 2_500
    finally:
        store.close()


class _CountingCondition:
    """A Condition's stand-in that counts ``notify`` calls (the wake-ups a lingering leader would get)."""

    def __init__(self, inner: threading.Condition) -> None:
        self.inner = inner
        self.notified = 0

    def notify(self, n: int = 1) -> None:
        self.notified += 1
        self.inner.notify(n)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@DURABILITIES
@pytest.mark.timeout(120)
def test_callers_queueing_behind_a_commit_wake_nobody_until_a_leader_lingers_for_them(
    tmp_path: Path, durability: str
) -> None:
    """Each wake-up costs a context switch on the cycle between two fsyncs: a caller that queues while a
    commit runs (no leader lingering) notifies no one; it is woken once, settled or made the next leader."""
    store = SQLiteStore(tmp_path / "jobs.db", durability=durability)
    try:
        assert store._committer is not None
        counting = _CountingCondition(store._committer._queued)
        store._committer._queued = counting  # type: ignore[assignment]
        batches = [[_job()] for _ in range(4)]
        outcomes = _enqueue_in_threads(store, batches)
        assert outcomes == [[batch[0].id] for batch in batches]
        assert counting.notified == 0
    finally:
        store.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("durability", ["normal", "full"])
def test_a_lone_enqueue_that_fails_hands_the_lead_on_to_the_callers_queued_behind_it(
    tmp_path: Path, durability: str
) -> None:
    """A caller leading alone (no group built: the one-producer path) whose commit fails gets its own
    StoreError; the callers that queued meanwhile are then led by one of them, not left waiting."""
    store = SQLiteStore(tmp_path / "jobs.db", durability=durability)
    try:
        taken = _job()
        store.enqueue([taken])
        batches = [[_job(taken.id)], [_job()], [_job()]]  # the leader's own job is the bad one
        outcomes = _enqueue_in_threads(store, batches)
        assert isinstance(outcomes[0], StoreError)
        assert outcomes[1:] == [[batch[0].id] for batch in batches[1:]]
        assert store.counts()[JobState.PENDING] == 3
        assert store._committer is not None and not store._committer._leading
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_only_full_durability_lingers_for_a_group(tmp_path: Path) -> None:
    """Without an fsync to share a leader never waits for callers to queue: after a group of four, a lone
    enqueue on a "normal" store commits at once; on a "full" store it waits (up to LINGER) for the three."""
    for durability, lingers in (("normal", False), ("full", True)):
        store = SQLiteStore(tmp_path / f"{durability}.db", durability=durability)
        try:
            _enqueue_in_threads(store, [[_job()] for _ in range(4)])  # leaves _last_group == 3
            committer = store._committer
            assert committer is not None
            waited: list[float] = []
            real_wait = committer._queued.wait

            def counting_wait(timeout: float | None = None, real_wait: object = real_wait) -> bool:
                waited.append(0.0 if timeout is None else timeout)
                assert callable(real_wait)
                return bool(real_wait(timeout))

            committer._queued.wait = counting_wait  # type: ignore[method-assign]
            job = _job()
            assert store.enqueue([job]) == [job.id]
            assert bool(waited) is lingers, (durability, waited)
        finally:
            store.close()
