"""Connectivity: RequestDispatcher's optional online probe and the errors that mean "the connection is lost".

Holds the validated ``is_online``/``online_check_interval``/``offline_on`` options and
calls the probe. The dispatcher's timer thread (the one that releases retries) polls
it every ``interval`` seconds, with no lock held (an ``async def`` probe is awaited on
that thread's private loop), and applies the answer through
``set_online``; a send failing with one of ``offline_on`` takes the dispatcher offline
until the probe (or ``set_online(True)``) brings it back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from threaddispatch import _invoke
from threaddispatch._validate import check_seconds, show
from threaddispatch.errors import ConfigurationError

__all__ = ["Connectivity", "check_offline_on"]

_log = logging.getLogger("threaddispatch.requests")


def check_offline_on(offline_on: object) -> tuple[type[BaseException], ...]:
    """``offline_on`` as a tuple of exception classes, or ConfigurationError naming it."""
    if not isinstance(offline_on, tuple) or not all(
        isinstance(kind, type) and issubclass(kind, BaseException) for kind in offline_on
    ):
        raise ConfigurationError(f"offline_on must be a tuple of exception classes, got {show(offline_on)}")
    return offline_on


class Connectivity:
    """The probe and its interval. Immutable after construction; thread-safe."""

    __slots__ = ("interval", "is_online", "name")

    def __init__(self, is_online: Callable[[], object], interval: float, name: str) -> None:
        if not callable(is_online):
            raise ConfigurationError(f"is_online must be callable or None, got {show(is_online)}")
        self.is_online = is_online
        self.interval = check_seconds("online_check_interval", interval, allow_zero=False)
        self.name = name

    def probe(self) -> bool | None:
        """Call the probe (never with a lock held): whether the connection is up, or None if the probe raised."""
        outcome = _invoke.call(self.is_online)  # never raises; an async probe is awaited
        if outcome.error is not None:  # a broken probe is logged; the dispatcher keeps its state
            _log.error("%s: is_online raised; keeping the current online state", self.name, exc_info=outcome.error)
            return None
        return bool(outcome.value)
