"""EndpointBatchDispatcher against k-msg's BatchDispatcher: the error events, scheduled_at, max_attempts."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Any

import pytest

from threaddispatch import Constant, RetryPolicy
from threaddispatch.endpoint import EVENTS, DispatchJob, EndpointBatchDispatcher

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A send_batch answering with ``outcome(jobs)``; records (payloads, time.time()) per call."""

    def __init__(self, outcome: Any = None) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[list[Any], float]] = []
        self.outcome = outcome

    def __call__(self, _endpoint_id: Hashable, jobs: list[DispatchJob]) -> Any:
        with self.lock:
            self.calls.append(([job.payload for job in jobs], time.time()))
        return None if self.outcome is None else self.outcome(jobs)

    def count(self) -> int:
        with self.lock:
            return len(self.calls)


class Events:
    """Records every event as (name, payload), in emission order."""

    def __init__(self, dispatcher: EndpointBatchDispatcher) -> None:
        self.lock = threading.Lock()
        self.entries: list[tuple[str, dict[str, Any]]] = []
        for event in EVENTS:
            dispatcher.on(event, self._listener(event))

    def _listener(self, event: str) -> Any:
        def record(payload: dict[str, Any]) -> None:
            with self.lock:
                self.entries.append((event, payload))

        return record

    def of(self, event: str) -> list[dict[str, Any]]:
        with self.lock:
            return [payload for name, payload in self.entries if name == event]

    def names(self) -> list[str]:
        with self.lock:
            return [name for name, _ in self.entries]


def make(send: Any, **kwargs: Any) -> EndpointBatchDispatcher:
    kwargs.setdefault("batch_timeout", 60.0)  # only process_* sends, unless a test says otherwise
    return EndpointBatchDispatcher(send, **kwargs)


def status(job: DispatchJob) -> str:
    return job.status


# -- max_attempts ----------------------------------------------------------------------------


def test_the_readme_retry_policy_gives_five_attempts() -> None:
    """RetryPolicy(max_attempts=5) with a job that does not say otherwise: exactly 5 attempts."""
    sink = Recorder(lambda jobs: [False] * len(jobs))
    d = make(sink, batch_timeout=0.01, retry=RetryPolicy(max_attempts=5, backoff=Constant(0.0)))
    done = threading.Event()
    d.on("job_exhausted", lambda _p: done.set())
    job = DispatchJob("ep", "x")
    assert job.max_attempts is None
    d.add_job(job)
    assert done.wait(20)
    assert job.attempts == 5 and sink.count() == 5
    d.shutdown(5)


def test_the_default_policy_gives_three_attempts() -> None:
    d = make(Recorder())
    assert d.retry.max_attempts == 3
    assert d.shutdown(5)


@pytest.mark.parametrize(("policy_attempts", "job_attempts"), [(5, 2), (2, 4)])
def test_a_jobs_own_max_attempts_overrides_the_policy(policy_attempts: int, job_attempts: int) -> None:
    """An explicit DispatchJob.max_attempts wins over retry.max_attempts, more or fewer."""
    sink = Recorder(lambda jobs: [False] * len(jobs))
    d = make(sink, batch_timeout=0.01, retry=RetryPolicy(max_attempts=policy_attempts, backoff=Constant(0.0)))
    done = threading.Event()
    d.on("job_exhausted", lambda _p: done.set())
    job = DispatchJob("ep", "x", max_attempts=job_attempts)
    d.add_job(job)
    assert done.wait(20)
    assert job.attempts == job_attempts
    d.shutdown(5)
