"""Hostile tests of the exit log's count: each entry lost at exit is counted once, on every face.

The promise attacked (README, "How your functions are called", and each face's "Exit"): the
exit drain "logs what was delivered and lost", and "a send still running or abandoned at exit
is reported lost". Each case runs a real interpreter that exits with N entries inside sends
that never return (``threading.Event().wait()``, released by nothing), and reads the drain's
WARNING line: it must say ``delivered 0 entries and lost N``.

BatchedDispatcher, RequestDispatcher and EndpointBatchDispatcher run their sends on the shared WorkerPool
(``threaddispatch._pool``), which is registered with the exit registry too. It reported each
of its busy threads as one entry lost (``WorkerPool._drain_at_exit``: ``(0, self.busy())``),
on top of the face's own count of the same entries, so the line said ``lost 2N``; now the
pool only waits and each owner counts its own.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

PRELUDE = """
    import logging, threading
    import threaddispatch
    from threaddispatch import *
    from threaddispatch.testing import wait_for
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    threaddispatch.set_exit_timeout(0.5)
    never = threading.Event()
    started = []
    lock = threading.Lock()
    def hang(*args):
        with lock:
            started.append(args)
        never.wait()
        return None
"""

#: face -> (code that makes ``face`` with sends into ``hang`` and hands it N entries, each in a send of its own)
FACES = {
    "background": """
        face = BackgroundDispatcher(hang, ms_delay=60_000, max_batch_size={n})
        for i in range({n}):
            face.enqueue(i)
        wait_for(lambda: len(started) == 1, timeout=20)
    """,
    "batched": """
        face = BatchedDispatcher(lambda target, messages: hang(target), max_batch_size=1, max_concurrent_sends={n})
        futures = [face.submit(i, "t%d" % i) for i in range({n})]
        wait_for(lambda: len(started) == {n}, timeout=20)
    """,
    "async": """
        class Hung:
            def dispatch(self, message, target, **kw):
                return hang(message)
        face = AsyncDispatcher(Hung(), target_queue="q")
        send = face.setup(buffer_len={n})
        face.start()
        send.put(0)
        wait_for(lambda: len(started) == 1, timeout=20)
        for i in range(1, {n}):
            send.put(i)
    """,
    "endpoint": """
        face = EndpointBatchDispatcher(hang, batch_timeout=60, max_batch_size=1, max_concurrent_batches={n})
        for i in range({n}):
            face.add_job(DispatchJob("e%d" % i, i))
        wait_for(lambda: len(started) == {n}, timeout=20)
    """,
    "requests": """
        face = RequestDispatcher(hang)
        for i in range({n}):
            face.add({{"endpoint": "/e%d" % i}})
        wait_for(lambda: len(started) == {n}, timeout=20)
    """,
}


def run_script(source: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` in a fresh interpreter importing this checkout; wait for it to exit."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=45, check=False, env=env, cwd=ROOT
    )


def _lost_line(face: str, n: int) -> str:
    source = textwrap.dedent(PRELUDE) + textwrap.dedent(FACES[face].format(n=n))
    result = run_script(source)
    assert result.returncode == 0, result.stderr
    found = re.findall(r"exit drain delivered \d+ entries and lost \d+", result.stderr)
    assert len(found) == 1, result.stderr
    return str(found[0])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("face", ["background", "async"])
def test_entries_in_hung_sends_at_exit_are_each_counted_lost_once(face: str) -> None:
    """Three entries inside sends that never return are logged as lost 3, delivered 0."""
    assert _lost_line(face, 3) == "exit drain delivered 0 entries and lost 3"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [1, 3])
def test_batched_messages_in_hung_sends_at_exit_are_each_counted_lost_once(n: int) -> None:
    """BatchedDispatcher: N one-message batches whose sends never return are logged as lost N, not 2N."""
    assert _lost_line("batched", n) == f"exit drain delivered 0 entries and lost {n}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [1, 3])
def test_requests_in_hung_sends_at_exit_are_each_counted_lost_once(n: int) -> None:
    """RequestDispatcher: N requests whose sends never return are logged as lost N, not 2N."""
    assert _lost_line("requests", n) == f"exit drain delivered 0 entries and lost {n}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [1, 3])
def test_endpoint_jobs_in_hung_sends_at_exit_are_each_counted_lost_once(n: int) -> None:
    """EndpointBatchDispatcher: N one-job batches whose sends never return are logged as lost N, not 2N."""
    assert _lost_line("endpoint", n) == f"exit drain delivered 0 entries and lost {n}"
