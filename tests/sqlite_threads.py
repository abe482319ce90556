"""A helper of the SQLite store tests: run functions on threads and collect what they raised."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence


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
