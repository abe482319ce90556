"""The cross-face contract (issue 12): every face calls user code the same way and has the same lifecycle.

Each test is written once and parametrized over the adapters of tests/faces.py: one per
face (BackgroundDispatcher, its logging handler, EndpointBatchDispatcher, AsyncDispatcher,
BatchedDispatcher, RequestDispatcher, JobEngine), where the behaviour applies to it.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faces import FACES, Face, described

from threaddispatch.errors import Cancel, DispatcherClosedError, Retry
from threaddispatch.testing import immediate, live_dispatch_threads, wait_for


def faces(
    where: Callable[[type[Face]], bool] = lambda _face: True, *, leave_out: tuple[str, ...] = ()
) -> pytest.MarkDecorator:
    """Parametrize a test over every face for which ``where`` holds, except those in ``leave_out``.

    ``leave_out`` names a face that does not meet that part of the contract yet (see the test's comment).
    """
    chosen = [f for f in FACES.values() if where(f) and f.name not in leave_out]
    return pytest.mark.parametrize("face", chosen, ids=lambda f: f.name, indirect=True)


@pytest.fixture
def face(request: pytest.FixtureRequest) -> Iterator[Face]:
    """A fresh adapter; whatever it built is stopped at teardown (a hung call is released first)."""
    adapter: Face = request.param()
    yield adapter
    release.set()
    if adapter.face is not None:
        adapter.stop(10)
    release.clear()


SYNC_OR_ASYNC = pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])

release = threading.Event()  # set at teardown: every call blocked by hang_on() returns


def hang_on(*items: str, started: threading.Event | None = None) -> Callable[[str], None]:
    """A ``work`` function that blocks on the named items until the test releases them (or tears down)."""

    def work(item: str) -> None:
        if item in items:
            if started is not None:
                started.set()
            release.wait(30)

    return work


def fine(_item: str) -> None:
    """A ``work`` function that delivers every item."""


def stop_in_background(face: Face, timeout: float) -> tuple[threading.Thread, list[bool]]:
    """Call ``face.stop(timeout)`` on another thread; the list gets its result."""
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(face.stop(timeout)), name="contract-stopper", daemon=True)
    thread.start()
    return thread, result


# -- lifecycle --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@faces()
def test_stop_drains(face: Face) -> None:
    """stop waits for a running call to end (and, where the face queues, for the work queued behind it)."""
    started = threading.Event()
    face.make(hang_on("running", started=started))
    face.give("running")
    assert started.wait(10)
    queued = [f"queued-{i}" for i in range(5)] if face.drains_queued else []
    for item in queued:
        face.give(item)
    stopper, result = stop_in_background(face, 20)
    release.set()
    stopper.join(25)
    assert result == [True]
    assert sorted(face.delivered) == sorted(["running", *queued])


@pytest.mark.timeout(30)
@faces(where=lambda f: f.refuses_after_stop)
def test_work_after_stop_raises(face: Face) -> None:
    """Work given after stop raises DispatcherClosedError and is never delivered."""
    face.make(fine)
    face.give("before")
    face.wait_delivered("before")
    assert face.stop(10)
    with pytest.raises(DispatcherClosedError):
        face.give("after")
    assert face.delivered == ["before"]


@pytest.mark.timeout(60)
@faces()
def test_a_hung_user_function_does_not_stretch_stop(face: Face) -> None:
    """stop(0.5) returns (False: a call did not finish) while the user function hangs, long before it would end."""
    started = threading.Event()
    face.make(hang_on("hang", started=started))
    face.give("hang")
    assert started.wait(10)
    stopper, result = stop_in_background(face, 0.5)
    stopper.join(15)  # far past the budget: only a stop that ignores its timeout is still running here
    assert not stopper.is_alive(), f"{face.name}: stop(0.5) still blocked by the hung call"
    assert "hang" not in face.delivered  # still hung: stop returned without it
    release.set()
    assert result == [False]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt, GeneratorExit], ids=lambda e: e.__name__)
@SYNC_OR_ASYNC
@faces()
def test_a_base_exception_fails_the_call_and_the_worker_goes_on(
    face: Face, error: type[BaseException], asynchronous: bool
) -> None:
    """A SystemExit, KeyboardInterrupt or GeneratorExit from user code (a plain function or a coroutine) fails
    that call, reported; later work goes."""

    def work(item: str) -> None:
        if item == "boom":
            raise error("from user code")

    face.make(work, asynchronous=asynchronous)
    face.give("boom")
    reported = face.wait_failed("boom")
    assert error.__name__ in described(reported)
    face.give("after")
    face.wait_delivered("after")
    assert face.delivered == ["after"]


def _run_in_forked_child(child: Callable[[], dict[str, Any]], timeout: float = 30.0) -> dict[str, Any]:
    """Fork; run ``child`` in the child and return the dict it reports through a pipe.

    The child writes its report and leaves with ``os._exit`` whatever happens; a child that
    reports nothing within ``timeout`` is killed and the test fails.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            try:
                report = child()
            except BaseException as error:  # reported to the parent
                report = {"error": repr(error)}
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail("the forked child reported nothing in time")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(b"".join(chunks).decode())
    return result


@pytest.mark.timeout(90)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@faces()
def test_a_forked_child_starts_clean(face: Face) -> None:
    """Forked while a call hangs in the parent, the child has no dispatch thread, delivers its own work and stops
    cleanly; the hung call is the parent's alone, which still delivers it once released."""
    _fork_while_a_call_hangs(face, timeout=None)


@pytest.mark.timeout(90)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@faces(where=lambda f: f.call_timeout)
def test_a_forked_child_starts_clean_with_a_per_call_timeout(face: Face) -> None:
    """The same with a per-call timeout: the hung call runs on a runner thread, which the child does not have."""
    _fork_while_a_call_hangs(face, timeout=60.0)


def _fork_while_a_call_hangs(face: Face, timeout: float | None) -> None:
    started = threading.Event()
    face.make(hang_on("parent-hung", started=started), timeout=timeout)
    face.give("parent-first")
    face.wait_delivered("parent-first")
    face.give("parent-hung")
    assert started.wait(10)

    def child() -> dict[str, Any]:
        report: dict[str, Any] = {"threads": [t.name for t in live_dispatch_threads()]}
        face.in_forked_child()
        face.give("child")
        face.wait_delivered("child")
        report["stopped"] = face.stop(10)
        report["delivered"] = face.delivered
        return report

    report = _run_in_forked_child(child)
    assert report.get("error") is None, report
    assert report["threads"] == []
    assert report["stopped"] is True
    assert report["delivered"] == ["parent-first", "child"]
    release.set()
    face.wait_delivered("parent-hung")
    assert face.stop(10)
    assert face.delivered == ["parent-first", "parent-hung"]


@pytest.mark.timeout(60)
@faces()
def test_an_unreferenced_dispatcher_is_collected(face: Face) -> None:
    """A face nobody references any more, after delivering work, is garbage-collected (its threads then leave).

    A started JobEngine is held by its threads: it is collected once stopped.
    """
    face.make(fine)
    face.give("one")
    face.wait_delivered("one")
    if not face.collected_running:
        assert face.stop(10)
    ref = face.drop()
    assert ref() is None, f"{face.name} is still referenced"


# -- calling user code --------------------------------------------------------------------------


@pytest.mark.timeout(30)
@faces()
def test_an_async_callable_is_delivered_and_awaited(face: Face) -> None:
    """An ``async def`` user callable is awaited to its end on a worker's private loop, never on the caller's thread."""
    face.make(fine, asynchronous=True)
    for item in ("a", "b", "c"):
        face.give(item)
    face.wait_delivered("a", "b", "c")
    assert face.loops, f"{face.name}: the coroutine never ran on an event loop"
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # none was started on this (the caller's) thread
    assert face.stop(10)
    assert sorted(face.delivered) == ["a", "b", "c"]


@pytest.mark.timeout(60)
@faces(where=lambda f: f.call_timeout)
def test_a_call_past_its_timeout_is_abandoned_and_later_work_still_goes(face: Face) -> None:
    """A call hung past the per-call timeout fails with DispatchTimeoutError through the face's failure path; its
    thread is abandoned (counted in stats) and the next item is delivered while it still hangs."""
    started = threading.Event()
    face.make(hang_on("hang", started=started), timeout=0.2)
    face.give("hang")
    assert started.wait(10)
    face.give("next")
    face.wait_delivered("next")
    assert "DispatchTimeoutError" in described(face.wait_failed("hang"))
    stats = face.stats()
    assert stats["call_timeouts"] == 1
    assert stats["abandoned_calls"] == 1  # the hung call is still running
    release.set()
    wait_for(lambda: face.stats()["abandoned_calls"] == 0, message="the abandoned call ended")
    assert face.stop(10)
    assert list(face.failures) == ["hang"]  # the hung call's late end changed nothing: reported once, as timed out


@pytest.mark.timeout(60)
@faces(where=lambda f: f.name == "jobs")
def test_a_job_past_its_timeout_fails_and_later_jobs_still_go(face: Face) -> None:
    """JobEngine's own timeout semantics: a job hung past its timeout fails as timed out, the next job runs on
    another worker while it still hangs, and the hung handler's late end changes nothing."""
    started = threading.Event()
    face.make(hang_on("hang", started=started), timeout=0.2)
    face.give("hang")
    assert started.wait(10)
    face.give("next")
    face.wait_delivered("next")
    assert "timed out" in described(face.wait_failed("hang"))
    assert face.stats()["timed_out"] == 1
    release.set()
    wait_for(lambda: "hang" in face.delivered, message="the hung handler returned")
    assert face.stop(10)
    assert list(face.failures) == ["hang"]


@pytest.mark.timeout(60)
@faces(where=lambda f: f.call_timeout)
def test_abandoned_calls_are_bounded(face: Face) -> None:
    """More calls hung past the timeout than the bound: each fails with DispatchTimeoutError, but a call finding 4
    abandoned threads waits for one, then times out without running, so no more than 4 plus the face's concurrent
    senders ever run hung user code (calls already running when they time out are abandoned too); once they end,
    work goes."""
    bound = 4 + face.senders
    hung = [f"hang-{i}" for i in range(bound + 2)]
    starts: list[str] = []

    def work(item: str) -> None:
        if item in hung:
            starts.append(item)
            release.wait(30)

    face.make(work, timeout=0.1)
    for item in hung:
        face.give(item)
    for item in hung:
        assert "DispatchTimeoutError" in described(face.wait_failed(item))
    assert len(starts) <= bound
    assert face.stats()["abandoned_calls"] <= bound
    release.set()
    wait_for(lambda: face.stats()["abandoned_calls"] == 0, message="the abandoned calls ended")
    face.give("next")
    face.wait_delivered("next")
    assert face.stop(10)


@pytest.mark.timeout(60)
@faces(where=lambda f: f.call_timeout)
def test_a_coroutine_past_its_timeout_is_cancelled_and_later_work_still_goes(face: Face) -> None:
    """An ``async def`` call past the per-call timeout fails with DispatchTimeoutError and its task is cancelled
    (it sees CancelledError); the next item is delivered."""
    cancelled = threading.Event()

    async def work(item: str) -> None:
        if item == "hang":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

    face.make(work, timeout=0.2)
    face.give("hang")
    face.give("next")
    face.wait_delivered("next")
    assert "DispatchTimeoutError" in described(face.wait_failed("hang"))
    assert cancelled.wait(10)
    wait_for(lambda: face.stats()["abandoned_calls"] == 0, message="the cancelled call ended")
    assert face.stats()["call_timeouts"] == 1
    assert face.stop(10)
    assert face.delivered == ["next"]


@pytest.mark.timeout(30)
@faces(where=lambda f: f.reports_to_a_callback)
def test_an_async_failure_callback_is_awaited(face: Face) -> None:
    """The face's failure callback (on_error, error_handler, job_exhausted listener, job hook) may be ``async def``:
    it is awaited, and the failure reaches it like a plain one's."""

    def work(item: str) -> None:
        if item == "bad":
            raise ValueError("refused")

    face.make(work, async_reports=True)
    face.give("bad")
    assert "ValueError: refused" in described(face.wait_failed("bad"))
    face.give("good")
    face.wait_delivered("good")


def _calls_recorded() -> tuple[list[float], Callable[[Callable[[int], None]], Callable[[str], None]]]:
    """A list of the start times of the calls for ``"item"``, and a maker of ``work`` from ``raise_on(call_number)``."""
    starts: list[float] = []

    def make(raise_on: Callable[[int], None]) -> Callable[[str], None]:
        def work(item: str) -> None:
            if item != "item":
                return  # any other item goes through
            starts.append(time.monotonic())
            raise_on(len(starts))

        return work

    return starts, make


@pytest.mark.timeout(60)
@SYNC_OR_ASYNC
@faces(where=lambda f: f.retries)
def test_retry_with_a_delay_overrides_the_backoff_and_the_delay_is_observed(face: Face, asynchronous: bool) -> None:
    """Retry(delay=0.3) on the first call: the item is tried again no sooner than 0.3 s later, not after the
    60 s backoff, and then delivered."""
    starts, make = _calls_recorded()

    def first_asks_for_a_retry(call: int) -> None:
        if call == 1:
            raise Retry(delay=0.3)

    face.make(make(first_asks_for_a_retry), asynchronous=asynchronous, attempts=3, backoff=60.0)
    face.give("item")
    face.wait_delivered("item", timeout=30)  # far below the backoff: only the Retry delay can bring it this soon
    assert len(starts) == 2
    assert starts[1] - starts[0] >= 0.3
    assert face.failures == {}


@pytest.mark.timeout(60)
@SYNC_OR_ASYNC
@faces(where=lambda f: f.retries)
def test_cancel_is_final(face: Face, asynchronous: bool) -> None:
    """Cancel from user code ends the item at once, with attempts left: reported after one call, never retried."""
    starts, make = _calls_recorded()

    def always_cancel(_call: int) -> None:
        raise Cancel("no more")

    face.make(make(always_cancel), asynchronous=asynchronous, attempts=5, backoff=0.01)
    face.give("item")
    face.wait_failed("item")  # reported only once final: after 5 quick calls if Cancel were not final
    assert len(starts) == 1
    face.give("after")
    face.wait_delivered("after")
    assert len(starts) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", [-1.0, float("nan"), "soon"], ids=["negative", "nan", "not-a-number"])
@faces(where=lambda f: f.retries)
def test_a_bad_retry_delay_is_reported_not_lost(face: Face, bad: object) -> None:
    """A Retry whose delay went bad after construction is a final failure, reported after one call; nothing is lost."""
    starts, make = _calls_recorded()

    def bad_retry(_call: int) -> None:
        signal = Retry(delay=1.0)
        signal.delay = bad  # type: ignore[assignment]  # the face must cope with what user code set
        raise signal

    face.make(make(bad_retry), attempts=5, backoff=0.01)
    face.give("item")
    face.wait_failed("item")
    assert len(starts) == 1
    face.give("after")
    face.wait_delivered("after")


# -- immediate mode (testing.immediate()) -------------------------------------------------------


@pytest.mark.timeout(30)
@SYNC_OR_ASYNC
@faces(where=lambda f: f.immediate)
def test_immediate_mode_runs_work_on_the_callers_thread_with_the_same_retries_and_reports(
    face: Face, asynchronous: bool
) -> None:
    """Inside testing.immediate() each item is delivered, or reported failed, before the call that gave it returns,
    on the caller's thread; a retrying face retries at once (its 60 s backoff skipped)."""
    threads: set[int] = set()
    calls: dict[str, int] = {}

    def work(item: str) -> None:
        threads.add(threading.get_ident())
        calls[item] = calls.get(item, 0) + 1
        if item == "bad" or (item == "flaky" and calls[item] < 3):
            raise RuntimeError(item)

    with immediate():
        face.make(work, asynchronous=asynchronous, attempts=3, backoff=60.0)
        face.give("ok")
        assert face.delivered == ["ok"]
        if face.retries:
            face.give("flaky")
            assert face.delivered == ["ok", "flaky"] and calls["flaky"] == 3
        face.give("bad")
        assert "bad" in face.failures
        assert calls["bad"] == (3 if face.retries else 1)
        assert threads == {threading.get_ident()}
        assert face.stop(10)
