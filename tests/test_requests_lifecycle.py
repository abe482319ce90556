"""RequestDispatcher lifecycle: close drains and cancels, hung sends, garbage collection, fork, exit drain."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

from threaddispatch import _lifecycle
from threaddispatch.errors import DispatcherClosedError
from threaddispatch.requests import CancellationToken, RequestDispatcher, RequestEvent
from threaddispatch.testing import live_dispatch_threads, wait_for

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent


def test_close_drains_running_and_waiting_requests() -> None:
    """close() waits for what can run (running and queued-behind requests) and returns True."""
    release = threading.Event()

    def send(request: int, token: CancellationToken) -> int:
        release.wait(10)
        return request

    rd: RequestDispatcher[int, int] = RequestDispatcher(send, max_workers=2)
    handles = [rd.add(i, queue_key="q", mode="queued") for i in range(4)] + [rd.add(9, queue_key="c")]
    result: list[bool] = []
    closer = threading.Thread(target=lambda: result.append(rd.close(10)))
    closer.start()
    wait_for(lambda: rd.closed, message="close began")
    with pytest.raises(DispatcherClosedError):
        rd.add(5, queue_key="q")
    assert closer.is_alive()  # the first send cannot have returned: release is not set
    release.set()
    closer.join(10)
    assert result == [True]
    assert [handle.future.result(0) for handle in handles] == [0, 1, 2, 3, 9]


def test_a_deduplicated_add_after_close_raises() -> None:
    """add with deduplicate (another path than a plain add: tests/test_face_contract.py) raises after close too."""
    rd: RequestDispatcher[str, str] = RequestDispatcher(lambda request, token: request)
    assert rd.add("x", queue_key="k", deduplicate=True).future.result(5) == "x"
    assert rd.close(5) is True
    with pytest.raises(DispatcherClosedError, match="closed"):
        rd.add("x", queue_key="k", deduplicate=True)
    assert "closed" in repr(rd)


def test_close_cancels_requests_that_cannot_run() -> None:
    """Requests of a paused queue, or held offline, are cancelled by close, which returns False."""
    rd: RequestDispatcher[str, str] = RequestDispatcher(lambda request, token: request)
    removed: list[str | None] = []
    rd.on("remove", lambda e: removed.append(e.reason))
    rd.pause("paused")
    held = rd.add("held", queue_key="paused")
    rd.set_online(False)
    offline = rd.add("offline", queue_key="other")
    assert rd.close(5) is False
    assert held.future.cancelled() and offline.future.cancelled()
    assert removed == ["closed", "closed"]


def test_close_at_its_timeout_sets_a_hung_sends_token_and_cancels_its_future() -> None:
    """At close's timeout a send that ignores its token is given up: token set, Future cancelled, close False.

    That close returns within its timeout at all is the cross-face contract's (tests/test_face_contract.py).
    """
    hang = threading.Event()
    started = threading.Event()
    tokens: list[CancellationToken] = []

    def send(request: str, token: CancellationToken) -> str:
        tokens.append(token)
        started.set()
        hang.wait(20)
        return "too late"

    rd: RequestDispatcher[str, str] = RequestDispatcher(send)
    handle = rd.add("hung", queue_key="k")
    assert started.wait(5)
    try:
        assert rd.close(0.3) is False
        assert tokens[0].cancelled
        assert handle.future.cancelled()
    finally:
        hang.set()


def test_close_waits_for_a_pending_retry() -> None:
    """A request waiting for its retry when close begins is retried and delivered before close returns."""
    attempts: list[float] = []

    def send(request: str, token: CancellationToken) -> str:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise ConnectionError("first attempt fails")
        return "second attempt"

    rd: RequestDispatcher[str, str] = RequestDispatcher(send)
    handle = rd.add("r", queue_key="k", retry=1, retry_time=0.1)
    wait_for(lambda: attempts, message="first attempt made")
    assert rd.close(10) is True
    assert handle.future.result(0) == "second attempt"
    assert attempts[1] - attempts[0] >= 0.1 - 0.01


def test_context_manager_closes_and_leaves_no_thread() -> None:
    """Leaving the with block closes the dispatcher; its worker and timer threads are gone."""
    attempts = [0]

    def send(request: str, token: CancellationToken) -> str:
        attempts[0] += 1
        if attempts[0] == 1:
            raise ConnectionError("retry me")
        return request

    with RequestDispatcher(send, name="ctx") as rd:
        handle = rd.add("r", queue_key="k", retry=1, retry_time=0.05)
        assert handle.future.result(5) == "r"
    assert rd.closed
    assert not [t.name for t in live_dispatch_threads() if t.name.startswith("threaddispatch-ctx")]


def test_close_from_inside_send_does_not_deadlock() -> None:
    """close() called by send itself stops intake and returns False instead of waiting for itself."""
    holder: list[RequestDispatcher[str, bool]] = []

    def send(request: str, token: CancellationToken) -> bool:
        return holder[0].close(5)

    rd: RequestDispatcher[str, bool] = RequestDispatcher(send)
    holder.append(rd)
    assert rd.add("x", queue_key="k").future.result(5) is False
    assert rd.closed
    assert rd.close(5) is True


def test_unreferenced_dispatcher_is_collected_and_its_request_still_delivered() -> None:
    """Dropping the last reference collects the dispatcher; its queued request is still sent, then threads leave."""
    release = threading.Event()

    def send(request: str, token: CancellationToken) -> str:
        release.wait(10)
        return request

    rd: RequestDispatcher[str, str] = RequestDispatcher(send, name="orphan")
    handle = rd.add("still sent", queue_key="k")
    ref = weakref.ref(rd)
    del rd
    gc.collect()
    assert ref() is None
    release.set()
    assert handle.future.result(5) == "still sent"
    wait_for(lambda: not [t for t in live_dispatch_threads() if t.name.startswith("threaddispatch-orphan")])


def test_listener_holding_the_dispatcher_does_not_keep_a_closed_one_alive() -> None:
    """After close, a dispatcher referenced only by its own listener is collected with it."""
    rd: RequestDispatcher[str, str] = RequestDispatcher(lambda request, token: request)
    rd.on("response", lambda e, rd=rd: rd.online)  # type: ignore[misc]
    rd.add("x", queue_key="k").future.result(5)
    rd.close(5)
    ref = weakref.ref(rd)
    del rd
    gc.collect()
    assert ref() is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_starts_clean() -> None:
    """A forked child sees no queued or running requests of the parent and can send its own."""
    release = threading.Event()
    started = threading.Event()

    def send(request: str, token: CancellationToken) -> str:
        if request == "blocking":
            started.set()
            release.wait(10)
        return request

    rd: RequestDispatcher[str, str] = RequestDispatcher(send)
    rd.pause("held")
    held = [rd.add(f"held {i}", queue_key="held") for i in range(2)]
    blocking = rd.add("blocking", queue_key="busy")
    assert started.wait(5)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            clean = rd.get_queue_keys() == ["held"] and rd.get_queue("held").requests == ()
            clean = clean and rd.running_requests() == []
            own = rd.add("child request", queue_key="child")
            if clean and own.future.result(5) == "child request" and rd.close(5):
                code = 0
        finally:
            os._exit(code)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert len(rd.get_queue("held").requests) == 2
        assert [r.request_id for r in rd.running_requests()] == [blocking.request_id]
    finally:
        release.set()
    assert blocking.future.result(5) == "blocking"
    rd.start("held")
    assert [handle.future.result(5) for handle in held] == ["held 0", "held 1"]
    assert rd.close(5)


def test_exit_drain_sends_what_is_queued_and_cancels_what_cannot_run() -> None:
    """At interpreter exit, queued requests of started queues are sent; a paused queue's are not."""
    script = textwrap.dedent(
        """
        import threading
        from threaddispatch.requests import RequestDispatcher

        gate = threading.Event()

        def send(request, token):
            gate.wait(0.05)
            print("sent", request, flush=True)
            return request

        rd = RequestDispatcher(send, max_workers=2)
        rd.pause("held")
        rd.on("remove", lambda e: print("removed", e.request, e.reason, flush=True))
        for i in range(5):
            rd.add(f"r{i}", queue_key="q", mode="queued")
        rd.add("never", queue_key="held")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    sent = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("sent")]
    assert sent == ["r0", "r1", "r2", "r3", "r4"]
    assert "removed never closed" in done.stdout


def test_events_are_delivered_on_the_thread_that_caused_them() -> None:
    """loading/response fire on the worker thread; queue_status on the caller's."""
    threads: dict[str, str] = {}

    def record(event: RequestEvent) -> None:
        threads.setdefault(event.event, threading.current_thread().name)

    rd: RequestDispatcher[str, str] = RequestDispatcher(lambda request, token: request)
    with rd:
        for name in ("loading", "response", "queue_status"):
            rd.on(name, record)
        rd.pause("k")
        handle = rd.add("x", queue_key="k")
        rd.start("k")
        handle.future.result(5)
    assert threads["queue_status"] == threading.current_thread().name
    assert threads["loading"].startswith("threaddispatch-requests-")
    assert threads["response"].startswith("threaddispatch-requests-")


def test_send_can_add_requests_to_its_own_dispatcher() -> None:
    """send may call add() on its own dispatcher (no lock is held while it runs); the follow-up is delivered."""
    holder: list[RequestDispatcher[str, Any]] = []

    def send(request: str, token: CancellationToken) -> Any:
        if request == "first":
            return holder[0].add("second", queue_key="k", mode="queued")
        return request

    with RequestDispatcher(send) as rd:
        holder.append(rd)
        followup = rd.add("first", queue_key="k", mode="queued").future.result(5)
        assert followup.future.result(5) == "second"


def stack_depth() -> int:
    """How many frames the calling thread's stack holds (cheap, unlike inspect.stack())."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back  # type: ignore[assignment]
    return depth


def test_exit_drain_runs_a_long_queued_chain_inline_without_recursing(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no worker thread during the exit drain, work runs on the caller, one request after another, not nested."""
    monkeypatch.setattr(_lifecycle, "exiting", lambda: True)
    depth: list[int] = []
    caller = threading.current_thread().name

    def send(request: int, token: CancellationToken) -> int:
        depth.append(stack_depth())
        assert threading.current_thread().name == caller
        return request

    rd: RequestDispatcher[int, int] = RequestDispatcher(send)
    rd.set_online(False)
    handles = [rd.add(i, queue_key="chain", mode="queued") for i in range(1500)]
    rd.set_online(True)
    assert [handle.future.result(0) for handle in handles] == list(range(1500))
    assert max(depth) - min(depth) < 5
    assert rd.close(5) is True


def test_close_releases_retries_itself_when_no_timer_may_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """During the exit drain no timer thread starts; close releases a due retry itself and delivers it."""
    monkeypatch.setattr(_lifecycle, "exiting", lambda: True)
    attempts: list[float] = []

    def send(request: str, token: CancellationToken) -> str:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise ConnectionError("once")
        return "retried"

    rd: RequestDispatcher[str, str] = RequestDispatcher(send, name="exiting")
    handle = rd.add("r", queue_key="k", retry=1, retry_time=0.05)
    assert len(attempts) == 1 and not handle.future.done()
    assert not [t for t in live_dispatch_threads() if t.name.startswith("threaddispatch-exiting")]
    assert rd.close(5) is True
    assert handle.future.result(0) == "retried"
    assert attempts[1] - attempts[0] >= 0.05 - 0.01


def test_a_collection_inside_a_locked_section_still_ends_the_close() -> None:
    """The finalizer, run on a thread holding the dispatcher's lock, neither waits for it nor leaves the close undone.

    Before, it waited 0.1 s for the lock, gave up, and an idle dispatcher then never finished closing.
    """
    rd: RequestDispatcher[str, str] = RequestDispatcher(lambda request, token: request, name="locked-gc")
    assert rd.add("x", queue_key="k").future.result(5) == "x"
    core = rd._core
    with core.lock:  # as if the collector ran inside a locked section of this thread
        rd._finalizer()  # type: ignore[misc]
    wait_for(lambda: core.done, timeout=10, message="the close finished")
    assert rd.close(5) is True


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_can_close_though_its_close_lock_was_held_at_fork() -> None:
    """A close lock held by a parent thread at fork (in the middle of a close) is a fresh one in the child."""
    rd: RequestDispatcher[str, str] = RequestDispatcher(lambda request, token: request)
    with rd._close_lock:  # as a parent thread inside close() would hold it
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                closer = threading.Thread(target=rd.close, args=(5,), daemon=True)
                closer.start()
                closer.join(10)
                if not closer.is_alive() and rd.closed:
                    code = 0
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert rd.close(5)
