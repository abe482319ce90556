"""A token bucket: the per-queue rate limit of the job engine.

``rate`` tokens are added per second up to ``burst``; taking a job takes a token.
The bucket never blocks: :meth:`TokenBucket.take` returns how many tokens it could
give and :meth:`TokenBucket.wait_time` how long until the next one, so the caller
(the engine's fetcher) decides how to wait. Thread-safe; the clock is injectable.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from threaddispatch.errors import ConfigurationError

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full.

    Thread-safe; no method blocks.
    """

    def __init__(self, rate: float, burst: int = 1, *, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (math.isfinite(rate) and rate > 0):
            raise ConfigurationError(f"rate_limit must be a finite number of jobs per second > 0, got {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigurationError(f"rate_burst must be an int >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        # _lock guards _tokens and _updated.
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._updated = now

    def available(self) -> int:
        """Whole tokens that :meth:`take` could give now."""
        with self._lock:
            self._refill()
            return int(self._tokens)

    def take(self, wanted: int) -> int:
        """Take up to ``wanted`` whole tokens; returns how many were taken (0 when empty)."""
        with self._lock:
            self._refill()
            taken = max(0, min(wanted, int(self._tokens)))
            self._tokens -= taken
            return taken

    def give_back(self, count: int) -> None:
        """Return ``count`` unused tokens (a claim found fewer jobs than it took tokens for)."""
        if count <= 0:
            return
        with self._lock:
            self._refill()
            self._tokens = min(float(self.burst), self._tokens + count)

    def wait_time(self) -> float:
        """Seconds until at least one whole token is available (0.0 when one is now)."""
        with self._lock:
            self._refill()
            missing = 1.0 - self._tokens
            return 0.0 if missing <= 0 else missing / self.rate
