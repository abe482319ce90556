"""``pause_queue`` takes effect in its own engine at once (its docstring's promise), even when it races the fetcher.

Two races, each forced here deterministically by a store that pauses the queue from inside a call the
fetcher makes: a refresh of the paused set that read the store just before the pause must not undo
it, and a claim that was under way when the pause landed must hand a paused queue's job back
instead of running it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest

from threaddispatch import JobEngine
from threaddispatch.stores import MemoryStore
from threaddispatch.stores.base import JobRecord, JobState
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


class PausingStore(MemoryStore):
    """Pauses ``mail`` through ``engine`` from inside the first armed call of ``paused_queues`` or ``claim``."""

    def __init__(self, during: str) -> None:
        super().__init__()
        self.during = during
        self.engine: JobEngine | None = None
        self.armed = threading.Event()
        self.paused_meanwhile = threading.Event()
        self.claimed_after_pause = threading.Event()
        self.refreshes = 0
        self.paused_after_race: set[str] | None = None  # the engine's paused set once the racing refresh was applied

    def _pause_once(self, call: str) -> None:
        if call == self.during and self.armed.is_set() and not self.paused_meanwhile.is_set():
            assert self.engine is not None
            self.engine.pause_queue("mail")
            self.paused_meanwhile.set()

    def paused_queues(self) -> set[str]:
        if self.paused_meanwhile.is_set() and self.paused_after_race is None and self.engine is not None:
            self.paused_after_race = set(self.engine._shared.paused)  # before this refresh applies its read
        stale = super().paused_queues()  # read before the pause lands: what a racing refresh sees
        self._pause_once("paused_queues")
        self.refreshes += 1
        return stale

    def claim(self, queues: Sequence[str], limit: int, *, worker_id: str, now: float) -> list[JobRecord]:
        racing = self.armed.is_set() and not self.paused_meanwhile.is_set()
        self._pause_once("claim")  # the fetcher planned this claim before the pause
        jobs = super().claim(queues, limit, worker_id=worker_id, now=now)
        if racing and self.during == "claim":
            self.claimed_after_pause.set()
        return jobs


def _engine(store: PausingStore, ran: list[Any]) -> JobEngine:
    engine = JobEngine(store, queues=["mail"], poll_interval=0.01, max_poll_interval=0.05)
    engine.register("send", lambda ctx, payload: ran.append(payload), queue="mail")
    store.engine = engine
    return engine


def test_a_refresh_that_read_the_store_before_a_pause_does_not_undo_it() -> None:
    store = PausingStore(during="paused_queues")
    ran: list[Any] = []
    engine = _engine(store, ran)
    engine.start()
    try:
        store.armed.set()
        wait_for(store.paused_meanwhile.is_set, timeout=20, message="a refresh raced the pause")
        wait_for(lambda: store.paused_after_race is not None, timeout=20, message="the racing refresh was applied")
        assert store.paused_after_race == {"mail"}
        job_id = engine.enqueue("send", 1)
        assert engine.get_job(job_id).state is JobState.PENDING
    finally:
        assert engine.stop(10)
    assert ran == []


def test_a_claim_under_way_when_the_queue_is_paused_hands_the_job_back() -> None:
    store = PausingStore(during="claim")
    ran: list[Any] = []
    engine = _engine(store, ran)
    job_id = engine.enqueue("send", 1)  # ready before the first claim, which the pause then races
    store.armed.set()
    engine.start()
    try:
        wait_for(store.paused_meanwhile.is_set, timeout=20, message="a claim raced the pause")
        wait_for(store.claimed_after_pause.is_set, timeout=20, message="the racing claim returned")
        wait_for(lambda: ran or engine.get_job(job_id).state is JobState.PENDING, timeout=20, message="settled")
    finally:
        assert engine.stop(10)
    job = engine.get_job(job_id)
    assert ran == [] and job.state is JobState.PENDING and job.attempts == 0
