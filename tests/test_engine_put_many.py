"""BatchEngine.put_many: a list of entries into one lane under one acquisition of the lock, as put decides each."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from typing import Any

import pytest
from test_engine import Recorder

from threaddispatch._engine import BatchEngine
from threaddispatch.errors import DispatcherClosedError, QueueFullError

pytestmark = pytest.mark.timeout(30)


class Sink(Recorder):
    def items(self, key: Hashable) -> list[Any]:
        with self.lock:
            return [item for k, batch in self.batches for item in batch if k == key]


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def engines() -> Iterator[list[BatchEngine[Any]]]:
    made: list[BatchEngine[Any]] = []
    yield made
    for engine in made:
        engine.close(10)


def _engine(engines: list[BatchEngine[Any]], sink: Sink, **options: Any) -> BatchEngine[Any]:
    options.setdefault("window", 60.0)
    options.setdefault("max_batch_size", 10)
    engine: BatchEngine[Any] = BatchEngine(sink, name="put-many", **options)
    engines.append(engine)
    return engine


def test_put_many_delivers_in_order_in_full_batches(engines: list[BatchEngine[Any]], sink: Sink) -> None:
    engine = _engine(engines, sink)
    assert engine.put_many(list(range(25)), "k") == 25
    assert engine.put_many([25, 26], "k") == 2
    assert engine.flush(10)
    assert sink.items("k") == list(range(27))
    sizes = [len(batch) for key, batch in sink.batches if key == "k"]
    assert sizes[:2] == [10, 10]  # the full batches went as batches, not one entry at a time
    assert engine.taken == 27


def test_put_many_takes_the_lock_once(
    engines: list[BatchEngine[Any]], sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(engines, sink)
    engine.put(0, "k")  # the worker exists: nothing else takes the lock in between but it
    acquired = []
    real = engine._lock

    class Counting:
        def __enter__(self) -> None:
            acquired.append(threading.current_thread())
            real.acquire()

        def __exit__(self, *exc: object) -> None:
            real.release()

    monkeypatch.setattr(engine, "_lock", Counting())
    assert engine.put_many(list(range(1, 50)), "k") == 49
    monkeypatch.setattr(engine, "_lock", real)
    assert acquired.count(threading.current_thread()) == 1
    assert engine.flush(10)
    assert sink.items("k") == list(range(50))


def test_put_many_drop_newest_drops_what_does_not_fit(engines: list[BatchEngine[Any]], sink: Sink) -> None:
    engine = _engine(engines, sink, max_queue_size=5, max_batch_size=100)
    assert engine.put_many(list(range(8)), "k") == 5
    assert engine.dropped == 3
    assert engine.flush(10)
    assert sink.items("k") == [0, 1, 2, 3, 4]


def test_put_many_drop_oldest_keeps_the_newest(engines: list[BatchEngine[Any]], sink: Sink) -> None:
    engine = _engine(engines, sink, max_queue_size=5, max_batch_size=100, overflow="drop_oldest")
    assert engine.put_many(list(range(8)), "k") == 8
    assert engine.flush(10)
    assert sink.items("k") == [3, 4, 5, 6, 7]


def test_put_many_raise_keeps_what_went_before(engines: list[BatchEngine[Any]], sink: Sink) -> None:
    engine = _engine(engines, sink, max_queue_size=3, max_batch_size=100, overflow="raise")
    with pytest.raises(QueueFullError, match="3 entries"):
        engine.put_many(list(range(5)), "k")
    assert engine.flush(10)
    assert sink.items("k") == [0, 1, 2]


def test_put_many_block_waits_for_room_and_loses_nothing(engines: list[BatchEngine[Any]], sink: Sink) -> None:
    engine = _engine(engines, sink, max_queue_size=4, max_batch_size=4, window=0.01, overflow="block")
    assert engine.put_many(list(range(40)), "k", timeout=10) == 40
    assert engine.flush(10)
    assert sink.items("k") == list(range(40))


def test_put_many_after_close_refuses_all(engines: list[BatchEngine[Any]], sink: Sink) -> None:
    engine = _engine(engines, sink)
    engine.close(10)
    with pytest.raises(DispatcherClosedError, match="2 entries"):
        engine.put_many([1, 2], "k")
    assert sink.batches == []


def test_put_many_of_nothing_accepts_nothing(engines: list[BatchEngine[Any]], sink: Sink) -> None:
    engine = _engine(engines, sink)
    assert engine.put_many([], "k") == 0
    assert engine.pending() == 0
