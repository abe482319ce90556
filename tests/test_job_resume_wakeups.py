"""A queue resumed elsewhere (another engine, the CLI, the admin API) starts an idle engine's claim at once.

The store tells the engine with a wake-up for the resumed queue (PostgreSQL's NOTIFY;
tests/test_pg_processes.py runs it across processes). The engine side is store-agnostic: a
wake-up for a queue it believes paused makes its fetcher read the paused queues again
before its claim, instead of at its next refresh. Here on a MemoryStore that offers
wake-ups to its subscribers in the same process, polling every 30 s, so only the wake-up
can start the job within the test's 10 s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from threaddispatch import JobEngine
from threaddispatch.stores import MemoryStore
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)

WakeupCallback = Callable[[str | None, float | None], None]


class AnnouncingStore(MemoryStore):
    """A MemoryStore whose resume wakes its subscribers for the queue, as PostgresStore's NOTIFY does."""

    def __init__(self) -> None:
        super().__init__()
        self.subscribers: list[WakeupCallback] = []

    def subscribe_wakeups(self, callback: WakeupCallback) -> Callable[[], None]:
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback) if callback in self.subscribers else None

    def set_queue_paused(self, queue: str, paused: bool, *, now: float) -> None:
        super().set_queue_paused(queue, paused, now=now)
        if not paused:
            for callback in list(self.subscribers):
                callback(queue, now)


@pytest.mark.parametrize("announce", ["resume", "look_now"])
def test_queue_resumed_in_the_store_by_someone_else_is_claimed_at_once_when_the_store_says_so(announce: str) -> None:
    """The store resumes ``mail`` behind the engine's back; its wake-up (the queue's, or "look now") starts the job."""
    store = AnnouncingStore()
    store.set_queue_paused("mail", True, now=time.time())
    engine = JobEngine(store, poll_interval=30.0, max_poll_interval=60.0)
    ran = threading.Event()
    engine.register("send", lambda ctx, payload: ran.set())
    engine.start(queues=["mail"])
    try:
        wait_for(lambda: engine.stats()["idle_polls"] >= 1, 10, message="the engine idles, mail paused")
        job_id = engine.enqueue("send", queue="mail")
        wait_for(lambda: engine.stats()["idle_polls"] >= 2, 10, message="the enqueue's claim skipped mail")
        assert not ran.is_set()
        if announce == "resume":
            store.set_queue_paused("mail", False, now=time.time())  # as another process's engine or the CLI would
        else:
            MemoryStore.set_queue_paused(store, "mail", False, now=time.time())
            for callback in list(store.subscribers):
                callback(None, None)  # e.g. a reconnected listener: anything may have changed
        assert ran.wait(10), "the resumed queue's job did not start"
        assert engine.result(job_id, timeout=10) is None
    finally:
        assert engine.stop(10)


class ResumingDuringReadStore(AnnouncingStore):
    """Resumes ``mail`` and announces it from inside the engine's first read of the paused queues, which then
    returns what it read before the resume (the read raced the resume). The engine subscribes just after its
    fetcher starts: the read waits for that subscription first."""

    def __init__(self) -> None:
        super().__init__()
        self.subscribed = threading.Event()

    def subscribe_wakeups(self, callback: WakeupCallback) -> Callable[[], None]:
        unsubscribe = super().subscribe_wakeups(callback)
        self.subscribed.set()
        return unsubscribe

    def paused_queues(self) -> set[str]:
        read = super().paused_queues()
        if "mail" in read:
            assert self.subscribed.wait(10), "the engine did not subscribe"
            self.set_queue_paused("mail", False, now=time.time())
        return read


def test_resume_announced_while_the_engine_reads_the_paused_queues_is_not_lost() -> None:
    """The wake-up arrives while the engine's read (still seeing ``mail`` paused) is under way: it reads again."""
    store = ResumingDuringReadStore()
    store.set_queue_paused("mail", True, now=time.time())
    engine = JobEngine(store, poll_interval=30.0, max_poll_interval=60.0)
    ran = threading.Event()
    engine.register("send", lambda ctx, payload: ran.set())
    job_id = engine.enqueue("send", queue="mail")
    engine.start(queues=["mail"])
    try:
        assert ran.wait(10), "the job of the queue resumed during the read did not start"
        assert engine.result(job_id, timeout=10) is None
    finally:
        assert engine.stop(10)
