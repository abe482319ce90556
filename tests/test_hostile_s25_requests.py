"""Hostile tests of RequestDispatcher with SQLiteRequestStorage and text SQLite cannot store.

The promise attacked (README, RequestDispatcher): "A request that cannot be serialised is
refused at ``add``" with PayloadError naming it (NaN and objects are). A lone surrogate
(``"\\ud800"``, what ``surrogateescape`` makes of undecodable bytes) is valid JSON text for
``json.dumps(..., ensure_ascii=False)`` but not UTF-8, so SQLite's bind raises a bare
UnicodeEncodeError out of ``add``. A response holding one is delivered and only its caching
is skipped (logged): that part holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from threaddispatch import RequestDispatcher, SQLiteRequestStorage
from threaddispatch.errors import PayloadError

pytestmark = pytest.mark.timeout(30)

SURROGATE = "caf\udce9"  # b"caf\xe9" decoded with surrogateescape


@pytest.mark.parametrize("mode", ["concurrent", "queued"])
def test_a_request_with_a_lone_surrogate_is_refused_at_add_with_payload_error(tmp_path: Path, mode: str) -> None:
    sent: list[object] = []
    rd: RequestDispatcher[Any, None] = RequestDispatcher(
        lambda request, token: sent.append(request), storage=SQLiteRequestStorage(tmp_path / "r.db")
    )
    with rd:
        with pytest.raises(PayloadError, match="request"):
            rd.add({"endpoint": "/files", "name": SURROGATE}, mode=mode)  # type: ignore[arg-type]
        assert rd.get_queue_keys() == []
        rd.add({"endpoint": "/files", "name": "fine"}, mode=mode).future.result(10)  # type: ignore[arg-type]
    assert sent == [{"endpoint": "/files", "name": "fine"}]


def test_a_response_with_a_lone_surrogate_is_delivered_and_not_cached(tmp_path: Path) -> None:
    calls: list[object] = []

    def send(request: Any, token: object) -> str:
        calls.append(request)
        return SURROGATE

    rd: RequestDispatcher[Any, str] = RequestDispatcher(
        send, storage=SQLiteRequestStorage(tmp_path / "r.db"), cache_time=60
    )
    with rd:
        first = rd.add({"endpoint": "/name"})
        assert first.future.result(10) == SURROGATE
        second = rd.add({"endpoint": "/name"})
        assert second.future.result(10) == SURROGATE
        assert not second.cached  # the first response could not be stored: sent again, never a wrong answer
    assert len(calls) == 2
