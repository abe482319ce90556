"""SQLiteStore(durability="full")'s durable commits: every write returns only after a WAL fdatasync that
started after its commit; a SIGKILLed process loses no enqueue that returned."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlite_threads import run_threads

from threaddispatch.errors import StoreError
from threaddispatch.stores import JobRecord, JobState, SQLiteStore, _sqlite_sync

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not _sqlite_sync.AVAILABLE, reason="needs os.fdatasync"),
]
_ROOT = str(Path(__file__).resolve().parent.parent)


def _job() -> JobRecord:
    now = time.time()
    return JobRecord(id=uuid.uuid4().hex, name="noop", payload="null", run_at=now, created_at=now, updated_at=now)


class _Log:
    """One ordered log of commits, syncs and returns (list.append is atomic)."""

    def __init__(self, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, frozenset[str]]] = []
        inner_write = store._write_jobs
        inner_sync = _sqlite_sync.sync_file

        def write_jobs(requests: Sequence[Sequence[JobRecord]]) -> list[list[str]]:
            ids = inner_write(requests)
            self.events.append(("committed", frozenset(job_id for found in ids for job_id in found)))
            return ids

        def sync_file(fd: int) -> None:
            self.events.append(("sync-start", frozenset()))
            inner_sync(fd)
            self.events.append(("sync-end", frozenset()))

        store._write_jobs = write_jobs  # type: ignore[method-assign]
        monkeypatch.setattr(_sqlite_sync, "sync_file", sync_file)

    def synced_between(self, job_id: str) -> bool:
        """Whether a sync started after ``job_id``'s commit and ended before its enqueue returned."""
        events = list(self.events)
        committed = next(i for i, (kind, ids) in enumerate(events) if kind == "committed" and job_id in ids)
        returned = events.index(("returned", frozenset([job_id])))
        kinds = [kind for kind, _ in events[committed:returned]]
        return "sync-start" in kinds and "sync-end" in kinds[kinds.index("sync-start") :]

    def syncs(self) -> int:
        return sum(1 for kind, _ in self.events if kind == "sync-end")


@pytest.mark.timeout(120)
def test_every_enqueue_returns_after_a_sync_that_started_after_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(tmp_path / "jobs.db", durability="full")
    log = _Log(store, monkeypatch)
    returned: list[str] = []

    def produce() -> None:
        for _ in range(30):
            job = _job()
            store.enqueue([job])
            log.events.append(("returned", frozenset([job.id])))
            returned.append(job.id)

    try:
        assert run_threads([produce] * 4) == []
        assert len(returned) == 120
        assert [job_id for job_id in returned if not log.synced_between(job_id)] == []
        assert log.syncs() <= 120  # shared: never more syncs than enqueues
    finally:
        store.close()


def test_claims_and_completions_are_synced_too_and_a_write_that_changed_nothing_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(tmp_path / "jobs.db", durability="full")
    log = _Log(store, monkeypatch)
    try:
        assert store.claim(["default"], 1, worker_id="w", now=time.time()) == []
        assert log.syncs() == 0
        store.enqueue([_job()])
        synced = log.syncs()
        [job] = store.claim(["default"], 1, worker_id="w", now=time.time())
        assert log.syncs() == synced + 1
        assert store.complete(job.id, worker_id="w", attempts=job.attempts, result=None, now=time.time())
        assert log.syncs() == synced + 2
    finally:
        store.close()


def test_a_new_wal_file_is_opened_and_its_directory_synced_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The -wal is deleted when the file's last connection closes (after a checkpoint that synced it into
    the database); the next store's syncs open the new -wal, and sync the directory naming it once."""
    directories: list[str] = []
    inner = _sqlite_sync._sync_directory

    def sync_directory(path: str) -> None:
        directories.append(path)
        inner(path)

    monkeypatch.setattr(_sqlite_sync, "_sync_directory", sync_directory)
    path = tmp_path / "jobs.db"
    for round_ in (1, 2):
        store = SQLiteStore(path, durability="full")
        try:
            store.enqueue([_job()])
            store.enqueue([_job()])
            assert directories == [str(tmp_path)] * round_
        finally:
            store.close()
        assert not Path(f"{path}-wal").exists()
    store = SQLiteStore(path)
    try:
        assert store.counts()[JobState.PENDING] == 4
    finally:
        store.close()


def test_a_failed_sync_fails_that_write_and_every_later_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After an fsync error Linux may have dropped the pages it could not write: nothing is reported durable again."""
    store = SQLiteStore(tmp_path / "jobs.db", durability="full")
    calls: list[int] = []

    def failing(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    try:
        store.enqueue([_job()])
        monkeypatch.setattr(_sqlite_sync, "sync_file", failing)
        with pytest.raises(StoreError, match="fsync"):
            store.enqueue([_job()])
        monkeypatch.undo()
        with pytest.raises(StoreError, match="fsync"):
            store.enqueue([_job()])
        assert len(calls) == 1
    finally:
        store.close()


_CHILD = """
import sys, threading
sys.path.insert(0, {root!r})
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import SQLiteStore
store = SQLiteStore({path!r}, durability="full")
engine = JobEngine(store)
engine.register("noop", lambda ctx, payload: None)
lock = threading.Lock()

def produce():
    while True:
        job_id = engine.enqueue("noop")
        with lock:
            sys.stdout.write(job_id + "\\n")
            sys.stdout.flush()

for _ in range(3):
    threading.Thread(target=produce, daemon=True).start()
threading.Event().wait()
"""


@pytest.mark.timeout(120)
def test_a_sigkilled_process_loses_no_enqueue_that_returned(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    SQLiteStore(path).close()  # the schema, before the child and this test race to make it
    script = textwrap.dedent(_CHILD.format(root=_ROOT, path=str(path)))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    returned: list[str] = []
    try:
        assert child.stdout is not None
        while len(returned) < 200:
            line = child.stdout.readline()
            assert line, "the child ended early"
            returned.append(line.strip())
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    store = SQLiteStore(path)
    try:
        missing = [job_id for job_id in returned if store.get(job_id) is None]
        assert missing == []
    finally:
        store.close()
    assert os.path.exists(path)
