"""The supervisor of ``threaddispatch worker --processes N``: N forked worker processes, kept running.

The caller imports the target once, in the supervisor; every worker process is forked from it
after that import (the fork hooks of :mod:`threaddispatch._lifecycle` renew the library's state
in the child) and runs ``work(index)``, whose return value is its exit status. The supervisor:

- replaces a worker process that dies, after a backoff that grows while it keeps dying soon
  after its start (a crash loop does not spin), and logs it; one that exits with
  :data:`RECYCLE` (it finished its ``--max-jobs``) is replaced at once; in burst mode one that
  exits 0 (no work left) is not replaced, and the supervisor returns once none is left;
- forwards SIGTERM/SIGINT to every worker process and waits for them to stop, up to
  ``stop_timeout`` plus :data:`EXIT_GRACE` seconds, then SIGKILLs what is left; a second signal
  SIGKILLs them at once;
- returns 0 when every worker process stopped cleanly, else 1.

It runs on the main thread and starts no thread: a fork copies only the forking thread, so no
other thread of the supervisor can hold a lock the child inherits. A signal handler only
records the signal; ``signal.set_wakeup_fd`` wakes the loop, which waits on that pipe. POSIX.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from types import FrameType

from threaddispatch import _lifecycle
from threaddispatch.backoff import ExponentialJitter, RetryPolicy
from threaddispatch.errors import ConfigurationError

__all__ = ["EXIT_GRACE", "RECYCLE", "Supervisor"]

#: The exit status of a worker process that finished its ``--max-jobs``: replaced at once, no backoff.
RECYCLE = 3
#: Seconds a stopping worker process gets beyond its engine's stop timeout (one store call, exit) before SIGKILL.
EXIT_GRACE = 5.0
# A worker process that lived this long was not crash-looping: its restart backoff starts over.
_STABLE_AFTER = 30.0
# The delay before starting a worker process again after its n-th death in a row.
_RESTARTS = RetryPolicy(max_attempts=sys.maxsize, backoff=ExponentialJitter(initial=0.5, max=30.0))
# The longest wait of the loop: a bound, should a wake-up ever be missed.
_MAX_WAIT = 5.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_log = logging.getLogger("threaddispatch.supervisor")


@dataclass
class _Slot:
    """One worker process's place: its current pid (0: none), when it started, and its restart state."""

    index: int
    pid: int = 0
    started: float = 0.0  # monotonic
    deaths: int = 0  # deaths in a row, each soon after its start
    restart_at: float | None = None  # monotonic: start it again then
    done: bool = False  # burst mode: it exited 0, and is not replaced


def describe_status(status: int) -> str:
    """A ``waitpid`` status in words: ``exited with status 1``, ``was killed by SIGKILL``."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


class Supervisor:
    """Fork ``processes`` worker processes running ``work(index)`` and supervise them (see the module docstring).

    Not thread-safe: :meth:`run` is called once, on the main thread.
    """

    def __init__(self, processes: int, work: Callable[[int], int], *, stop_timeout: float, burst: bool = False) -> None:
        self._work = work
        self._stop_timeout = stop_timeout
        self._burst = burst
        self._slots = [_Slot(index) for index in range(1, processes + 1)]
        self._signals: list[int] = []  # appended by the signal handler, read by the loop (main thread only)
        self._clean = True  # every worker process that left so far left cleanly
        self._forwarded = 0  # the stop signal forwarded to the worker processes, once stopping
        self._wakeup_read = self._wakeup_write = -1

    def run(self) -> int:
        """Start the worker processes and supervise them until a signal (or, in burst mode, until all are done).

        Blocks until then and until they stopped (at most ``stop_timeout + EXIT_GRACE`` seconds
        after the signal, plus the SIGKILL). Returns 0 when every one stopped cleanly, else 1.
        Raises ConfigurationError off the main thread (signals are handled there).
        """
        if threading.current_thread() is not threading.main_thread():
            raise ConfigurationError("--processes must run on the main thread (it handles SIGTERM/SIGINT)")
        self._wakeup_read, self._wakeup_write = os.pipe()
        os.set_blocking(self._wakeup_read, False)
        os.set_blocking(self._wakeup_write, False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (*_STOP_SIGNALS, signal.SIGCHLD)}
        previous_wakeup = signal.set_wakeup_fd(self._wakeup_write)
        try:
            for slot in self._slots:
                self._spawn(slot)
            if self._supervise():
                self._stop_all(self._signals[0])
            return 0 if self._clean else 1
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._wakeup_read)
            os.close(self._wakeup_write)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:  # main thread, between bytecodes
        if signum != signal.SIGCHLD:
            self._signals.append(signum)

    # -- the loop ----------------------------------------------------------------------------------

    def _supervise(self) -> bool:
        """Reap and restart until a stop signal (True) or, in burst mode, until every slot is done (False)."""
        while not self._signals:
            self._reap()
            if self._burst and all(slot.done for slot in self._slots):
                _log.info("every worker process finished: no work left")
                return False
            now = time.monotonic()
            for slot in self._slots:
                if slot.restart_at is not None and slot.restart_at <= now and not self._signals:
                    self._spawn(slot)
            due = [slot.restart_at - now for slot in self._slots if slot.restart_at is not None]
            self._wait(min([_MAX_WAIT, *due]))
        return True

    def _wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a signal (a child's exit is one), then empty the wake-up pipe."""
        select.select([self._wakeup_read], [], [], max(0.0, timeout))
        try:
            while os.read(self._wakeup_read, 512):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        """Collect the worker processes that exited (only ours: another child of this process is not waited for)."""
        for slot in self._slots:
            if not slot.pid:
                continue
            try:
                pid, status = os.waitpid(slot.pid, os.WNOHANG)
            except ChildProcessError:  # already reaped by someone else: its status is unknown
                pid, status = slot.pid, 1 << 8
            if pid:
                self._exited(slot, status)

    def _exited(self, slot: _Slot, status: int) -> None:
        pid, slot.pid = slot.pid, 0
        code = os.waitstatus_to_exitcode(status)
        lived = time.monotonic() - slot.started
        if self._signals:  # stopping: _stop_all judges it
            self._judge_stopped(slot.index, pid, status)
        elif code == 0 and self._burst:
            _log.info("worker process %d (pid %d) finished: no work left", slot.index, pid)
            slot.done = True
        elif code == RECYCLE:
            _log.info("worker process %d (pid %d) finished its --max-jobs; starting another", slot.index, pid)
            slot.deaths = 0
            slot.restart_at = time.monotonic()
        else:
            slot.deaths = 1 if lived >= _STABLE_AFTER else slot.deaths + 1
            delay = _RESTARTS.delay(slot.deaths)
            _log.warning(
                "worker process %d (pid %d) %s after %.1fs; starting another in %.2fs (death %d in a row)",
                slot.index, pid, describe_status(status), lived, delay, slot.deaths,
            )  # fmt: skip
            slot.restart_at = time.monotonic() + delay

    def _spawn(self, slot: _Slot) -> None:
        slot.restart_at = None
        for handler in logging.getLogger().handlers:
            handler.flush()  # nothing buffered before the fork is written twice
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as error:
            slot.deaths += 1
            delay = _RESTARTS.delay(slot.deaths)
            _log.error("cannot fork worker process %d: %s; trying again in %.2fs", slot.index, error, delay)
            slot.restart_at = time.monotonic() + delay
            return
        if pid == 0:
            self._child(slot.index)  # never returns
        slot.pid, slot.started = pid, time.monotonic()
        _log.info("worker process %d started (pid %d)", slot.index, pid)

    def _child(self, index: int) -> None:
        """In a forked worker process: run ``work(index)`` and exit with its status; never returns."""
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup_read)
            os.close(self._wakeup_write)
            for sig in (*_STOP_SIGNALS, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)  # until the worker installs its own
            if self._signals:
                # Passed on between the fork and the line above: it reached this copy of the parent's
                # handler, so the child stops now, having run no job.
                os._exit(0)
            threading.current_thread().name = f"threaddispatch-worker-{index}"
            status = self._work(index)
        except BaseException:  # noqa: BLE001 - the child must exit here, whatever happened
            _log.exception("worker process %d failed", index)
        finally:
            # The library's components deliver what they hold, as at any exit; the parent's own
            # atexit hooks are the parent's, and do not run here.
            _lifecycle._drain_all_at_exit()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    # -- stopping ----------------------------------------------------------------------------------

    def _stop_all(self, signum: int) -> None:
        """Forward ``signum`` to every worker process, wait for them, SIGKILL what is left by the deadline."""
        live = [slot for slot in self._slots if slot.pid]
        _log.info("received signal %d: stopping %d worker processes", signum, len(live))
        self._forwarded = signum
        for slot in self._slots:
            slot.restart_at = None
        self._send(signum)
        deadline = time.monotonic() + self._stop_timeout + EXIT_GRACE
        killed = False
        while True:
            self._reap()
            live = [slot for slot in self._slots if slot.pid]
            if not live:
                return
            remaining = deadline - time.monotonic()
            if killed and remaining <= 0:
                _log.error("worker processes %s survived SIGKILL; leaving them", [slot.pid for slot in live])
                self._clean = False
                return
            if not killed and (remaining <= 0 or len(self._signals) > 1):
                why = "a second signal" if remaining > 0 else f"still running after {self._stop_timeout + EXIT_GRACE}s"
                _log.warning("%s: killing %d worker processes", why, len(live))
                self._clean = False
                self._send(signal.SIGKILL)
                killed = True
                deadline = time.monotonic() + EXIT_GRACE
                continue
            self._wait(min(remaining, _MAX_WAIT))

    def _send(self, signum: int) -> None:
        for slot in self._slots:
            if slot.pid:
                with suppress(ProcessLookupError):  # exited meanwhile: reaped next
                    os.kill(slot.pid, signum)

    def _judge_stopped(self, index: int, pid: int, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        # Killed by the forwarded signal itself: it had not yet installed its handler, so it ran no job.
        clean = code in (0, RECYCLE) or code == -self._forwarded
        if not clean:
            self._clean = False
        level = logging.INFO if clean else logging.WARNING
        _log.log(level, "worker process %d (pid %d) stopped: %s", index, pid, describe_status(status))
