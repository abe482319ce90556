"""RequestDispatcher's link to its storage: keep a request, forget settled ones, reload them, tell the callback.

One :class:`StorageLink` per dispatcher with a ``storage``. Every method calls the
storage or ``on_update_storage`` (user code), so none is ever called with the core's
lock held. Keeping a request raises what the storage raises (the caller's ``add``
fails with it); forgetting one never raises (a failing storage is logged, delivery goes on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from threaddispatch import _invoke
from threaddispatch._request_records import PendingRequest
from threaddispatch._request_types import MODES
from threaddispatch.request_storage import RequestStorage, StoredRequest

__all__ = ["StorageLink"]

_log = logging.getLogger("threaddispatch.requests")


class StorageLink:
    """The storage and ``on_update_storage`` of one dispatcher. Thread-safe if the storage is."""

    __slots__ = ("name", "on_update", "storage")

    def __init__(
        self,
        storage: RequestStorage,
        on_update: Callable[[str, list[StoredRequest]], object] | None,
        name: str,
    ) -> None:
        self.storage = storage
        self.on_update = on_update
        self.name = name

    @property
    def persistent(self) -> bool:
        """Whether what the storage keeps outlives the process (requests close cancels are not lost then)."""
        return bool(self.storage.persistent)

    def keep(self, req: PendingRequest) -> None:
        """Write ``req`` to the storage (on the caller's thread) and mark it stored; raises what the storage raises."""
        self.storage.add(
            StoredRequest(
                request_id=req.request_id,
                queue_key=req.queue_key,
                request=req.request,
                mode=req.mode,
                deduplicate=req.dedupe_key is not None,
                deduplicate_time=req.deduplicate_time,
                retry=req.retry,
                retry_time=req.retry_time,
                offline=req.offline,
                created_at=time.time(),
            )
        )
        req.stored = True
        self._updated({req.queue_key})

    def forget(self, pairs: list[tuple[str, str]]) -> None:
        """Remove these ``(queue key, request id)`` from the storage; a failure is logged, never raised."""
        try:
            self.storage.remove([request_id for _key, request_id in pairs])
        except Exception:  # noqa: BLE001 - a failing storage must not break delivery; it is logged
            _log.exception("%s: removing %d settled request(s) from the storage failed", self.name, len(pairs))
        self._updated({key for key, _id in pairs})

    def load(self, dedupe_key: Callable[[object], str]) -> list[PendingRequest]:
        """What the storage holds, in order, as stored requests; entries it cannot use are logged and skipped."""
        requests: list[PendingRequest] = []
        for entry in self.storage.load():
            if entry.mode not in MODES:
                _log.error("%s: stored request %s has unknown mode %r", self.name, entry.request_id, entry.mode)
                continue
            key = None
            if entry.deduplicate:
                try:
                    key = (entry.queue_key, dedupe_key(entry.request))
                except Exception:  # noqa: BLE001 - a key function failing on old data must not block the rest
                    _log.exception("%s: dedupe_key failed on stored request %s", self.name, entry.request_id)
            req = PendingRequest(
                entry.request_id,
                entry.queue_key,
                entry.request,
                entry.mode,
                key,
                entry.deduplicate_time,
                entry.retry,
                entry.retry_time,
                entry.offline,
            )
            req.stored = True
            requests.append(req)
        return requests

    def close(self) -> None:
        """Close the storage; a failure is logged."""
        try:
            self.storage.close()
        except Exception:  # noqa: BLE001 - closing must finish whatever the storage does
            _log.exception("%s: closing the storage failed", self.name)

    def _updated(self, keys: set[str]) -> None:
        callback = self.on_update
        if callback is None:
            return
        for key in keys:
            try:
                entries = self.storage.get_queue(key)
            except Exception:  # noqa: BLE001 - a failing storage must not break delivery; it is logged
                _log.exception("%s: reading queue %r from the storage failed", self.name, key)
                continue
            outcome = _invoke.call(callback, key, entries)  # never raises; async callbacks are awaited
            if outcome.error is not None:
                _log.error("%s: on_update_storage raised for queue %r", self.name, key, exc_info=outcome.error)
