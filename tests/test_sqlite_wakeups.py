"""SQLiteStore's wake-ups across processes: the watcher thread and what it tells an engine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from threaddispatch.jobs import JobEngine
from threaddispatch.stores import JobState, SQLiteStore
from threaddispatch.testing import live_dispatch_threads, wait_for

pytestmark = pytest.mark.timeout(60)

_ROOT = Path(__file__).resolve().parents[1]
_WATCH = ("threaddispatch-sqlite-watch", "threaddispatch-sqlite-checkpoint")


def _enqueue_elsewhere(path: Path, *, queue: str = "default", delay: float | None = None) -> str:
    """Enqueue job ``record`` from another Python process on the SQLite file at ``path``; its id."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(_ROOT)!r})
        from threaddispatch.jobs import JobEngine
        from threaddispatch.stores import SQLiteStore
        store = SQLiteStore({str(path)!r})
        engine = JobEngine(store)
        engine.register("record", lambda ctx, payload: None)
        print(engine.enqueue("record", {{"from": "elsewhere"}}, queue={queue!r}, delay={delay!r}))
        store.close()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip().splitlines()[-1]


def _watchers() -> list[threading.Thread]:
    """The live watcher and checkpoint threads."""
    return [thread for thread in live_dispatch_threads() if thread.name in _WATCH]


class _Wakeups:
    """A wake-up subscriber recording each ``(queue, run_at)``; ``wait(queue)`` blocks until one for it came."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, float | None]] = []
        self._cond = threading.Condition()

    def __call__(self, queue: str | None, run_at: float | None) -> None:
        with self._cond:
            self.seen.append((queue, run_at))
            self._cond.notify_all()

    def wait(self, queue: str | None, timeout: float = 20.0) -> float | None:
        """The run_at of the first wake-up for ``queue`` (None: the watcher's "look now")."""
        with self._cond:
            assert self._cond.wait_for(lambda: any(seen == queue for seen, _ in self.seen), timeout), (
                f"no wake-up for {queue!r} within {timeout}s; saw {self.seen}"
            )
            return next(run_at for seen, run_at in self.seen if seen == queue)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, SQLiteStore, _Wakeups]]:
    """A store on ``jobs.db`` with a recording subscriber: (path, store, wakeups)."""
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path)
    wakeups = _Wakeups()
    unsubscribe = store.subscribe_wakeups(wakeups)
    yield path, store, wakeups
    unsubscribe()
    store.close()


def test_a_job_enqueued_by_another_process_reaches_the_subscriber(watched: tuple[Path, SQLiteStore, _Wakeups]) -> None:
    path, _store, wakeups = watched
    _enqueue_elsewhere(path, queue="mail")
    wakeups.wait("mail")


def test_jobs_this_process_enqueued_are_not_announced_again(watched: tuple[Path, SQLiteStore, _Wakeups]) -> None:
    """The engine that enqueues wakes its own fetcher; the watcher only tells of other processes' jobs."""
    path, store, wakeups = watched
    wakeups.wait(None)  # the watcher's first look: rows from here on are news
    engine = JobEngine(store)
    engine.register("record", lambda ctx, payload: None)
    engine.enqueue("record", queue="own")
    # Committed after the own job, so any scan that finds it has found the own job too.
    _enqueue_elsewhere(path, queue="mail")
    wakeups.wait("mail")
    assert "own" not in [queue for queue, _ in wakeups.seen]


def test_a_delayed_job_from_another_process_is_announced_once_due(watched: tuple[Path, SQLiteStore, _Wakeups]) -> None:
    path, store, wakeups = watched
    job_id = _enqueue_elsewhere(path, queue="later", delay=0.3)
    run_at = wakeups.wait("later")
    job = store.get(job_id)
    assert job is not None
    assert run_at == job.run_at


def test_the_watcher_thread_runs_while_subscribed_and_stops_with_the_last_unsubscribe(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "jobs.db")
    try:
        assert _watchers() == []
        first = store.subscribe_wakeups(lambda queue, run_at: None)
        second = store.subscribe_wakeups(lambda queue, run_at: None)
        assert len(_watchers()) == 2
        first()
        first()  # idempotent
        assert len(_watchers()) == 2
        second()
        wait_for(lambda: not _watchers(), 10, message="the watcher thread to stop after the last unsubscribe")
    finally:
        store.close()


def test_close_stops_the_watcher_thread(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "jobs.db")
    unsubscribe = store.subscribe_wakeups(lambda queue, run_at: None)
    assert len(_watchers()) == 2
    store.close()
    wait_for(lambda: not _watchers(), 10, message="the watcher thread to stop at close")
    unsubscribe()  # after close: a no-op


def _wait_completed(store: SQLiteStore, job_id: str) -> None:
    def completed() -> bool:
        job = store.get(job_id)
        return job is not None and job.state is JobState.COMPLETED

    wait_for(completed, 20, message=f"job {job_id} to complete")


def _idle_engine(store: SQLiteStore) -> JobEngine:
    """A started engine whose poll would take a minute: only a wake-up makes it look sooner."""
    engine = JobEngine(store, poll_interval=60.0, max_poll_interval=60.0)
    engine.register("record", lambda ctx, payload: None)
    engine.start()
    return engine


@pytest.mark.timeout(90)
def test_an_idle_engine_runs_a_job_another_process_enqueued_without_waiting_for_its_poll(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path)
    engine = _idle_engine(store)
    try:
        wait_for(lambda: engine.stats()["idle_polls"] >= 1, 20, message="the engine's fetcher to go idle")
        _wait_completed(store, _enqueue_elsewhere(path))
    finally:
        engine.stop(10)
        store.close()


@pytest.mark.timeout(90)
def test_an_engine_runs_a_delayed_job_enqueued_before_it_started_without_waiting_for_its_poll(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    job_id = _enqueue_elsewhere(path, delay=1.0)
    store = SQLiteStore(path)
    engine = _idle_engine(store)
    try:
        _wait_completed(store, job_id)
    finally:
        engine.stop(10)
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.timeout(90)
def test_a_forked_child_starts_without_the_parents_watcher_and_its_own_hears_the_parent(tmp_path: Path) -> None:
    """Forked while subscribed: the child has no subscribers; its own subscription hears the parent's jobs."""
    script = textwrap.dedent(
        f"""
        import os, sys, threading
        sys.path.insert(0, {str(_ROOT)!r})
        from threaddispatch.jobs import JobEngine
        from threaddispatch.stores import SQLiteStore

        store = SQLiteStore({str(tmp_path / "jobs.db")!r})
        looked = threading.Event()
        unsubscribe = store.subscribe_wakeups(lambda queue, run_at: looked.set())
        assert looked.wait(20)  # the parent's watcher runs
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                assert not store._watcher.active, "the child inherited the parent's watcher state"
                heard = threading.Event()
                watching = threading.Event()

                def on_wakeup(queue, run_at):
                    (heard if queue == "to-child" else watching).set()

                stop = store.subscribe_wakeups(on_wakeup)
                assert watching.wait(20), "the child's watcher never looked"
                os.write(ready_write, b"x")
                assert heard.wait(20), "the child never heard of the parent's job"
                stop()
                store.close()
                code = 0
            finally:
                os._exit(code)
        os.close(ready_write)  # a child that fails early closes the pipe: the read ends
        if os.read(ready_read, 1) != b"x":
            print("child exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
            sys.exit(0)
        engine = JobEngine(store)
        engine.register("record", lambda ctx, payload: None)
        engine.enqueue("record", queue="to-child")
        _, status = os.waitpid(pid, 0)
        unsubscribe()
        store.close()
        print("child exit", os.waitstatus_to_exitcode(status))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=80, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "child exit 0", done.stderr


class _FakeSource:
    """A WatchSource with no new rows and ``later`` delayed jobs (run_at, queue) pending from the start."""

    def __init__(self, later: list[tuple[float, str]]) -> None:
        self.later = sorted(later)

    def _watch_version(self) -> int:
        return 1

    def _watch_rows(self, after_seq: int, limit: int) -> tuple[int, list[tuple[int, str, float]]]:
        return 0, []

    def _watch_released(self, after_seq: int, limit: int) -> tuple[int, int, list[tuple[int, str, float]]]:
        return 0, 0, []

    def _watch_later(self, after: float, limit: int) -> list[tuple[float, str]]:
        return [job for job in self.later if job[0] > after][:limit]

    def _watch_checkpoint(self) -> None:
        pass


def test_delayed_jobs_past_the_memory_cap_are_read_again_and_all_announced(monkeypatch: pytest.MonkeyPatch) -> None:
    from threaddispatch.stores import _sqlite_watch

    monkeypatch.setattr(_sqlite_watch, "_DUE_CAP", 3)
    start = time.time() + 0.2
    source = _FakeSource([(start + n * 0.01, f"q{n}") for n in range(10)])
    watcher = _sqlite_watch.Watcher(source, where="fake")
    wakeups = _Wakeups()
    unsubscribe = watcher.subscribe(wakeups)
    try:
        for n in range(10):
            assert wakeups.wait(f"q{n}") == start + n * 0.01
    finally:
        unsubscribe()
        watcher.close(5)
