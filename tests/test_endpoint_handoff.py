"""EndpointBatchDispatcher at its in-flight limit: a sending thread whose batch ends sends the next due one itself.

No timings: each test counts hand-offs to the pool and refusals, the structure that keeps one
batch's cost flat while sends hold every slot (issue 14), and checks every job is delivered once.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

import pytest

from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.endpoint import DispatchJob, EndpointBatchDispatcher
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)


class _Sink:
    """Records each batch; the first ``blocked`` sends wait for ``release``."""

    def __init__(self, blocked: int) -> None:
        self.blocked = blocked
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.batches: list[tuple[Hashable, list[Any]]] = []
        self.waiting = 0

    def __call__(self, endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        with self.lock:
            self.batches.append((endpoint_id, [job.payload for job in jobs]))
            hold = len(self.batches) <= self.blocked
            if hold:
                self.waiting += 1
        if hold:
            assert self.release.wait(10)


def _counting_handoffs(d: EndpointBatchDispatcher) -> list[int]:
    """Wrap the pool's ``run`` to count the sending threads started (the watch is not one)."""
    pool = d._core.pool
    real_run = pool.run
    handoffs = [0]

    def run(fn: Any, *args: Any) -> None:
        if fn == d._core.pooled_run:
            handoffs[0] += 1
        real_run(fn, *args)

    pool.run = run  # type: ignore[method-assign]
    return handoffs


@pytest.mark.parametrize("limit", [1, 3])
def test_at_the_limit_each_freed_slot_goes_to_the_next_due_batch_with_no_handoff(limit: int) -> None:
    sink = _Sink(blocked=limit)
    d = EndpointBatchDispatcher(sink, max_batch_size=1, batch_timeout=60, max_concurrent_batches=limit)
    handoffs = _counting_handoffs(d)
    skipped: list[Hashable] = []
    d.on("batch_skipped", lambda payload: skipped.append(payload["endpoint_id"]))
    jobs = [DispatchJob(f"e{i}", i) for i in range(60)]
    for job in jobs:
        d.add_job(job)  # each a full batch of one: due at once
    wait_for(lambda: sink.waiting == limit and skipped, message="every slot taken and the next batch refused")
    sink.release.set()
    wait_for(lambda: all(job.status == "delivered" for job in jobs), message="every job delivered")
    assert sorted(payload for _endpoint, payloads in sink.batches for payload in payloads) == list(range(60))
    assert all(endpoint == f"e{payloads[0]}" for endpoint, payloads in sink.batches)
    # The sends that filled the slots started a thread each; the other batches went on the
    # threads already sending (a slow send may start one more: far fewer than one per batch).
    assert limit <= handoffs[0] < len(jobs) // 4
    assert skipped == [f"e{limit}"]  # one refusal at the limit, not one per batch behind it
    assert d.get_batch_stats().active_batches_count == 0
    assert d.shutdown(5)


def test_at_the_limit_batches_keep_their_order_on_the_thread_that_sends_them() -> None:
    """One slot: the held batch goes first when the slot frees, then the others in the order they became due."""
    sink = _Sink(blocked=1)
    d = EndpointBatchDispatcher(sink, max_batch_size=2, batch_timeout=60, max_concurrent_batches=1)
    for i in range(20):
        d.add_job(DispatchJob(f"e{i % 10}", i))  # the second round fills each endpoint's batch
    wait_for(lambda: sink.waiting == 1, message="the first batch in flight")
    sink.release.set()
    wait_for(lambda: d.get_batch_stats().pending_jobs_count == 0 and len(sink.batches) == 10, message="all sent")
    assert sink.batches == [(f"e{i}", [i, i + 10]) for i in range(10)]
    assert d.shutdown(5)


def test_a_failed_send_at_the_limit_is_retried_and_the_next_batch_still_goes() -> None:
    """The sending thread settles a failed batch (its retry scheduled) and goes on with the next due batch."""
    release = threading.Event()
    attempts: dict[Hashable, int] = {}
    lock = threading.Lock()

    def send(endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        with lock:
            attempts[endpoint_id] = attempts.get(endpoint_id, 0) + 1
            first_try = attempts[endpoint_id] == 1
        if endpoint_id == "e0":
            assert release.wait(10)
        if endpoint_id == "e1" and first_try:
            raise RuntimeError("down once")

    d = EndpointBatchDispatcher(
        send,
        max_batch_size=1,
        batch_timeout=60,
        max_concurrent_batches=1,
        retry=RetryPolicy(max_attempts=2, backoff=Constant(0.01)),
    )
    jobs = [DispatchJob(f"e{i}", i) for i in range(5)]
    for job in jobs:
        d.add_job(job)
    release.set()
    wait_for(lambda: all(job.status == "delivered" for job in jobs), message="every job delivered")
    assert attempts == {"e0": 1, "e1": 2, "e2": 1, "e3": 1, "e4": 1}
    assert jobs[1].attempts == 2
    assert d.shutdown(5)
