"""Fixture apps for the framework tests (a Flask app, a Django project) and what those tests share."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from threaddispatch.jobs import JobEngine
from threaddispatch.stores.base import JobState
from threaddispatch.testing import wait_for


def run_one_job_in_a_worker_thread(engine: JobEngine, command: Callable[[], Any]) -> Any:
    """Run ``command`` (a worker command running ``engine``) in a thread until one ``mark`` job completed.

    Then stop the engine (the command returns) and return what the command returned;
    re-raises what it raised.
    """
    ran = threading.Event()
    engine.register("mark", lambda ctx, payload: ran.set())
    outcome: list[Any] = []
    failures: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(command())
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=target, name="threaddispatch-test-worker-command")
    thread.start()
    try:
        job_id = engine.enqueue("mark", None)
        assert ran.wait(10)
        wait_for(lambda: engine.get_job(job_id).state is JobState.COMPLETED, message="job completed")
        assert engine.stats()["concurrency"] == 2
    finally:
        wait_for(lambda: engine.running or not thread.is_alive(), message="worker started")
        engine.stop(5)
        thread.join(10)
    assert not thread.is_alive()
    if failures:
        raise failures[0]
    return outcome[0]
