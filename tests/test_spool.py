"""The crash-durable spool: group-committed appends, acknowledgement, replay, dead letters, one owner."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from threaddispatch._spool import Spool
from threaddispatch.errors import ConfigurationError, PayloadError, SpoolOwnedError, StoreError
from threaddispatch.testing import wait_for


def test_appended_entries_survive_a_reopen_in_order_until_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "a.spool"
    with Spool(path) as spool:
        seqs = [spool.append({"n": n}) for n in range(5)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 5
        spool.ack(seqs[:2])
        assert len(spool) == 3
    with Spool(path) as again:
        assert again.pending() == [(seq, {"n": n}) for n, seq in enumerate(seqs) if n >= 2]
        later = again.append("new")
        assert later > seqs[-1]  # numbers never go back, so replayed entries stay first


@pytest.mark.timeout(60)
def test_appends_waiting_on_a_commit_join_the_next_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "b.spool")
    commits = 0
    lead = spool._lead

    def counting_lead() -> None:
        nonlocal commits
        commits += 1
        lead()

    spool._lead = counting_lead  # type: ignore[method-assign]
    got: dict[int, list[int]] = {}

    def produce(index: int) -> None:
        got[index] = [spool.append([index, n]) for n in range(50)]

    with spool._db:  # the first leader blocks in its write; everyone else queues behind it
        first = threading.Thread(target=produce, args=(0,))
        first.start()
        wait_for(lambda: spool._leading, timeout=10)
        others = [threading.Thread(target=produce, args=(i,)) for i in range(1, 8)]
        for thread in others:
            thread.start()
        wait_for(lambda: len(spool._queue) == 7, timeout=10)  # one entry from each waiting producer
    for thread in [first, *others]:
        thread.join(timeout=30)
    every = [seq for seqs in got.values() for seq in seqs]
    assert len(every) == len(set(every)) == 400
    pending = spool.pending()
    assert len(pending) == 400
    for index in range(8):  # each producer's entries keep its order
        assert [entry[1] for _, entry in pending if entry[0] == index] == list(range(50))
    assert commits < 400  # the seven queued entries went in one commit, at least
    spool.close()


def test_a_second_owner_is_refused_naming_the_pid(tmp_path: Path) -> None:
    path = tmp_path / "c.spool"
    with Spool(path):
        with pytest.raises(SpoolOwnedError, match=rf"owned by another dispatcher \(pid {os.getpid()}\)"):
            Spool(path)
        code = f"from threaddispatch._spool import Spool\nSpool({str(path)!r})"
        other = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
        assert other.returncode == 1 and "SpoolOwnedError" in other.stderr
    Spool(path).close()  # released at close


def test_ownership_ends_when_the_owner_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "d.spool"
    code = (
        "import os, sys, signal\nfrom threaddispatch._spool import Spool\n"
        f"s = Spool({str(path)!r})\ns.append('kept')\nprint('ready', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)"
    )
    child = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert child.stdout.strip() == "ready" and child.returncode == -9
    with Spool(path) as spool:
        assert [entry for _, entry in spool.pending()] == ["kept"]


def test_dead_letters_leave_the_pending_entries_and_can_be_taken_back(tmp_path: Path) -> None:
    with Spool(tmp_path / "e.spool", sync="full") as spool:
        seqs = spool.append_many(["a", "b", "c"])
        spool.dead_letter(seqs[:2], "HTTP 500")
        assert [entry for _, entry in spool.pending()] == ["c"]
        dead = spool.dead_letters()
        assert [(d.entry, d.error) for d in dead] == [("a", "HTTP 500"), ("b", "HTTP 500")]
        assert spool.take_dead_letters([seqs[1]]) == [(seqs[1], "b")]
        assert [entry for _, entry in spool.pending()] == ["b", "c"]
        assert spool.take_dead_letters() == [(seqs[0], "a")]
        assert spool.dead_letters() == []


def test_bad_input_is_refused_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="spool_sync must be 'normal' or 'full', got 'always'"):
        Spool(tmp_path / "f.spool", sync="always")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="spool must be a file path, got 42"):
        Spool(42)  # type: ignore[arg-type]
    with Spool(tmp_path / "g.spool") as spool:
        with pytest.raises(PayloadError, match="JSON-encodable"):
            spool.append({1, 2})
        assert len(spool) == 0
    with pytest.raises(StoreError, match="is closed"):
        spool.append("late")
    spool.close()  # idempotent


def test_taking_dead_letters_back_can_be_limited_to_a_buffers_room(tmp_path: Path) -> None:
    with Spool(tmp_path / "h.spool") as spool:
        seqs = spool.append_many(["a", "b", "c"])
        spool.dead_letter(seqs, "HTTP 500")
        assert spool.take_dead_letters(limit=0) == []
        assert spool.take_dead_letters(limit=2) == [(seqs[0], "a"), (seqs[1], "b")]
        assert spool.take_dead_letters([seqs[2]], limit=1) == [(seqs[2], "c")]
        with pytest.raises(ConfigurationError, match="limit must be an int from 0"):
            spool.take_dead_letters(limit=-1)


def test_settle_acknowledges_or_dead_letters_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "h.spool")
    delivered, failed, exhausted = spool.append_many(["a", "b", "c"])
    spool.settle([delivered], None, "Face 'x'")
    spool.settle([failed], RuntimeError("HTTP 500"), "Face 'x'")
    spool.settle([exhausted], "exhausted", "Face 'x'")
    spool.settle([], RuntimeError("nothing to settle"), "Face 'x'")
    assert spool.pending() == []
    assert [(d.entry, d.error) for d in spool.dead_letters()] == [("b", "RuntimeError: HTTP 500"), ("c", "exhausted")]
    late = spool.append("d")
    spool.close()
    spool.settle([late], None, "Face 'x'")  # closed by a stop past its timeout: left for the next owner
    (warning,) = [r for r in caplog.records if "could not record" in r.getMessage()]
    assert warning.levelno == logging.WARNING and warning.exc_info is None
    assert "Face 'x': the spool could not record 1 settled entries: it was closed" in warning.getMessage()
    with Spool(tmp_path / "h.spool") as again:
        assert again.pending() == [(late, "d")]


def test_reads_of_a_closed_spool_raise_store_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "i.spool")
    spool.close()
    for read in (spool.pending, spool.dead_letters, spool.__len__):
        with pytest.raises(StoreError, match="is closed"):
            read()
