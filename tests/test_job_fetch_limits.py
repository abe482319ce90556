"""The fetcher's idle wait when the cluster-wide queue limit, not an empty queue, left a claim short.

A claim of a limited queue that comes back short may be held back by other processes' use of the
shared limit (their running jobs, the store's token bucket), which the fetcher cannot see. It must
then look again within ``poll_interval`` rather than back off towards ``max_poll_interval``, or a
process takes its share of the limit late (30 s by default).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from threaddispatch import JobContext, JobEngine, QueueConfig
from threaddispatch.stores import MemoryStore
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)

POLL = 0.02


@pytest.mark.timeout(60)
def test_a_claim_held_back_by_the_cluster_limit_does_not_back_off() -> None:
    store = MemoryStore()
    limits = [QueueConfig("limited", max_concurrency=1)]
    release = threading.Event()

    def hold(ctx: JobContext, payload: Any) -> None:
        release.wait(30)

    holder = JobEngine(store, queues=["limited"], queue_configs=limits, poll_interval=POLL, max_poll_interval=5.0)
    holder.register("hold", hold)
    other = JobEngine(store, queues=["limited"], queue_configs=limits, poll_interval=POLL, max_poll_interval=5.0)
    other.register("hold", hold)
    first = holder.enqueue("hold", None, queue="limited")
    holder.start()
    wait_for(lambda: holder.get_job(first).state.value == "running", timeout=10)
    second = holder.enqueue("hold", None, queue="limited")  # ready, but the cluster's one slot is taken

    waits: list[float] = []
    wake = other._shared.wake
    plain_wait = wake.wait

    def recording_wait(timeout: float | None = None) -> bool:
        waits.append(-1.0 if timeout is None else timeout)
        return plain_wait(timeout)

    wake.wait = recording_wait  # type: ignore[method-assign]
    other.start()
    try:
        wait_for(lambda: len(waits) >= 6, timeout=20, message="the other engine's fetcher polled")
        assert holder.get_job(second).state.value == "pending"  # the limit held it back
        assert max(waits[:6]) <= POLL  # no back-off while the limit, not an empty queue, holds the job
    finally:
        release.set()
        assert other.stop(10) and holder.stop(10)
