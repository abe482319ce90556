"""Exit drain and fork handling, in real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import threaddispatch
from threaddispatch import ConfigurationError

pytestmark = pytest.mark.timeout(60)


def run_script(source: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_entries_are_drained_when_a_script_simply_ends() -> None:
    """A script that enqueues and falls off the end still delivers every entry (one-minute window)."""
    result = run_script(
        """
        import sys
        from threaddispatch import BackgroundDispatcher
        got = []
        def send(entries):
            got.extend(entries)
        def report():
            sys.stdout.write(f"delivered={len(got)}\\n")
        import atexit
        atexit.register(report)  # registered first, so it runs after threaddispatch's drain
        d = BackgroundDispatcher(send, ms_delay=60_000)
        for i in range(1000):
            d.enqueue(i)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "delivered=1000" in result.stdout


def test_exit_drain_is_bounded_by_the_exit_timeout_and_reports_the_loss() -> None:
    """A hung send cannot hold the process past set_exit_timeout; the loss is logged."""
    started = time.monotonic()
    result = run_script(
        """
        import logging, threading
        import threaddispatch
        from threaddispatch import BackgroundDispatcher
        logging.basicConfig(level=logging.INFO)
        threaddispatch.set_exit_timeout(0.5)
        never = threading.Event()
        d = BackgroundDispatcher(lambda entries: never.wait(), ms_delay=1, max_batch_size=1)
        for i in range(5):
            d.enqueue(i)
        """
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 15
    assert "lost" in result.stderr


def test_exit_drain_starts_no_thread_and_drains_what_one_dispatcher_feeds_another() -> None:
    """A send that enqueues into a second, thread-less dispatcher during the exit drain starts no thread.

    The second dispatcher's entries are delivered on the exiting main thread, whatever
    order the drain visits the two in.
    """
    result = run_script(
        """
        import atexit, threading, sys
        seen = []
        def report():
            sys.stdout.write(repr(seen) + "\\n")
        atexit.register(report)  # before threaddispatch's hook, so it runs after the drain
        from threaddispatch import BackgroundDispatcher
        downstream = BackgroundDispatcher(
            lambda entries: seen.append((threading.current_thread().name, list(entries))), ms_delay=60_000
        )
        def forward(entries):
            for entry in entries:
                downstream.enqueue(entry + "-forwarded")
        upstream = BackgroundDispatcher(forward, ms_delay=60_000)
        upstream.enqueue("late")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "[('MainThread', ['late-forwarded'])]" in result.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_starts_clean_and_parent_entries_go_out_once() -> None:
    """After fork the child has an empty buffer and a working worker; the parent delivers its own entries."""
    result = run_script(
        """
        import json, os, sys
        from threaddispatch import BackgroundDispatcher
        r, w = os.pipe()
        got = []
        d = BackgroundDispatcher(got.extend, ms_delay=60_000)
        for i in range(5):
            d.enqueue(("parent", i))
        pid = os.fork()
        if pid == 0:
            d.enqueue(("child", 0))
            d.enqueue(("child", 1))
            ok = d.close(5.0)
            os.write(w, json.dumps({"ok": ok, "got": got}).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child = json.loads(os.read(r, 65536).decode())
        ok = d.close(5.0)
        print(json.dumps({"child": child, "parent": {"ok": ok, "got": got}}))
        """
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["child"] == {"ok": True, "got": [["child", 0], ["child", 1]]}
    assert report["parent"] == {"ok": True, "got": [["parent", i] for i in range(5)]}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_fork_while_the_worker_is_running_gives_the_child_a_fresh_worker() -> None:
    """A child forked while the parent's worker is alive can still deliver (its own worker starts)."""
    result = run_script(
        """
        import json, os
        from threaddispatch import BackgroundDispatcher
        got = []
        d = BackgroundDispatcher(got.extend, ms_delay=1)
        d.enqueue("warm")
        assert d.flush(5.0)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            d.enqueue("from-child")
            flushed = d.flush(5.0)
            os.write(w, json.dumps({"flushed": flushed, "got": got}).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(r, 65536).decode())
        d.close(5.0)
        """
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"flushed": True, "got": ["warm", "from-child"]}


def test_set_exit_timeout_validates_and_round_trips() -> None:
    """set_exit_timeout refuses bad values and get_exit_timeout reads it back."""
    before = threaddispatch.get_exit_timeout()
    try:
        threaddispatch.set_exit_timeout(2.5)
        assert threaddispatch.get_exit_timeout() == 2.5
        with pytest.raises(ConfigurationError, match="-1"):
            threaddispatch.set_exit_timeout(-1)
    finally:
        threaddispatch.set_exit_timeout(before)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_hooks_quiesce_before_the_fork_and_resume_in_reverse_order_in_the_parent_only() -> None:
    """The registry calls ``_prepare_for_fork`` on every component before fork, then ``_resume_after_fork``
    in reverse order in the parent; the child gets ``_reset_after_fork`` instead."""
    result = run_script(
        """
        import json, os
        from threaddispatch import _lifecycle

        calls = []

        class Component:
            def __init__(self, name):
                self.name = name
            def _drain_at_exit(self, deadline):
                return (0, 0)
            def _prepare_for_fork(self):
                calls.append(("prepare", self.name))
            def _resume_after_fork(self):
                calls.append(("resume", self.name))
            def _reset_after_fork(self):
                calls.append(("reset", self.name))

        class Plain:  # no prepare/resume: only reset
            def _drain_at_exit(self, deadline):
                return (0, 0)
            def _reset_after_fork(self):
                calls.append(("reset", "plain"))

        components = [Component("a"), Component("b"), Plain()]
        for component in components:
            _lifecycle.register(component)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, json.dumps(calls).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child = json.loads(os.read(r, 65536).decode())
        print(json.dumps({"parent": calls, "child": child}))
        """
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    prepared = [name for kind, name in report["parent"] if kind == "prepare"]
    assert sorted(prepared) == ["a", "b"]
    resumed = [name for kind, name in report["parent"] if kind == "resume"]
    assert resumed == prepared[::-1]
    assert [kind for kind, _ in report["parent"]] == ["prepare", "prepare", "resume", "resume"]
    child_resets = [name for kind, name in report["child"][2:] if kind == "reset"]
    assert report["child"][:2] == [["prepare", name] for name in prepared]
    assert sorted(child_resets) == ["a", "b", "plain"]
    assert len(report["child"]) == 5


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_failing_fork_preparation_is_logged_and_the_fork_goes_on() -> None:
    """A component whose ``_prepare_for_fork`` raises is logged; the others are prepared and resumed."""
    result = run_script(
        """
        import json, os, logging
        from threaddispatch import _lifecycle
        logging.basicConfig(level=logging.ERROR)
        calls = []

        class Broken:
            def _drain_at_exit(self, deadline):
                return (0, 0)
            def _prepare_for_fork(self):
                raise RuntimeError("cannot prepare")
            def _resume_after_fork(self):
                calls.append("broken resumed")
            def _reset_after_fork(self):
                pass

        class Good(Broken):
            def _prepare_for_fork(self):
                calls.append("good prepared")
            def _resume_after_fork(self):
                calls.append("good resumed")

        components = [Broken(), Good()]
        for component in components:
            _lifecycle.register(component)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        print(json.dumps(calls))
        """
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["good prepared", "good resumed"]
    assert "cannot prepare" in result.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_at_fork_child_hooks_run_in_the_child_only_in_order_and_before_component_resets() -> None:
    """Module state renewed by ``at_fork_child`` is fresh before any component's reset, even a hook
    registered after the component, and even when one hook raises (logged, the rest still run)."""
    result = run_script(
        """
        import json, os, logging
        from threaddispatch import _lifecycle
        logging.basicConfig(level=logging.ERROR)
        calls = []

        class Component:
            def _drain_at_exit(self, deadline):
                return (0, 0)
            def _reset_after_fork(self):
                calls.append("reset")

        component = Component()
        _lifecycle.register(component)

        def broken():
            raise RuntimeError("hook broke")

        _lifecycle.at_fork_child(lambda: calls.append("first"))
        _lifecycle.at_fork_child(broken)
        _lifecycle.at_fork_child(lambda: calls.append("second"))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, json.dumps(calls).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(json.dumps({"parent": calls, "child": json.loads(os.read(r, 65536).decode())}))
        """
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"parent": [], "child": ["first", "second", "reset"]}
    assert "hook broke" in result.stderr


def test_importing_the_package_installs_no_atexit_hook_before_the_users() -> None:
    """The exit drain is installed at the first dispatcher, not at import: so a user's atexit hook
    registered after import but before the first dispatcher still runs after the drain."""
    result = run_script(
        """
        import atexit
        import threaddispatch
        from threaddispatch import _lifecycle
        atexit.register(lambda: print("user hook; drained first:", _lifecycle.exiting(), flush=True))
        d = threaddispatch.BackgroundDispatcher(lambda batch: None, ms_delay=10_000)
        d.enqueue(1)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "user hook; drained first: True" in result.stdout


def test_closing_mixin_begins_once_finishes_each_time_and_validates_the_timeout() -> None:
    from threaddispatch._lifecycle import Closing
    from threaddispatch.errors import ConfigurationError as _ConfigurationError

    calls: list[object] = []

    class Toy(Closing):
        def __init__(self) -> None:
            self._init_closing()

        def _begin_close(self) -> None:
            calls.append("begin")

        def _finish_close(self, deadline: float | None) -> bool:
            calls.append(deadline is None)
            return True

    with Toy() as toy:
        assert not toy.closed
    assert toy.closed
    assert toy.close(1.0) is True
    assert calls == ["begin", True, False]
    with pytest.raises(_ConfigurationError, match="-1"):
        toy.close(-1)
    assert calls == ["begin", True, False]


def test_closing_mixin_closes_an_unreferenced_face_through_its_collect_callback() -> None:
    import gc

    from threaddispatch._lifecycle import Closing

    collected: list[str] = []

    class Toy(Closing):
        def __init__(self) -> None:
            self._init_closing(collected.append, "collected")

        def _begin_close(self) -> None:
            pass

        def _finish_close(self, deadline: float | None) -> bool:
            return True

    Toy()
    gc.collect()
    assert collected == ["collected"]
    closed = Toy()
    closed.close()
    del closed
    gc.collect()
    assert collected == ["collected"]  # a closed face's finalizer was detached
