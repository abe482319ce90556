"""The cross-face contract (issue 12): every face calls user code the same way and has the same lifecycle.

Each test is written once and parametrized over the adapters of tests/faces.py: one per
face (BackgroundDispatcher, its logging handler, EndpointBatchDispatcher, AsyncDispatcher,
BatchedDispatcher, RequestDispatcher, JobEngine), where the behaviour applies to it.
"""

from __future__ import annotations

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

from threaddispatch.errors import DispatcherClosedError
from threaddispatch.testing import live_dispatch_threads


def faces(*names: str, where: Callable[[type[Face]], bool] = lambda _face: True) -> pytest.MarkDecorator:
    """Parametrize a test over the named faces (default: all) for which ``where`` holds."""
    chosen = [FACES[name] for name in names] if names else list(FACES.values())
    return pytest.mark.parametrize("face", [f for f in chosen if where(f)], ids=lambda f: f.name, indirect=True)


@pytest.fixture
def face(request: pytest.FixtureRequest) -> Iterator[Face]:
    """A fresh adapter; whatever it built is stopped at teardown (a hung call is released first)."""
    adapter: Face = request.param()
    yield adapter
    release.set()
    if adapter.face is not None:
        adapter.stop(10)
    release.clear()


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
    release.set()
    assert result == [False]
    assert "hang" not in face.delivered


@pytest.mark.timeout(60)
@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt, GeneratorExit], ids=lambda e: e.__name__)
@faces()
def test_a_base_exception_fails_the_call_and_the_worker_goes_on(face: Face, error: type[BaseException]) -> None:
    """A SystemExit, KeyboardInterrupt or GeneratorExit from user code fails that call, reported; later work goes."""

    def work(item: str) -> None:
        if item == "boom":
            raise error("from user code")

    face.make(work)
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
    started = threading.Event()
    face.make(hang_on("parent-hung", started=started))
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
