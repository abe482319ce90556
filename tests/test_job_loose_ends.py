"""Small engine contracts: stats() names every counter from construction, ctx.dependency_results."""

from __future__ import annotations

import pytest

from threaddispatch import JobContext, JobEngine
from threaddispatch._job_shared import STAT_NAMES
from threaddispatch.stores.memory import MemoryStore


def test_stats_name_dead_lettered_before_any_run() -> None:
    engine = JobEngine(MemoryStore())
    assert "dead_lettered" in STAT_NAMES
    assert engine.stats()["dead_lettered"] == 0


@pytest.mark.timeout(30)
def test_context_dependency_results_are_the_engines() -> None:
    engine = JobEngine(MemoryStore(), immediate=True)
    seen: list[list[object]] = []

    def first(ctx: JobContext, payload: int) -> int:
        return payload * 2

    def second(ctx: JobContext, payload: None) -> None:
        seen.append(ctx.dependency_results)
        assert ctx.dependency_results == engine.dependency_results(ctx)

    engine.register("first", first)
    engine.register("second", second)
    one = engine.enqueue("first", 3)
    two = engine.enqueue("first", 4)
    engine.enqueue("second", None, depends_on=[two, one])
    assert seen == [[8, 6]]
