"""Request storages: one contract for memory and SQLite, refusal of unstorable requests, restarts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from threaddispatch.errors import ConfigurationError, PayloadError
from threaddispatch.request_storage import (
    MemoryRequestStorage,
    RequestStorage,
    SQLiteRequestStorage,
    StoredRequest,
)
from threaddispatch.requests import CancellationToken, RequestDispatcher, RequestHandle

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent


def entry(request_id: str, queue_key: str = "k", request: object = None, **options: Any) -> StoredRequest:
    return StoredRequest(request_id=request_id, queue_key=queue_key, request=request, **options)


@pytest.fixture(params=["memory", "sqlite"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RequestStorage]:
    made: RequestStorage = (
        MemoryRequestStorage() if request.param == "memory" else SQLiteRequestStorage(tmp_path / "requests.db")
    )
    yield made
    made.close()


class TestStorageContract:
    """Every storage keeps entries in add order, per queue, with their options, and forgets removed ones."""

    def test_load_returns_entries_in_add_order(self, storage: RequestStorage) -> None:
        """load() returns what was added, oldest first."""
        for name in ("c", "a", "b"):
            storage.add(entry(name, request={"name": name}))
        assert [e.request_id for e in storage.load()] == ["c", "a", "b"]

    def test_fields_round_trip(self, storage: RequestStorage) -> None:
        """Every field of a stored request comes back as it went in (JSON data)."""
        original = entry(
            "id-1",
            "GET /x",
            {"endpoint": "/x", "query": {"a": [1, 2]}, "n": None},
            mode="queued",
            deduplicate=True,
            deduplicate_time=2.5,
            retry=3,
            retry_time=0.25,
            offline=False,
            created_at=1234.5,
        )
        storage.add(original)
        assert storage.load() == [original]

    def test_remove_forgets_and_ignores_unknown_ids(self, storage: RequestStorage) -> None:
        """remove() drops the given ids and ignores ones it does not hold."""
        for name in ("a", "b", "c"):
            storage.add(entry(name))
        storage.remove(["b", "missing"])
        storage.remove([])
        assert [e.request_id for e in storage.load()] == ["a", "c"]

    def test_get_queue_filters_by_key_in_order(self, storage: RequestStorage) -> None:
        """get_queue() returns one key's entries, oldest first."""
        storage.add(entry("1", "x"))
        storage.add(entry("2", "y"))
        storage.add(entry("3", "x"))
        assert [e.request_id for e in storage.get_queue("x")] == ["1", "3"]
        assert storage.get_queue("none") == []

    def test_close_is_idempotent_and_keeps_entries(self, storage: RequestStorage) -> None:
        """close() twice is fine; the storage can be used again afterwards and still holds its entries."""
        storage.add(entry("kept"))
        storage.close()
        storage.close()
        assert [e.request_id for e in storage.load()] == ["kept"]

    def test_concurrent_adds_and_removes(self, storage: RequestStorage) -> None:
        """Many threads adding and removing leave exactly the entries not removed."""

        def work(worker: int) -> None:
            for i in range(50):
                storage.add(entry(f"{worker}-{i}"))
                if i % 2:
                    storage.remove([f"{worker}-{i}"])

        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert len(storage.load()) == 4 * 25


def test_sqlite_storage_refuses_unserialisable_requests_naming_them(tmp_path: Path) -> None:
    """A request that is not JSON-serialisable raises PayloadError naming it; nothing is stored."""
    storage = SQLiteRequestStorage(tmp_path / "r.db")
    with pytest.raises(PayloadError, match=r"id-9.*Widget"):
        storage.add(entry("id-9", request={"body": Widget()}))
    with pytest.raises(PayloadError, match="nan"):
        storage.add(entry("id-10", request=float("nan")))
    assert len(storage) == 0
    storage.close()


class Widget:
    def __repr__(self) -> str:
        return "Widget()"


def test_sqlite_storage_refuses_an_in_memory_database() -> None:
    """':memory:' does not persist: SQLiteRequestStorage refuses it, naming it."""
    with pytest.raises(ConfigurationError, match="memory"):
        SQLiteRequestStorage(":memory:")


def test_dispatcher_refuses_unserialisable_request_at_add(tmp_path: Path) -> None:
    """With a persistent storage, add() raises PayloadError for an unstorable request, which is never sent."""
    calls: list[object] = []
    rd: RequestDispatcher[Any, None] = RequestDispatcher(
        lambda r, t: calls.append(r), storage=SQLiteRequestStorage(tmp_path / "r.db")
    )
    with rd:
        with pytest.raises(PayloadError, match="Widget"):
            rd.add({"endpoint": "/x", "body": Widget()})
        assert rd.get_queue_keys() == []
        rd.add({"endpoint": "/x", "body": "fine"}).future.result(5)
    assert calls == [{"endpoint": "/x", "body": "fine"}]
    assert len(SQLiteRequestStorage(tmp_path / "r.db")) == 0


def test_memory_storage_accepts_any_request() -> None:
    """A non-persistent storage stores requests without serialising them."""
    widget = Widget()
    rd: RequestDispatcher[Widget, Widget] = RequestDispatcher(lambda r, t: r, storage=MemoryRequestStorage())
    with rd:
        assert rd.add(widget, queue_key="k").future.result(5) is widget


def test_settled_requests_leave_the_storage_and_updates_are_reported() -> None:
    """A request is in the storage while queued and gone once settled; on_update_storage sees both."""
    storage = MemoryRequestStorage()
    updates: list[tuple[str, list[str]]] = []
    release = threading.Event()

    def send(request: str, token: CancellationToken) -> str:
        release.wait(10)
        return request

    rd: RequestDispatcher[str, str] = RequestDispatcher(
        send,
        storage=storage,
        on_update_storage=lambda key, entries: updates.append((key, [e.request for e in entries])),  # type: ignore[misc]
    )
    try:
        handle = rd.add("r", queue_key="k")
        assert [e.request_id for e in storage.load()] == [handle.request_id]
        release.set()
        assert handle.future.result(5) == "r"
        assert storage.load() == []
        assert updates == [("k", ["r"]), ("k", [])]
    finally:
        release.set()
        rd.close(5)


def test_deleted_requests_leave_the_storage(tmp_path: Path) -> None:
    """delete() and clear() remove requests from the storage too."""
    storage = SQLiteRequestStorage(tmp_path / "r.db")
    rd: RequestDispatcher[str, str] = RequestDispatcher(lambda r, t: r, storage=storage)
    with rd:
        rd.pause("k")
        first = rd.add("a", queue_key="k")
        rd.add("b", queue_key="k")
        rd.add("c", queue_key="k")
        first.cancel()
        assert [e.request for e in storage.load()] == ["b", "c"]
        rd.clear()
        assert storage.load() == []


def test_requests_survive_into_the_next_dispatcher_on_the_same_sqlite_file(tmp_path: Path) -> None:
    """Queued requests left at close are re-queued, in order, by a dispatcher created on the same file."""
    path = tmp_path / "requests.db"
    first: RequestDispatcher[Any, Any] = RequestDispatcher(lambda r, t: r, storage=SQLiteRequestStorage(path))
    first.set_online(False)
    old = [
        first.add({"endpoint": "/a", "n": 1}, mode="queued", retry=2, retry_time=0.01),
        first.add({"endpoint": "/a", "n": 2}, mode="queued"),
        first.add({"endpoint": "/b", "n": 3}, deduplicate=True),
    ]
    assert first.close(5) is False  # they could not run: cancelled here, kept in the file
    assert all(handle.future.cancelled() for handle in old)
    assert len(SQLiteRequestStorage(path)) == 3

    sent: list[int] = []
    restored: list[RequestHandle[Any]] = []

    def on_initialization(dispatcher: RequestDispatcher[Any, Any], handles: list[RequestHandle[Any]]) -> None:
        assert sent == []  # called before any of them starts
        restored.extend(handles)

    def send(request: dict[str, int], token: CancellationToken) -> int:
        sent.append(request["n"])
        return request["n"] * 10

    storage = SQLiteRequestStorage(path)
    with RequestDispatcher(send, storage=storage, on_initialization=on_initialization) as second:
        assert [h.request_id for h in restored] == [h.request_id for h in old]
        assert [h.queue_key for h in restored] == ["GET /a", "GET /a", "GET /b"]
        assert [h.future.result(5) for h in restored] == [10, 20, 30]
        assert sent.index(1) < sent.index(2)
        assert second.get_queue_keys() == []
    assert len(SQLiteRequestStorage(path)) == 0


def test_memory_storage_hands_requests_to_the_next_dispatcher() -> None:
    """A MemoryRequestStorage passed from one dispatcher to the next carries its queued requests."""
    storage = MemoryRequestStorage()
    first: RequestDispatcher[str, str] = RequestDispatcher(lambda r, t: r, storage=storage)
    first.stop("k")
    first.add("carried", queue_key="k")
    first.close(5)
    restored: list[RequestHandle[str]] = []
    with RequestDispatcher(
        lambda r, t: r.upper(), storage=storage, on_initialization=lambda d, handles: restored.extend(handles)
    ):
        assert [h.future.result(5) for h in restored] == ["CARRIED"]
    assert len(storage) == 0


def _run_child(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_restart_in_a_new_process_requeues_stopped_and_crashed_requests(tmp_path: Path) -> None:
    """A process that exits (stopped queue) or dies (send running) leaves its requests; the next one sends them."""
    path = tmp_path / "requests.db"
    graceful = _run_child(
        f"""
        from threaddispatch.request_storage import SQLiteRequestStorage
        from threaddispatch.requests import RequestDispatcher

        rd = RequestDispatcher(lambda r, t: r, storage=SQLiteRequestStorage({str(path)!r}))
        rd.stop("GET /jobs")
        for n in range(3):
            rd.add({{"endpoint": "/jobs", "n": n}}, mode="queued")
        print("queued", flush=True)
        """
    )
    assert graceful.returncode == 0 and "queued" in graceful.stdout, graceful.stderr
    crashed = _run_child(
        f"""
        import os, threading
        from threaddispatch.request_storage import SQLiteRequestStorage
        from threaddispatch.requests import RequestDispatcher

        started = threading.Event()

        def send(request, token):
            started.set()
            threading.Event().wait(60)

        rd = RequestDispatcher(send, storage=SQLiteRequestStorage({str(path)!r}))
        rd.add({{"endpoint": "/crash", "n": 99}})
        started.wait(10)
        os._exit(0)  # no exit drain: the process dies with the request running
        """
    )
    assert crashed.returncode == 0, crashed.stderr
    assert len(SQLiteRequestStorage(path)) == 4

    sent: list[int] = []
    restored: list[RequestHandle[Any]] = []

    def send(request: dict[str, int], token: CancellationToken) -> int:
        sent.append(request["n"])
        return request["n"]

    with RequestDispatcher(
        send,
        storage=SQLiteRequestStorage(path),
        on_initialization=lambda d, handles: restored.extend(handles),
    ):
        assert sorted(h.future.result(5) for h in restored) == [0, 1, 2, 99]
    assert [n for n in sent if n != 99] == [0, 1, 2]
    assert len(SQLiteRequestStorage(path)) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sqlite_storage_opens_a_new_connection_in_a_forked_child(tmp_path: Path) -> None:
    """A forked child never reuses the parent's connection; both processes keep working on the file."""
    storage = SQLiteRequestStorage(tmp_path / "r.db")
    storage.add(entry("parent"))
    parent_connection = storage._conn
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            storage.add(entry("child"))
            if storage._conn is not parent_connection and len(storage.load()) == 2:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert storage._conn is parent_connection
    assert [e.request_id for e in storage.load()] == ["parent", "child"]
    storage.close()


class _SlowFirstAdd(MemoryRequestStorage):
    """A memory storage whose first ``add`` waits for the test, recording every add it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.storing = threading.Event()
        self.release = threading.Event()
        self.asked: list[str] = []

    def add(self, entry: StoredRequest) -> None:
        self.asked.append(entry.request_id)
        if len(self.asked) == 1:
            self.storing.set()
            self.release.wait(10)
        super().add(entry)


@pytest.mark.timeout(30)
def test_two_adds_of_one_dedupe_key_at_once_store_one_request() -> None:
    """A duplicate added while the first is being stored joins it: the storage never sees the loser."""
    storage = _SlowFirstAdd()
    rd: RequestDispatcher[str, str] = RequestDispatcher(lambda request, token: request, storage=storage)
    try:
        first: list[RequestHandle[str]] = []
        adder = threading.Thread(target=lambda: first.append(rd.add("same", queue_key="k", deduplicate=True)))
        adder.start()
        assert storage.storing.wait(10)
        second = rd.add("same", queue_key="k", deduplicate=True)  # while the first is inside storage.add
        storage.release.set()
        adder.join(10)
        assert second.deduplicated and not first[0].deduplicated
        assert second.request_id == first[0].request_id
        assert second.future is first[0].future
        assert storage.asked == [first[0].request_id]
        assert second.future.result(5) == "same"
    finally:
        storage.release.set()
        rd.close(5)


class _FailingFirstAdd(_SlowFirstAdd):
    """The same, but the first add fails once the test lets it go on."""

    def add(self, entry: StoredRequest) -> None:
        super().add(entry)
        if len(self.asked) == 1:
            raise PayloadError(f"cannot keep {entry.request_id}")


@pytest.mark.timeout(30)
def test_a_duplicate_joined_while_the_first_store_fails_gets_the_failure() -> None:
    """If storing the first request fails, its add raises and a caller that joined it meanwhile gets the error."""
    storage = _FailingFirstAdd()
    rd: RequestDispatcher[str, str] = RequestDispatcher(lambda request, token: request, storage=storage)
    try:
        raised: list[BaseException] = []

        def first() -> None:
            try:
                rd.add("same", queue_key="k", deduplicate=True)
            except PayloadError as error:
                raised.append(error)

        adder = threading.Thread(target=first)
        adder.start()
        assert storage.storing.wait(10)
        joined = rd.add("same", queue_key="k", deduplicate=True)
        storage.release.set()
        adder.join(10)
        assert joined.deduplicated and len(raised) == 1
        with pytest.raises(PayloadError, match="cannot keep"):
            joined.future.result(5)
        assert rd.get_queue_keys() == []
        assert rd.add("same", queue_key="k", deduplicate=True).future.result(5) == "same"  # not joined to the failure
    finally:
        storage.release.set()
        rd.close(5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_and_its_parent_never_make_the_same_request_id(tmp_path: Path) -> None:
    """Request ids made after a fork differ between the processes: on one SQLite file neither replaces the other's."""
    path = tmp_path / "r.db"
    rd: RequestDispatcher[str, str] = RequestDispatcher(
        lambda request, token: request, storage=SQLiteRequestStorage(path)
    )
    rd.pause("k")  # what is added stays stored
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            rd.add("child", queue_key="k")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    rd.add("parent", queue_key="k")
    reader = SQLiteRequestStorage(path)
    try:
        assert sorted(cast(str, e.request) for e in reader.load()) == ["child", "parent"]  # storage keeps object
    finally:
        reader.close()
        rd.close(5)
