"""SQLiteStore's per-thread connections: closed once their thread has ended; they never checkpoint on commit."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from threaddispatch.stores import JobRecord, SQLiteStore
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


def _open_files_on(path: Path) -> int:
    """How many of this process's file descriptors point at the database file itself."""
    target = str(path.resolve())
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                count += 1
        except OSError:  # closed meanwhile
            continue
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_the_connections_of_ended_threads_are_closed_when_a_new_thread_connects(tmp_path: Path) -> None:
    """30 short-lived threads each use the store once: their connections do not pile up (one per live thread)."""
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path)
    try:
        errors: list[BaseException] = []

        def use_once() -> None:
            try:
                store.counts()
            except BaseException as error:
                errors.append(error)

        for _ in range(30):
            thread = threading.Thread(target=use_once, name="short-lived")
            thread.start()
            thread.join(30)
            assert not thread.is_alive()
        assert errors == []
        # The main thread's connection (from migrate) and the last thread's: nothing else is left open.
        assert _open_files_on(path) <= 2
    finally:
        store.close()
    assert _open_files_on(path) == 0


def _jobs(count: int) -> list[JobRecord]:
    now = time.time()
    return [
        JobRecord(id=uuid.uuid4().hex, name="noop", payload="null", run_at=now, created_at=now, updated_at=now)
        for _ in range(count)
    ]


def test_commits_do_not_checkpoint_the_watcher_does(tmp_path: Path) -> None:
    """Enqueues leave the WAL to the watcher: no commit copies pages into the database file (the stall
    behind enqueue's p99); once an engine subscribes, the watcher's PASSIVE checkpoint does."""
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path)
    try:
        before = path.stat().st_size
        for job in _jobs(600):  # some 1,800 WAL pages: past SQLite's default autocheckpoint of 1,000
            store.enqueue([job])
        assert path.stat().st_size == before, "a commit checkpointed the WAL into the database file"
        unsubscribe = store.subscribe_wakeups(lambda queue, run_at: None)
        try:
            store.enqueue(_jobs(1))
            wait_for(lambda: path.stat().st_size > before, 20, message="the watcher to checkpoint")
        finally:
            unsubscribe()
    finally:
        store.close()
