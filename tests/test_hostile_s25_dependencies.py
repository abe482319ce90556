"""Hostile tests of dependencies: retrying a dependent its failed dependency cancelled.

The promises attacked (README, "Dependencies"): a dependent waits until every dependency
completed, and is cancelled if one fails (``on_dependency_failure="cancel"``); a handler
reads its dependencies' results as ``ctx.dependency_results``; ``retry`` runs a failed or
cancelled job again. ``retry`` of such a dependent (``store.requeue``) makes it pending
whatever its dependencies are: it runs at once, beside a dependency that is still failed,
with ``None`` for that dependency's result (the handler of the README's example,
``(rows,) = ctx.dependency_results``, then works on None). It should wait for the
dependency (or be refused) instead: ``requeue`` refuses it (InvalidStateError naming the
dependency) while the dependency is failed, and makes it wait for a dependency retried
first. Everything runs on the test's thread (``run_pending``).
"""

from __future__ import annotations

from typing import Any

import pytest

from threaddispatch import JobEngine
from threaddispatch.errors import InvalidStateError
from threaddispatch.jobs import JobContext
from threaddispatch.stores import JobState, Store

pytestmark = pytest.mark.timeout(60)


def _engine(store: Store, flaky_fails: list[bool], ran: list[tuple[str, list[Any]]]) -> JobEngine:
    engine = JobEngine(store)

    def fetch_rows(_ctx: JobContext, _payload: object) -> list[int]:
        if flaky_fails[0]:
            raise ValueError("the database is down")
        return [1, 2, 3]

    def build_report(ctx: JobContext, payload: str) -> str:
        ran.append((payload, list(ctx.dependency_results)))
        return payload

    engine.register("fetch_rows", fetch_rows, max_retries=0)
    engine.register("build_report", build_report, max_retries=0)
    return engine


def _run_all(engine: JobEngine) -> None:
    """Run what is due until nothing more is (a dependent released by a completion runs in the next round)."""
    for _round in range(10):
        if engine.run_pending() == 0:
            return


def test_retrying_a_dependent_whose_dependency_still_failed_does_not_run_it_without_that_result(
    store: Store,
) -> None:
    flaky_fails = [True]
    ran: list[tuple[str, list[Any]]] = []
    engine = _engine(store, flaky_fails, ran)
    fetch_id = engine.enqueue("fetch_rows")
    report_id = engine.enqueue("build_report", "report", depends_on=[fetch_id])
    _run_all(engine)
    assert engine.get_job(fetch_id).state is JobState.FAILED
    assert engine.get_job(report_id).state is JobState.CANCELLED

    try:
        engine.retry(report_id)
    except InvalidStateError:
        refused = True  # refused at the call, naming why: acceptable
    else:
        refused = False
    _run_all(engine)
    assert ran == []  # never ran beside a failed dependency

    flaky_fails[0] = False
    engine.retry(fetch_id)
    _run_all(engine)
    assert engine.get_job(fetch_id).state is JobState.COMPLETED
    if not refused:  # accepted for retry: it waited for the dependency, and runs with its result now
        assert ran == [("report", [[1, 2, 3]])]
        assert engine.get_job(report_id).state is JobState.COMPLETED


def test_a_dependent_released_by_its_retried_dependency_reads_its_result(store: Store) -> None:
    """The baseline: a dependency that failed with retries left, then completed, releases its dependent."""
    ran: list[tuple[str, list[Any]]] = []
    engine = JobEngine(store)
    attempts: list[int] = []

    def fetch_rows(ctx: JobContext, _payload: object) -> list[int]:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ValueError("the database is down")
        return [1, 2, 3]

    def build_report(ctx: JobContext, payload: str) -> str:
        ran.append((payload, list(ctx.dependency_results)))
        return payload

    engine.register("fetch_rows", fetch_rows, max_retries=1, backoff=lambda _attempt: 0.0)
    engine.register("build_report", build_report, max_retries=0)
    fetch_id = engine.enqueue("fetch_rows")
    report_id = engine.enqueue("build_report", "report", depends_on=[fetch_id])
    _run_all(engine)
    assert attempts == [1, 2]
    assert engine.get_job(report_id).state is JobState.COMPLETED
    assert ran == [("report", [[1, 2, 3]])]


def test_a_dependent_retried_after_its_dependency_waits_for_it_and_reads_its_result(store: Store) -> None:
    """Retry the failed dependency first, then the dependent: it waits (not pending), and runs after the dependency."""
    flaky_fails = [True]
    ran: list[tuple[str, list[Any]]] = []
    engine = _engine(store, flaky_fails, ran)
    fetch_id = engine.enqueue("fetch_rows")
    report_id = engine.enqueue("build_report", "report", depends_on=[fetch_id])
    _run_all(engine)
    assert engine.get_job(report_id).state is JobState.CANCELLED

    with pytest.raises(InvalidStateError, match=f"{report_id}.*{fetch_id}.*failed"):
        engine.retry(report_id)
    assert engine.get_job(report_id).state is JobState.CANCELLED  # refused: left as it was

    flaky_fails[0] = False
    engine.retry(fetch_id)  # pending again, not run yet
    engine.retry(report_id)
    report = engine.get_job(report_id)
    assert (report.state, report.waiting_on, report.attempts) == (JobState.WAITING, 1, 0)
    _run_all(engine)
    assert engine.get_job(fetch_id).state is JobState.COMPLETED
    assert engine.get_job(report_id).state is JobState.COMPLETED
    assert ran == [("report", [[1, 2, 3]])]


def test_a_dependent_of_policy_run_retried_beside_its_failed_dependency_runs(store: Store) -> None:
    """``on_dependency_failure="run"`` runs beside a failed dependency at enqueue; its retry does the same."""
    ran: list[tuple[str, list[Any]]] = []
    engine = _engine(store, [True], ran)
    engine.register("flaky_report", lambda _ctx, _payload: (_ for _ in ()).throw(ValueError("no")), max_retries=0)
    fetch_id = engine.enqueue("fetch_rows")
    report_id = engine.enqueue("flaky_report", depends_on=[fetch_id], on_dependency_failure="run")
    _run_all(engine)
    assert engine.get_job(fetch_id).state is JobState.FAILED
    assert engine.get_job(report_id).state is JobState.FAILED  # it ran, and failed on its own
    engine.retry(report_id)
    assert engine.get_job(report_id).state is JobState.PENDING


def test_a_dependent_cancelled_while_it_waited_waits_again_for_each_unfinished_dependency_once(store: Store) -> None:
    """Cancelled while waiting for two jobs, then retried: one completion counts once, the job still waits."""
    ran: list[tuple[str, list[Any]]] = []
    engine = _engine(store, [False], ran)
    first = engine.enqueue("fetch_rows")
    later = engine.enqueue("fetch_rows", delay=3600)  # stays pending for the whole test
    report_id = engine.enqueue("build_report", "report", depends_on=[first, later])
    engine.cancel(report_id)
    assert engine.get_job(report_id).state is JobState.CANCELLED
    engine.retry(report_id)
    assert (engine.get_job(report_id).state, engine.get_job(report_id).waiting_on) == (JobState.WAITING, 2)
    _run_all(engine)
    assert engine.get_job(first).state is JobState.COMPLETED
    report = engine.get_job(report_id)
    assert (report.state, report.waiting_on) == (JobState.WAITING, 1)
    assert ran == []
