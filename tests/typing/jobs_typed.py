"""Typed jobs, as mypy --strict sees them: ``@engine.job`` returns a JobHandle typed from the handler.

Type-checked by ``mypy`` (pyproject.toml lists tests/typing) and by tests/test_typed_jobs.py;
it also runs (tests/test_typed_jobs.py imports it). The wrong-payload cases, which mypy must
reject, are in tests/test_typed_jobs.py (a snippet checked with mypy's ``# E:`` pattern).
"""

from __future__ import annotations

import sys
from collections.abc import Coroutine
from typing import Any, TypedDict

from threaddispatch.jobs import JobContext, JobEngine, JobHandle
from threaddispatch.stores import MemoryStore

if sys.version_info >= (3, 11):
    from typing import assert_type
else:
    from typing_extensions import assert_type


class Email(TypedDict):
    to: str
    subject: str


engine = JobEngine(MemoryStore())


@engine.job("send_email", queue="mail")
def send_email(ctx: JobContext, payload: Email) -> bool:
    return bool(payload["to"])


@engine.job()
def resize(ctx: object, payload: list[int]) -> None:
    return None


@engine.job("untyped_ctx")
def untyped_ctx(ctx: Any, payload: str) -> dict[str, int]:
    return {payload: len(payload)}


@engine.job("fetch")
async def fetch(ctx: JobContext, payload: str) -> int:
    return len(payload)


assert_type(send_email, JobHandle[Email, bool])
assert_type(resize, JobHandle[list[int], None])
assert_type(untyped_ctx, JobHandle[str, dict[str, int]])
assert_type(fetch, JobHandle[str, Coroutine[Any, Any, int]])

assert_type(send_email.enqueue({"to": "a@b.c", "subject": "hi"}, delay=5, unique_key="welcome:a@b.c"), str)
assert_type(send_email.enqueue_many([{"to": "a@b.c", "subject": "hi"}], priority=1), list[str])
assert_type(resize.enqueue([640, 480], queue="images", max_retries=0, run_at=0.0), str)
assert_type(untyped_ctx.enqueue_many(["a", "bc"]), list[str])
assert_type(fetch.enqueue("https://example.com"), str)
assert_type(send_email.name, str)
assert_type(send_email.queue, str)
assert_type(engine.enqueue("send_email", {"to": "a@b.c", "subject": "hi"}), str)  # the string API stays


def call_directly(ctx: JobContext) -> None:
    """Calling the handle calls the handler: its own result type."""
    assert_type(send_email(ctx, {"to": "a@b.c", "subject": "hi"}), bool)
    assert_type(untyped_ctx(ctx, "abc"), dict[str, int])


with MemoryStore() as store:  # a store used as a context manager keeps its own type
    assert_type(store, MemoryStore)
