"""Middleware hooks may be ``async def``: such overrides type-check without an ignore (mypy runs on tests/)."""

from __future__ import annotations

import asyncio

import pytest

from threaddispatch import JobEngine
from threaddispatch._job_context import JobContext
from threaddispatch.middleware import Middleware
from threaddispatch.stores import MemoryStore

pytestmark = pytest.mark.timeout(30)


class AsyncHooks(Middleware):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def before_job(self, ctx: JobContext) -> None:
        await asyncio.sleep(0)
        self.calls.append("before")

    async def after_job(self, ctx: JobContext, result: object, error: BaseException | None) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"after {result}")


def test_async_hooks_override_the_base_without_an_ignore() -> None:
    hooks = AsyncHooks()
    engine = JobEngine(MemoryStore(), middleware=[hooks], immediate=True)
    engine.register("work", lambda ctx, payload: payload)
    engine.enqueue("work", 7)
    assert hooks.calls == ["before", "after 7"]
