"""Hostile tests of JobEngine's own threads facing one store call that raises an unexpected error.

Each engine thread (the fetcher, ``threaddispatch-jobs-heartbeat``, ``-upkeep``, ``-cron``)
catches StoreError around its store calls and goes on; anything else (a bug in a store,
a codec error such as a lone surrogate, a TypeError from a custom Store) ends the thread
with an uncaught exception, while ``engine.running`` stays True and ``stop()`` returns
True. A dead fetcher runs no more jobs; a dead heartbeat thread stops the jobs'
heartbeats (another worker then reaps and runs them again while they still run) and job
timeouts (they are enforced on that thread); a dead upkeep thread stops reaping and
purging; a dead cron thread
fires no more crons. The promise attacked: "Nothing lost silently", and a thread that
meets a failure logs it and goes on (as the cron thread does for a stored cron it cannot
parse). The fetcher's claim is in test_hostile_s25_jobs_text.

Each case fails the first call of one store method with RuntimeError, remembers the
thread that made it, and waits (bounded) until that thread calls the method again or
has died: state, not timing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from threaddispatch import JobEngine
from threaddispatch.jobs import JobContext
from threaddispatch.stores import MemoryStore
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


class _FailsOnce:
    """Makes ``store.<method>`` raise RuntimeError once, then counts the calls the same thread makes."""

    def __init__(self, store: MemoryStore, method: str) -> None:
        self.lock = threading.Lock()  # guards failed_on and calls_after
        self.failed_on: threading.Thread | None = None
        self.calls_after = 0
        original: Callable[..., Any] = getattr(store, method)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                if self.failed_on is None:
                    self.failed_on = threading.current_thread()
                    raise RuntimeError(f"{method} broke once")
                if threading.current_thread() is self.failed_on:
                    self.calls_after += 1
            return original(*args, **kwargs)

        setattr(store, method, wrapper)  # the instance attribute shadows the method

    def thread(self) -> threading.Thread | None:
        with self.lock:
            return self.failed_on

    def went_on_or_died(self) -> bool:
        with self.lock:
            thread, calls = self.failed_on, self.calls_after
        return thread is not None and (calls > 0 or not thread.is_alive())


@pytest.fixture
def thread_deaths() -> Iterator[list[str]]:
    """Uncaught exceptions of threads during the test (which a dead engine thread ends with)."""
    died: list[str] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        died.append(f"{args.thread.name if args.thread else '?'}: {args.exc_value!r}")

    threading.excepthook = hook
    yield died
    threading.excepthook = previous


_REASON = "the {thread} loop catches only StoreError around store.{method}: one unexpected error ends the thread"

CASES = [
    ("paused_queues", "threaddispatch-jobs-fetcher"),
    ("heartbeat", "threaddispatch-jobs-heartbeat"),
    ("heartbeat_worker", "threaddispatch-jobs-heartbeat"),
    ("reap_stale", "threaddispatch-jobs-upkeep"),
    ("release_waiting", "threaddispatch-jobs-upkeep"),
    ("list_crons", "threaddispatch-jobs-cron"),
    ("acquire_lease", "threaddispatch-jobs-cron"),
    ("complete_and_claim", "threaddispatch-jobs-fetcher"),  # the group commit of the cron's "tick" jobs
    ("reap_workers", "threaddispatch-jobs-upkeep"),
]


@pytest.mark.parametrize(
    ("method", "thread_name"),
    [pytest.param(method, name, id=method) for method, name in CASES],
)
def test_an_engine_thread_goes_on_after_one_store_call_raised_an_unexpected_error(
    method: str, thread_name: str, thread_deaths: list[str]
) -> None:
    store = MemoryStore()
    failing = _FailsOnce(store, method)
    engine = JobEngine(store, concurrency=2, poll_interval=0.02, max_poll_interval=0.05, heartbeat_interval=0.05)
    release = threading.Event()
    holding = threading.Event()

    def hold(_ctx: JobContext, _payload: object) -> None:  # keeps a job running: the heartbeat has one to beat
        holding.set()
        release.wait(30)

    engine.register("hold", hold, timeout=None)
    engine.register("tick", lambda _ctx, _payload: None)
    # overlap="allow": a tick whose completion was lost (complete_and_claim) holds back no later tick.
    engine.cron("@every 1s", "tick", name="every-second", overlap="allow")
    engine.start()
    try:
        engine.enqueue("hold")
        wait_for(lambda: failing.thread() is not None, timeout=20, message=f"a call of store.{method}")
        thread = failing.thread()
        assert thread is not None and thread.name == thread_name
        wait_for(failing.went_on_or_died, timeout=20, message=f"{thread_name} to call store.{method} again or die")
        assert thread.is_alive(), thread_deaths
        assert thread_deaths == []
    finally:
        release.set()
        engine.stop(10)
