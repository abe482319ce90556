"""SQLiteStore's wake-ups for jobs an UPDATE makes ready (migration 8's ready log): across processes and stores."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from threaddispatch.jobs import JobEngine
from threaddispatch.stores import JobState, SQLiteStore
from threaddispatch.stores.base import Completion, JobRecord
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(90)

_ROOT = Path(__file__).resolve().parents[1]
_PICKUP = 10.0  # seconds a job made ready elsewhere may take to start here: far below the engines' 30 s poll
Heard = list[tuple[str | None, float | None]]


class _Elsewhere:
    """A Python process running ``body`` on the store at ``path``; it and the test hand-shake by files in ``signals``.

    In ``body``: ``store`` (a SQLiteStore on the file), ``touch(name)`` and ``await_file(name)``.
    """

    def __init__(self, path: Path, signals: Path, body: str) -> None:
        self.signals = signals
        prelude = textwrap.dedent(
            f"""
            import os, sys, time
            sys.path.insert(0, {str(_ROOT)!r})
            from threaddispatch.jobs import JobEngine
            from threaddispatch.stores import JobState, SQLiteStore
            from threaddispatch.stores.base import Completion, JobRecord
            SIGNALS = {str(signals)!r}

            def touch(name):
                open(os.path.join(SIGNALS, name), "w").close()

            def await_file(name, timeout=60.0):
                deadline = time.monotonic() + timeout
                while not os.path.exists(os.path.join(SIGNALS, name)):
                    assert time.monotonic() < deadline, f"no {{name}} within {{timeout}}s"
                    time.sleep(0.005)

            store = SQLiteStore({str(path)!r})
            """
        )
        script = prelude + textwrap.dedent(body) + "\nstore.close()\ntouch('exited')\n"
        self.process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)

    def touch(self, name: str) -> None:
        (self.signals / name).touch()

    def await_file(self, name: str, timeout: float = 60.0) -> None:
        wait_for(lambda: (self.signals / name).exists() or self._died(), timeout, message=f"{name} from the process")
        assert (self.signals / name).exists(), self._stderr()

    def _died(self) -> bool:
        return self.process.poll() not in (None, 0)

    def _stderr(self) -> str:
        self.process.wait(30)
        return self.process.stderr.read() if self.process.stderr else ""

    def finish(self) -> None:
        """Wait for the process to exit cleanly."""
        try:
            assert self.process.wait(60) == 0, self._stderr()
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)


@contextlib.contextmanager
def _idle_engine(
    store: SQLiteStore, queues: list[str], handlers: dict[str, Callable[..., object]]
) -> Iterator[JobEngine]:
    """A started engine on ``queues`` whose poll would take 30 s, idle: only a wake-up makes it look sooner.

    The watcher has made its first look before the engine starts (its "look now" wake-up
    went to an earlier subscriber), so only what is committed later can wake the engine.
    """
    _, unsubscribe = _heard(store)
    engine = JobEngine(store, poll_interval=30.0, max_poll_interval=30.0, queues=queues)
    for name, handler in handlers.items():
        engine.register(name, handler, queue=queues[0])
    try:
        engine.start()
        wait_for(lambda: engine.stats()["idle_polls"] >= 1, 20, message="the engine's fetcher to go idle")
        yield engine
    finally:
        engine.stop(10)
        unsubscribe()


def _producer(store: SQLiteStore) -> JobEngine:
    """An engine that is never started: it enqueues the tests' jobs (their queues and lock come with the name)."""
    engine = JobEngine(store)
    engine.register("first", lambda ctx, payload: None, queue="a")
    engine.register("second", lambda ctx, payload: None, queue="b")
    engine.register("locked", lambda ctx, payload: None, queue="l", lock="the-lock")
    for name, queue in (("slow", "s"), ("flaky", "r"), ("work", "q")):
        engine.register(name, lambda ctx, payload: None, queue=queue)
    return engine


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "jobs.db")
    yield opened
    opened.close()


def _started_here(store: SQLiteStore, tmp_path: Path, name: str, body: str) -> None:
    """Run ``body`` in another process up to its ``touch("ready")``; then start an idle engine here on job
    ``name``'s queue, let the process go on (``await_file("go")``) and exit: the job must start here soon after."""
    signals = tmp_path / "signals"
    signals.mkdir()
    elsewhere = _Elsewhere(Path(store.path), signals, body)
    elsewhere.await_file("ready")
    started = threading.Event()
    queue = _producer(store).definitions()[name].queue
    with _idle_engine(store, [queue], {name: lambda ctx, payload: started.set()}):
        elsewhere.touch("go")
        elsewhere.finish()
        assert started.wait(_PICKUP), f"job {name} did not start here within {_PICKUP}s"


def _completed(store: SQLiteStore, job_id: str) -> JobRecord:
    stored = store.get(job_id)
    assert stored is not None and stored.state is JobState.COMPLETED, stored
    return stored


def test_a_dependent_released_by_another_process_starts_here_without_waiting_for_the_poll(
    store: SQLiteStore, tmp_path: Path
) -> None:
    producer = _producer(store)
    first = producer.enqueue("first")
    second = producer.enqueue("second", depends_on=[first])
    body = f"""
        engine = JobEngine(store, queues=["a"])
        engine.register("first", lambda ctx, payload: None, queue="a")
        touch("ready")
        await_file("go")
        engine.start()
        while store.get({first!r}).state is not JobState.COMPLETED:
            time.sleep(0.005)
        engine.stop(10)
        """
    _started_here(store, tmp_path, "second", body)
    _completed(store, second)


def test_a_job_another_process_hands_back_at_stop_starts_here_without_waiting_for_the_poll(
    store: SQLiteStore, tmp_path: Path
) -> None:
    job_id = _producer(store).enqueue("slow")
    body = """
        engine = JobEngine(store, queues=["s"])

        def slow(ctx, payload):
            touch("ready")
            ctx.wait(60)

        engine.register("slow", slow, queue="s")
        engine.start()
        await_file("go")
        engine.stop(0.2)  # the running job is handed back: pending again
        """
    _started_here(store, tmp_path, "slow", body)
    _completed(store, job_id)


def test_a_retry_another_process_schedules_starts_here_when_due(store: SQLiteStore, tmp_path: Path) -> None:
    job_id = _producer(store).enqueue("flaky")
    body = f"""
        (job,) = store.claim(["r"], 1, worker_id="elsewhere", now=time.time())
        assert job.id == {job_id!r}
        touch("ready")
        await_file("go")
        # The attempt failed: a retry in 0.3 s (the process then leaves).
        assert store.retry_later(job.id, worker_id="elsewhere", attempts=job.attempts,
                                 run_at=time.time() + 0.3, error="boom", now=time.time())
        """
    _started_here(store, tmp_path, "flaky", body)
    assert _completed(store, job_id).attempts == 2


def test_the_next_job_of_a_lock_another_process_finished_starts_here_without_waiting_for_the_poll(
    store: SQLiteStore, tmp_path: Path
) -> None:
    producer = _producer(store)
    holder = producer.enqueue("locked")
    waiter = producer.enqueue("locked")
    body = f"""
        (job,) = store.claim(["l"], 1, worker_id="elsewhere", now=time.time())
        assert job.id == {holder!r}
        touch("ready")
        await_file("go")
        assert store.complete(job.id, worker_id="elsewhere", attempts=job.attempts, result=None, now=time.time())
        """
    _started_here(store, tmp_path, "locked", body)
    _completed(store, waiter)


# -- in one process: two stores on one file (the watcher skips only its own store's inserts) ----------------------


def _heard(store: SQLiteStore) -> tuple[Heard, Callable[[], None]]:
    got: Heard = []
    unsubscribe = store.subscribe_wakeups(lambda queue, run_at: got.append((queue, run_at)))
    wait_for(lambda: (None, None) in got, 20, message="the watcher's first look")
    return got, unsubscribe


def _claimed(store: SQLiteStore, queue: str) -> tuple[str, int]:
    (job,) = store.claim([queue], 1, worker_id="w", now=time.time())
    return job.id, job.attempts


def _reap(store: SQLiteStore, queue: str) -> None:
    _claimed(store, queue)
    assert store.reap_stale(older_than=time.time() + 1, now=time.time())


def _requeue(store: SQLiteStore, queue: str) -> None:
    job_id, attempts = _claimed(store, queue)
    assert store.fail(job_id, worker_id="w", attempts=attempts, error="boom", now=time.time()) is not None
    store.requeue(job_id, now=time.time())


def _release(store: SQLiteStore, queue: str) -> None:
    _claimed(store, queue)
    assert store.release([store.list_jobs(queue=queue)[0].id], worker_id="w", now=time.time()) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("update", [_reap, _requeue, _release], ids=["reaped", "requeued", "released"])
def test_a_job_another_store_makes_ready_by_an_update_is_announced(
    tmp_path: Path, update: Callable[[SQLiteStore, str], None]
) -> None:
    path = tmp_path / "jobs.db"
    with contextlib.closing(SQLiteStore(path)) as writer, contextlib.closing(SQLiteStore(path)) as watched:
        _producer(writer).enqueue("work")  # before the watcher starts: not news
        got, unsubscribe = _heard(watched)
        try:
            update(writer, "q")
            wait_for(lambda: any(queue == "q" for queue, _ in got), 20, message="a wake-up for queue q")
        finally:
            unsubscribe()


def _log_rows(store: SQLiteStore, where: str = "1", *params: object) -> int:
    """How many ready log rows of ``store``'s file match ``where``."""
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        return int(conn.execute(f"SELECT count(*) FROM dispatch_ready_log WHERE {where}", params).fetchone()[0])


@pytest.mark.timeout(60)
def test_claims_and_completions_write_no_ready_log_rows(store: SQLiteStore) -> None:
    _producer(store).enqueue_many("work", [None] * 3)
    claimed = store.claim(["q"], 3, worker_id="w", now=time.time())
    store.complete_many([Completion(job.id, "w", job.attempts, None, None) for job in claimed], now=time.time())
    assert _log_rows(store) == 0


@pytest.mark.timeout(60)
def test_ready_log_rows_older_than_a_minute_are_pruned_by_later_writes(store: SQLiteStore) -> None:
    _producer(store).enqueue_many("work", [None] * 2)
    for _ in range(2):
        _release_one(store)
    with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
        conn.execute("UPDATE dispatch_ready_log SET at = at - 120")  # as if written two minutes ago
    for _ in range(2):
        _release_one(store)
    assert _log_rows(store, "at < ?", time.time() - 60) == 0
    assert _log_rows(store) == 2


def _release_one(store: SQLiteStore) -> None:
    """Claim a job of queue q and hand it back: one ready log row."""
    (job,) = store.claim(["q"], 1, worker_id="w", now=time.time())
    assert store.release([job.id], worker_id="w", now=time.time()) == 1


def _store_of_version(path: Path, version: int) -> SQLiteStore:
    """A store on ``path`` that knows (and has applied) the migrations up to ``version`` only."""

    class OldStore(SQLiteStore):
        MIGRATIONS = tuple(migration for migration in SQLiteStore.MIGRATIONS if migration[0] <= version)

    old = OldStore(path)
    assert old.schema_version() == version
    return old


# -- migration 8 on a file of schema 7 -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_version_7_file_with_a_waiting_job_upgrades_and_its_release_is_announced(tmp_path: Path) -> None:
    """A file made by migration 7 holding a waiting dependent gains the ready log; the release is then heard."""

    path = tmp_path / "old.db"
    with contextlib.closing(_store_of_version(path, 7)) as old:
        producer = _producer(old)
        first = producer.enqueue("first")
        second = producer.enqueue("second", depends_on=[first])
        (claimed,) = old.claim(["a"], 1, worker_id="w", now=time.time())
    with contextlib.closing(SQLiteStore(path)) as store, contextlib.closing(SQLiteStore(path)) as watched:
        assert store.schema_version() == SQLiteStore.MIGRATIONS[-1][0] >= 8
        assert SQLiteStore.MIGRATIONS[7][:2] == (8, "ready log")
        stored = store.get(second)
        assert stored is not None and stored.state is JobState.WAITING
        got, unsubscribe = _heard(watched)
        try:
            store.complete(claimed.id, worker_id="w", attempts=claimed.attempts, result=None, now=time.time())
            wait_for(lambda: any(queue == "b" for queue, _ in got), 20, message="a wake-up for queue b")
        finally:
            unsubscribe()
        released = store.get(second)
        assert released is not None and released.state is JobState.PENDING


# -- a resumed queue (migration 9) -----------------------------------------------------------------------------------


def _resume(store: SQLiteStore, queue: str) -> None:
    store.set_queue_paused(queue, False, now=time.time())


def _delete_pause(store: SQLiteStore, queue: str) -> None:
    with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
        conn.execute("DELETE FROM dispatch_queues WHERE queue = ?", (queue,))


def _wakes_for(watched: SQLiteStore, queue: str, action: Callable[[], None]) -> list[float | None]:
    """Run ``action`` with ``watched``'s watcher running; the ``run_at`` of its first wake-ups for ``queue``."""
    got, unsubscribe = _heard(watched)
    try:
        action()
        return wait_for(lambda: [run_at for name, run_at in got if name == queue], 20, message=f"a wake for {queue}")
    finally:
        unsubscribe()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("resume", [_resume, _delete_pause], ids=["resumed", "pause row deleted"])
def test_a_queue_another_store_resumes_is_announced(tmp_path: Path, resume: Callable[[SQLiteStore, str], None]) -> None:
    """Resuming a paused queue (its row set unpaused, or deleted by hand) in any process or store is a
    ready log row: every watcher announces ``(queue, when it was resumed)``, so idle engines look at once."""
    path = tmp_path / "jobs.db"
    with contextlib.closing(SQLiteStore(path)) as writer, contextlib.closing(SQLiteStore(path)) as watched:
        writer.set_queue_paused("q", True, now=time.time())
        writer.set_queue_paused("other", False, now=time.time())  # never paused: nothing to announce
        before = time.time()
        found = _wakes_for(watched, "q", lambda: resume(writer, "q"))
        assert found[0] is not None and before - 1 <= found[0] <= time.time() + 1
        assert _log_rows(writer, "queue = 'other'") == 0
        writer.set_queue_paused("q", False, now=time.time())  # resuming a running queue: no row
        assert _log_rows(writer, "queue = 'q'") == 1


@pytest.mark.timeout(60)
def test_a_version_8_file_with_a_paused_queue_upgrades_and_its_resume_is_announced(tmp_path: Path) -> None:
    """A file made by migration 8 with a paused queue gains the resume trigger; the resume is then heard."""
    path = tmp_path / "old.db"
    with contextlib.closing(_store_of_version(path, 8)) as old:
        old.set_queue_paused("q", True, now=time.time())
    with contextlib.closing(SQLiteStore(path)) as store, contextlib.closing(SQLiteStore(path)) as watched:
        assert store.schema_version() == SQLiteStore.MIGRATIONS[-1][0] >= 9
        assert SQLiteStore.MIGRATIONS[8][:2] == (9, "queue resumes")
        assert store.paused_queues() == {"q"}
        assert _wakes_for(watched, "q", lambda: _resume(store, "q"))
        assert store.paused_queues() == set()


@pytest.mark.timeout(60)
def test_a_job_of_a_queue_another_store_resumes_starts_on_an_idle_engine(tmp_path: Path) -> None:
    """End to end: an engine idle on a paused queue (its poll 30 s away) runs that queue's job once
    another store (as another process would) resumes it: the resume's wake-up makes it look again."""
    path = tmp_path / "jobs.db"
    with contextlib.closing(SQLiteStore(path)) as other, contextlib.closing(SQLiteStore(path)) as store:
        other.set_queue_paused("q", True, now=time.time())
        _producer(other).enqueue("work")
        started = threading.Event()
        with _idle_engine(store, ["q"], {"work": lambda ctx, payload: started.set()}):
            assert not started.is_set()
            _resume(other, "q")
            assert started.wait(_PICKUP), f"the resumed queue's job did not start within {_PICKUP}s"
