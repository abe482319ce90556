"""Helpers of the SQLite store tests: run functions on threads and collect what they raised; where a thread
waits; a forked child's exit code."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence

from threaddispatch.testing import wait_for


def run_threads(targets: Sequence[Callable[[], None]], *, timeout: float = 100.0) -> list[BaseException]:
    """Run each target on its own thread (``worker-<n>``), join them all; what they raised, in no order."""
    errors: list[BaseException] = []

    def run(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(target,), name=f"worker-{n}") for n, target in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), f"{thread.name} still running after {timeout}s"
    return errors


def frame_files(thread: threading.Thread) -> list[str]:
    """The files of ``thread``'s Python frames, innermost first (empty once it has ended)."""
    frame = sys._current_frames().get(thread.ident or 0)
    files: list[str] = []
    while frame is not None:
        files.append(frame.f_code.co_filename)
        frame = frame.f_back
    return files


def waits_on_writer_lock(thread: threading.Thread) -> bool:
    """Whether ``thread`` waits in the SQLite store's writer lock (:mod:`threaddispatch.stores._sqlite_lock`)."""
    files = frame_files(thread)
    return bool(files) and files[0].endswith("_sqlite_lock.py")


def wait_exit_code(pid: int, timeout: float) -> int:
    """The exit code of the forked child ``pid``, waited for up to ``timeout`` seconds."""
    status: list[int] = []

    def exited() -> bool:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status.append(code)
        return bool(status)

    wait_for(exited, timeout, message=f"the forked child {pid} to exit")
    return os.waitstatus_to_exitcode(status[0])
