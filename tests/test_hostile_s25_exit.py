"""Hostile tests of the exit drain: what a face does with work handed to it after the drain ran.

An ``atexit`` hook registered before the first dispatcher runs after threaddispatch's drain
(hooks run last-in first-out), and such hooks do log and enqueue (a framework's teardown, a
library's own exit hook). The promise attacked: "nothing lost silently". After the drain a
face must either deliver the entry or refuse it at the call; BatchedDispatcher,
EndpointBatchDispatcher, RequestDispatcher and AsyncDispatcher refuse it with
DispatcherClosedError; BackgroundDispatcher accepted it and never sent it (it now refuses it too).

Each case runs in a real interpreter that exits (``subprocess``), importing this checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import threaddispatch

pytestmark = pytest.mark.timeout(60)

ROOT = Path(threaddispatch.__file__).resolve().parent.parent


def run_script(source: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` in a fresh interpreter importing this checkout's threaddispatch; wait for it to exit."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
        env=env,
        cwd=ROOT,
    )


#: Each face: how to make it (``face``, delivering into the list ``got``) and how to hand it one entry.
FACES = {
    "batched": (
        "BatchedDispatcher(lambda target, messages: got.extend(messages))",
        "face.submit({entry!r}, 'target')",
    ),
    "endpoint": (
        "EndpointBatchDispatcher(lambda endpoint, jobs: got.extend(job.payload for job in jobs), batch_timeout=60)",
        "face.add_job(DispatchJob('e1', {entry!r}))",
    ),
    "requests": (
        "RequestDispatcher(lambda request, token: got.append(request['entry']))",
        "face.add({{'endpoint': '/x', 'entry': {entry!r}}})",
    ),
    "background": (
        "BackgroundDispatcher(got.extend, ms_delay=60_000)",
        "face.submit({entry!r})",
    ),
    "background_enqueue": (
        "BackgroundDispatcher(got.extend, ms_delay=60_000)",
        "face.enqueue({entry!r})",
    ),
}

_SCRIPT = """
import atexit, sys
got = []
atexit.register(lambda: sys.stdout.write(f"at the end: {{sorted(got)}}\\n"))  # registered first: runs last
def late():  # registered before the first dispatcher: runs after threaddispatch's exit drain
    try:
        {late}
    except Exception as error:
        sys.stdout.write(f"refused: {{type(error).__name__}}\\n")
    else:
        sys.stdout.write("accepted\\n")
    sys.stdout.write(f"delivered: {{sorted(got)}}\\n")
atexit.register(late)
from threaddispatch import BackgroundDispatcher, BatchedDispatcher, DispatchJob, EndpointBatchDispatcher
from threaddispatch import RequestDispatcher
face = {make}
{first}
"""


def _run_face(face: str) -> subprocess.CompletedProcess[str]:
    make, hand = FACES[face]
    return run_script(_SCRIPT.format(make=make, first=hand.format(entry="first"), late=hand.format(entry="late")))


@pytest.mark.parametrize(
    "face",
    [
        "batched",
        "endpoint",
        "requests",
        "background",
        "background_enqueue",
    ],
)
def test_an_entry_handed_to_a_face_after_the_exit_drain_is_delivered_or_refused_at_the_call(face: str) -> None:
    result = _run_face(face)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    delivered = next(line for line in lines if line.startswith("delivered: "))
    at_the_end = next(line for line in lines if line.startswith("at the end: "))
    assert "'first'" in delivered  # the drain delivered what was there before it
    assert "refused: DispatcherClosedError" in lines or "'late'" in at_the_end, result.stdout


def test_a_record_logged_after_the_exit_drain_is_delivered_by_logging_shutdown() -> None:
    """A BatchingHandler's record logged after the drain is not lost: ``logging.shutdown`` (an atexit hook
    registered when ``logging`` was imported, so it runs after) flushes the handler, on the exiting thread."""
    result = run_script(
        """
        import atexit, sys
        got = []
        atexit.register(lambda: sys.stdout.write(f"at the end: {got}\\n"))  # before logging's hook: runs last
        import logging
        def late():  # runs after threaddispatch's exit drain, before logging.shutdown
            logging.getLogger("app").warning("late record")
            sys.stdout.write(f"delivered: {got}\\n")
        atexit.register(late)
        from threaddispatch.logging import BatchingHandler
        handler = BatchingHandler(lambda records: got.extend(r.getMessage() for r in records), ms_delay=60_000)
        logging.getLogger().addHandler(handler)
        logging.getLogger("app").warning("first record")
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "delivered: ['first record']" in lines  # the drain sent the first; the late one waits in the buffer
    assert "at the end: ['first record', 'late record']" in lines, (result.stdout, result.stderr)


def test_a_background_dispatcher_made_after_the_exit_drain_refuses_entries_at_once() -> None:
    result = run_script(
        """
        import atexit, sys
        def late():  # runs after threaddispatch's exit drain
            from threaddispatch import BackgroundDispatcher
            face = BackgroundDispatcher(print, ms_delay=60_000, name="late-made")
            try:
                face.enqueue("late")
            except Exception as error:
                sys.stdout.write(f"refused: {type(error).__name__}: {error}\\n")
            sys.stdout.write(f"closed: {face.closed}\\n")
        atexit.register(late)
        from threaddispatch import BackgroundDispatcher
        BackgroundDispatcher(print, name="first").enqueue("first")
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "first" in lines[0]  # print(["first"]) by the drain
    refused = next(line for line in lines if line.startswith("refused: "))
    assert refused.startswith("refused: DispatcherClosedError: ")
    assert "'late-made'" in refused and "'late'" in refused and "exit drain" in refused
    assert "closed: True" in lines


def test_an_entry_fed_by_a_send_during_the_exit_drain_is_still_delivered() -> None:
    """The drain runs in passes: a send in one pass may enqueue to another dispatcher, which the next pass sends."""
    result = run_script(
        """
        import atexit, sys
        got = []
        atexit.register(lambda: sys.stdout.write(f"at the end: {got}\\n"))
        from threaddispatch import BackgroundDispatcher
        fed = BackgroundDispatcher(got.extend, ms_delay=60_000, name="fed")
        def forward(entries):
            for entry in entries:
                fed.enqueue(f"fed {entry}")
        feeder = BackgroundDispatcher(forward, ms_delay=60_000, name="feeder")
        feeder.enqueue("one")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "at the end: ['fed one']" in result.stdout.splitlines(), (result.stdout, result.stderr)


def test_a_batching_handler_made_after_the_exit_drain_is_flushed_by_logging_shutdown() -> None:
    """Unlike a plain BackgroundDispatcher, a BatchingHandler's stays open after the drain: logging.shutdown sends."""
    result = run_script(
        """
        import atexit, sys
        got = []
        atexit.register(lambda: sys.stdout.write(f"at the end: {got}\\n"))  # before logging's hook: runs last
        import logging
        def late():  # runs after threaddispatch's exit drain, before logging.shutdown
            from threaddispatch.logging import BatchingHandler
            handler = BatchingHandler(lambda records: got.extend(r.getMessage() for r in records), ms_delay=60_000)
            logging.getLogger().addHandler(handler)
            logging.getLogger("app").warning("late record")
            sys.stdout.write(f"open: {not handler.dispatcher.closed}\\n")
        atexit.register(late)
        from threaddispatch import BackgroundDispatcher
        BackgroundDispatcher(print, name="first").enqueue("first")  # the drain is installed and runs
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "open: True" in lines, (result.stdout, result.stderr)
    assert "at the end: ['late record']" in lines, (result.stdout, result.stderr)
