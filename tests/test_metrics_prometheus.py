"""The Prometheus collector: a scrape shows the same numbers as each face's stats()."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from threaddispatch import AsyncDispatcher, BackgroundDispatcher, BatchedDispatcher, JobEngine, testing
from threaddispatch.backoff import Constant
from threaddispatch.prometheus import ThreadDispatchCollector, prometheus_name
from threaddispatch.stores import MemoryStore

pytestmark = pytest.mark.timeout(30)


def labels(face: str, name: str, **more: str) -> dict[str, str]:
    return {"threaddispatch_face": face, "threaddispatch_dispatcher": name, **more}


def sample(registry: CollectorRegistry, name: str, found: dict[str, str]) -> float | None:
    """The value of ``name`` whose labels include ``found`` (a label a sample lacks reads as "")."""
    for family in registry.collect():
        for each in family.samples:
            if each.name == name and all(each.labels.get(key, "") == value for key, value in found.items()):
                return float(each.value)
    return None


def test_a_scrape_shows_the_faces_stats() -> None:
    sent: list[list[int]] = []
    background = BackgroundDispatcher(sent.append, 60_000, name="bg")  # a window no scrape outlasts
    batched = BatchedDispatcher(lambda t, m: [ValueError("no") if x == "bad" else "id" for x in m], name="sqs")
    recording = testing.RecordingDispatcher[str]()
    buffered = AsyncDispatcher(recording, "jobs")
    registry = CollectorRegistry()
    registry.register(ThreadDispatchCollector(background, batched, buffered))
    try:
        for number in range(5):
            background.enqueue(number)
        bg = labels("BackgroundDispatcher", "bg")
        stats = background.stats()
        assert sample(registry, "threaddispatch_enqueued_total", bg) == stats["enqueued"] == 5
        assert sample(registry, "threaddispatch_dropped_total", bg) == stats["dropped"] == 0
        assert sample(registry, "threaddispatch_queue_depth", bg) == stats["pending"] == 5
        assert background.flush(10)
        stats = background.stats()
        assert sample(registry, "messaging_client_sent_messages_total", {**bg, "error_type": ""}) == stats["sent"]
        assert sample(registry, "messaging_client_sent_messages_total", {**bg, "error_type": "_OTHER"}) == 0

        futures = [batched.submit("ok", "q"), batched.submit("bad", "q")]
        assert batched.flush(10)
        for future in futures:
            future.exception(10)
        sqs = labels("BatchedDispatcher", "sqs")
        stats = batched.stats()
        assert sample(registry, "threaddispatch_enqueued_total", sqs) == stats["submitted"] == 2
        assert sample(registry, "messaging_client_sent_messages_total", {**sqs, "error_type": ""}) == stats["sent"]
        assert sample(registry, "messaging_client_sent_messages_total", {**sqs, "error_type": "_OTHER"}) == 1
        assert sample(registry, "threaddispatch_batches_total", sqs) == stats["batches"]

        buffered.setup(10).put("m")
        with buffered:
            recording.wait_for_count(1, timeout=10)
            testing.wait_for(lambda: buffered.stats()["sent"] == 1, 10)
        jobs = labels("AsyncDispatcher", "jobs")
        stats = buffered.stats()
        assert sample(registry, "threaddispatch_enqueued_total", jobs) == stats["buffered"] == 1
        assert sample(registry, "messaging_client_sent_messages_total", {**jobs, "error_type": ""}) == 1
        assert sample(registry, "threaddispatch_queue_depth", jobs) == stats["waiting"] == 0
        text = generate_latest(registry).decode()
        assert "# TYPE messaging_client_sent_messages_total counter" in text
    finally:
        background.close(10)
        batched.close(10)
        buffered.close(10)


def test_a_job_engine_and_faces_added_later() -> None:
    engine = JobEngine(MemoryStore(), immediate=True, backoff=Constant(3600.0))
    engine.register("work", lambda ctx, payload: payload)
    collector = ThreadDispatchCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    collector.add(engine)
    engine.enqueue("work", 1)
    found = {"threaddispatch_face": "JobEngine"}
    stats: dict[str, Any] = engine.stats()
    assert sample(registry, "threaddispatch_jobs_total", {**found, "threaddispatch_job_outcome": "completed"}) == 1
    assert stats["completed"] == 1
    for state, count in engine.counts().items():
        assert sample(registry, "threaddispatch_jobs_state", {**found, "threaddispatch_job_state": state}) == count
    collector.remove(engine)
    assert sample(registry, "threaddispatch_jobs_total", found) is None


def test_a_collected_face_leaves_the_scrape() -> None:
    dispatcher = BackgroundDispatcher[object](lambda batch: None, name="gone")
    registry = CollectorRegistry()
    registry.register(ThreadDispatchCollector(dispatcher))
    assert sample(registry, "threaddispatch_enqueued_total", labels("BackgroundDispatcher", "gone")) == 0
    dispatcher.close(10)
    del dispatcher
    gc.collect()
    assert sample(registry, "threaddispatch_enqueued_total", {}) is None


def test_prometheus_names() -> None:
    assert prometheus_name("messaging.client.sent.messages") == "messaging_client_sent_messages"
