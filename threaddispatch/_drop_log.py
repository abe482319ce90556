"""Telling an operator that a face drops work: the one implementation every face uses.

A face that drops entries by its overflow policy counts them in ``stats()``; this module
also *says* so in the log, without flooding it: one WARNING at the first drop, then at most
one WARNING per ``interval`` seconds carrying the count since the last line, and one INFO
when the face recovers. Recovery is judged off the hot path: a face calls
:meth:`DropLog.delivered` after each delivery it makes (a batch sent, a job done), and
the first delivery that saw no drop since the previous delivery ends the episode.

Both calls are cheap when nothing is dropping (one attribute read in :meth:`delivered`)
and never call user code; the log record carries ``threaddispatch_dropped`` (the count in
the line) and ``threaddispatch_face`` as ``extra`` fields, so JSON formatters pick them up.
Call them outside the face's own lock: logging takes the handlers' locks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["DropLog"]

#: Seconds between two WARNING lines while a face keeps dropping.
INTERVAL = 60.0


class DropLog:
    """Logs a face's drops: WARNING at the first, at most one per ``interval`` after, INFO at recovery.

    ``what`` names the face in every line (e.g. ``"BackgroundDispatcher 'audit'"``);
    ``policy`` says why entries are dropped (e.g. ``"overflow='drop_newest',
    max_queue_size=10000"``). Never blocks beyond its own short lock.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        policy: str = "",
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self._policy = f" ({policy})" if policy else ""
        self._interval = interval
        self._clock = clock
        # _lock guards the episode below; the log calls happen after it is released.
        self._lock = threading.Lock()
        self._dropping = False  # in an episode: dropped since the last recovery
        self._unreported = 0  # dropped since the last WARNING line
        self._episode = 0  # dropped since the episode began
        self._since_delivery = 0  # dropped since the last delivered()
        self._last_line = 0.0  # clock() of the last WARNING line

    @property
    def dropping(self) -> bool:
        """Whether the face is in a dropping episode (dropped, and not yet recovered)."""
        return self._dropping

    def dropped(self, count: int = 1, *, detail: str = "", exc_info: BaseException | None = None) -> None:
        """Record ``count`` entries dropped; logs a WARNING now if one is due. Call outside the face's lock.

        ``detail`` (e.g. which entry and why) ends the line and ``exc_info`` (the error that
        lost it) is its traceback, when a line is due; otherwise both are only counted past.
        """
        if count <= 0:
            return
        now = self._clock()
        with self._lock:
            self._unreported += count
            self._episode += count
            self._since_delivery += count
            if self._dropping and now - self._last_line < self._interval:
                return
            first = not self._dropping
            self._dropping = True
            self._last_line = now
            reported, self._unreported = self._unreported, 0
        if first:
            message = "%s is dropping entries%s: %d dropped; next report in at most %g s"
            args: tuple[object, ...] = (self._what, self._policy, reported, self._interval)
        else:
            message = "%s is still dropping entries%s: %d dropped since the last report"
            args = (self._what, self._policy, reported)
        if detail:
            message += "; last: %s"
            args += (detail,)
        self._logger.warning(message, *args, exc_info=exc_info, extra=self._extra(reported))

    def delivered(self) -> None:
        """Note a delivery; logs one INFO line if the face dropped nothing since the previous one."""
        if not self._dropping:  # unlocked read: a drop racing it is seen by the next delivery
            return
        with self._lock:
            if not self._dropping:
                return
            if self._since_delivery:
                self._since_delivery = 0
                return
            self._dropping = False
            total, self._episode = self._episode, 0
            unreported, self._unreported = self._unreported, 0
        self._logger.info(
            "%s recovered: no longer dropping entries (%d dropped in all, %d since the last report)",
            self._what,
            total,
            unreported,
            extra=self._extra(total),
        )

    def _extra(self, count: int) -> dict[str, object]:
        return {"threaddispatch_face": self._what, "threaddispatch_dropped": count}
