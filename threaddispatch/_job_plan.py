"""Which claims a JobEngine's fetcher makes now: paused queues, per-queue limits, fair rotation.

One :class:`ClaimPlanner` per run turns "this many worker slots are free" into claims of
(queues, limit), honouring paused queues, each queue's ``max_concurrency`` and its
``rate_limit`` token bucket, and rotating so that no queue always claims first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from threaddispatch._job_config import QueueConfig
from threaddispatch._ratelimit import TokenBucket

__all__ = ["Claim", "ClaimPlanner"]

#: One claim to make: the queues it takes from, how many jobs at most, and the bucket that lent the tokens.
Claim = tuple[list[str], int, "TokenBucket | None"]


class ClaimPlanner:
    """The claim plan of one run over ``queues``, with the limits of ``queue_configs``. Fetcher thread only."""

    def __init__(self, queues: Sequence[str], queue_configs: Sequence[QueueConfig]) -> None:
        self._queues = tuple(queues)
        self._limits = {c.name: c for c in queue_configs if c.name in self._queues}
        self._buckets = {c.name: TokenBucket(c.rate_limit, c.rate_burst) for c in self._limits.values() if c.rate_limit}
        self._rotation = 0

    def limited(self, queues: Sequence[str]) -> bool:
        """Whether a claim over ``queues`` is one limited queue's (the store holds it to the cluster's limits)."""
        return len(queues) == 1 and queues[0] in self._limits

    def plan(self, free: int, paused: set[str], running: Mapping[str, int]) -> tuple[list[Claim], float]:
        """Claims for ``free`` slots (``running``: jobs running per queue); and how soon a rate limit frees a token.

        A claim's bucket has lent its ``limit`` tokens: give back what the claim did not use.
        """
        plans: list[Claim] = []
        unlimited: list[str] = []
        rate_wait = math.inf
        for queue in self._queues:
            if queue in paused:
                continue
            limits = self._limits.get(queue)
            if limits is None:
                unlimited.append(queue)
                continue
            room = free
            if limits.max_concurrency is not None:
                room = min(room, limits.max_concurrency - running.get(queue, 0))
            if room <= 0:
                continue
            bucket = self._buckets.get(queue)
            if bucket is not None:
                room = bucket.take(room)
                if room <= 0:
                    rate_wait = min(rate_wait, bucket.wait_time())
                    continue
            plans.append(([queue], room, bucket))
        if unlimited:
            plans.append((unlimited, free, None))
        if len(plans) > 1:
            # Rotate so no queue always claims first and starves the others.
            self._rotation = (self._rotation + 1) % len(plans)
            plans = plans[self._rotation :] + plans[: self._rotation]
        return plans, rate_wait
