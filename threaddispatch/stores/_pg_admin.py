"""PostgresStore's dead-letter, queue-pause, lease and cron methods: the objects beside the jobs.

A mixin of :class:`~threaddispatch.stores.postgres.PostgresStore`, written as its other
methods are (each a short ``op(conn)`` handed to the store's ``_run``); the store's own
module keeps the jobs' methods and the connection handling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from threaddispatch.errors import JobNotFoundError
from threaddispatch.stores import _pg_sql as q
from threaddispatch.stores import _sql
from threaddispatch.stores._pg_pool import Conn
from threaddispatch.stores._pg_sql import SQL, pg_job_params
from threaddispatch.stores._sql import cron_from_row, letter_from_row
from threaddispatch.stores.base import CronEntry, DeadLetter, JobRecord, WorkerInfo, key_held

__all__ = ["AdminMethods"]

R = TypeVar("R")


class AdminMethods:
    """The Store methods on dead letters, paused queues, leases and cron entries, for PostgresStore."""

    if TYPE_CHECKING:  # provided by PostgresStore
        _with_holds: bool
        _letter_job: bool

        def _run(self, what: str, op: Callable[[Conn], R], *, idempotent: bool, setup: bool = True) -> R: ...

        def _wake(self, conn: Conn, queues: Sequence[str], run_at: float) -> None: ...

        @classmethod
        def _insert(cls, conn: Conn, job: JobRecord) -> str: ...

        @staticmethod
        def _insert_unique(conn: Conn, job: JobRecord) -> str: ...

        @staticmethod
        def _mark_depended_on(conn: Conn, ids: Sequence[str]) -> None: ...

        def _settle_missed(self, jobs: Sequence[JobRecord]) -> None: ...

        @staticmethod
        def _check_limit(limit: int, offset: int) -> None: ...

    # -- dead letters ------------------------------------------------------------------------------------

    def list_dead_letters(self, *, queue: str | None = None, limit: int = 50, offset: int = 0) -> list[DeadLetter]:
        """See :meth:`Store.list_dead_letters`."""
        self._check_limit(limit, offset)
        query, params = SQL.list_dead_letters(queue, limit, offset, job_fields=self._letter_job)

        def op(conn: Conn) -> list[DeadLetter]:
            return [letter_from_row(row) for row in conn.execute(query, params).fetchall()]

        return self._run("listing dead letters", op, idempotent=True)

    def count_dead_letters(self, *, queue: str | None = None) -> int:
        """See :meth:`Store.count_dead_letters`: one ``COUNT``."""
        query, params = SQL.count_dead_letters(queue)

        def op(conn: Conn) -> int:
            row = conn.execute(query, params).fetchone()
            return int(row[0]) if row is not None else 0

        return self._run("counting dead letters", op, idempotent=True)

    def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """See :meth:`Store.get_dead_letter`."""

        def op(conn: Conn) -> DeadLetter | None:
            row = conn.execute(SQL.get_letter[self._letter_job], (dead_letter_id,)).fetchone()
            return None if row is None else letter_from_row(row)

        return self._run("reading a dead letter", op, idempotent=True)

    def replay_dead_letter(self, dead_letter_id: str, *, job: JobRecord) -> str:
        """See :meth:`Store.replay_dead_letter`: the delete (its row lock: one replay of a letter at a time),
        the requeue's checks and the insert in one transaction; a refusal rolls the delete back.

        A dependent's dependencies are marked first and its missed releases settled after, as
        :meth:`enqueue` does for a new dependent (a dependency completing meanwhile still releases it).
        """

        def op(conn: Conn) -> str:
            self._mark_depended_on(conn, list(dict.fromkeys(job.depends_on)))
            with conn.transaction():
                if conn.execute(SQL.delete_letter, (dead_letter_id,)).rowcount != 1:
                    raise JobNotFoundError(f"no dead letter with id {dead_letter_id!r}")
                placed, waits = SQL.place_replay(conn, dead_letter_id, job)
                if placed.unique_key is None:
                    conn.execute(q.INSERT, pg_job_params(placed))
                elif (holder := self._insert_unique(conn, placed)) != placed.id:
                    # An active holder of the key committed after the check: refused as the check refuses.
                    raise key_held(f"the job of dead letter {dead_letter_id!r}", placed.unique_key, holder)
                SQL.record_waits(conn, placed.id, waits)
                return placed.id

        job_id = self._run("replaying a dead letter", op, idempotent=False)
        if job.depends_on:
            self._settle_missed([job])
        return job_id

    def purge_dead_letters(self, *, older_than: float | None = None) -> int:
        """See :meth:`Store.purge_dead_letters`: one statement."""

        def op(conn: Conn) -> int:
            if older_than is None:
                return conn.execute(SQL.purge_all_letters).rowcount
            return conn.execute(SQL.purge_letters_before, (older_than,)).rowcount

        return self._run("purging dead letters", op, idempotent=True)

    # -- queues --------------------------------------------------------------------------------------------

    def set_queue_paused(self, queue: str, paused: bool, *, now: float) -> None:
        """See :meth:`Store.set_queue_paused`: one upsert; a resume NOTIFYs the queue in its transaction.

        An engine woken for a queue it believes paused reads the paused queues again at once.
        """

        def op(conn: Conn) -> None:
            if paused:
                conn.execute(SQL.pause_queue, (queue, True, now))
                return
            with conn.transaction():
                conn.execute(SQL.pause_queue, (queue, False, now))
                self._wake(conn, [queue], now)

        self._run("pausing a queue", op, idempotent=True)

    def paused_queues(self) -> set[str]:
        """See :meth:`Store.paused_queues`."""

        def op(conn: Conn) -> set[str]:
            return {str(row[0]) for row in conn.execute(q.PAUSED_QUEUES).fetchall()}

        return self._run("reading paused queues", op, idempotent=True)

    # -- cron and leases -----------------------------------------------------------------------------------

    def acquire_lease(self, name: str, *, holder: str, ttl: float, now: float) -> bool:
        """See :meth:`Store.acquire_lease`: one upsert whose row lock makes it atomic across processes."""

        def op(conn: Conn) -> bool:
            row = conn.execute(q.ACQUIRE_LEASE, (name, holder, now + ttl, now)).fetchone()
            return row is not None and row[0] == holder

        return self._run("taking a lease", op, idempotent=True)

    def release_lease(self, name: str, *, holder: str) -> None:
        """See :meth:`Store.release_lease`."""

        def op(conn: Conn) -> None:
            conn.execute(SQL.release_lease, (name, holder))

        self._run("releasing a lease", op, idempotent=True)

    def upsert_cron(self, entry: CronEntry, *, now: float) -> CronEntry:
        """See :meth:`Store.upsert_cron`: one upsert."""

        def op(conn: Conn) -> CronEntry:
            row = conn.execute(q.UPSERT_CRON, _sql.cron_params(entry, now)).fetchone()
            assert row is not None  # an upsert always returns its row
            return cron_from_row(row)

        return self._run("storing a cron entry", op, idempotent=True)

    def list_crons(self) -> list[CronEntry]:
        """See :meth:`Store.list_crons`."""

        def op(conn: Conn) -> list[CronEntry]:
            return [cron_from_row(row) for row in conn.execute(SQL.list_crons)]

        return self._run("listing cron entries", op, idempotent=True)

    def delete_cron(self, name: str) -> bool:
        """See :meth:`Store.delete_cron`."""

        def op(conn: Conn) -> bool:
            return conn.execute(SQL.delete_cron, (name,)).rowcount == 1

        return self._run("deleting a cron entry", op, idempotent=False)

    def set_cron_enabled(self, name: str, enabled: bool, *, now: float) -> CronEntry:
        """See :meth:`Store.set_cron_enabled`: one statement (disabled: ``last_tick = Infinity``)."""
        query = q.set_cron_enabled_sql(enabled)

        def op(conn: Conn) -> CronEntry:
            row = conn.execute(query, {"now": now, "name": name}).fetchone()
            if row is None:
                raise JobNotFoundError(f"no cron entry named {name!r}")
            return cron_from_row(row)

        return self._run("enabling a cron entry" if enabled else "disabling a cron entry", op, idempotent=True)

    def fire_cron(self, name: str, *, tick: float, job: JobRecord) -> bool:
        """See :meth:`Store.fire_cron`: a compare-and-set of ``last_tick`` (its row lock serialises
        the processes) and the insert, in one transaction."""

        def op(conn: Conn) -> bool:
            with conn.transaction():
                if not SQL.advance_cron(conn, name, tick, job.created_at):
                    return False
                if not SQL.cron_skips(conn, name, job, holds=self._with_holds):
                    self._insert(conn, job)
                return True

        # Safe to repeat: the second run finds last_tick == tick and fires nothing.
        return self._run("firing a cron entry", op, idempotent=True)

    # -- the worker registry: one statement each --------------------------------------------------

    def register_worker(self, info: WorkerInfo) -> None:
        """See :meth:`Store.register_worker`: one upsert."""

        def op(conn: Conn) -> None:
            conn.execute(SQL.register_worker, _sql.worker_params(info))

        self._run("registering a worker", op, idempotent=True)

    def heartbeat_worker(self, worker_id: str, *, running: int, now: float) -> bool:
        """See :meth:`Store.heartbeat_worker`."""

        def op(conn: Conn) -> bool:
            return bool(conn.execute(SQL.heartbeat_worker, (running, now, worker_id)).rowcount == 1)

        return self._run("heartbeating a worker", op, idempotent=True)

    def remove_worker(self, worker_id: str) -> bool:
        """See :meth:`Store.remove_worker`."""

        def op(conn: Conn) -> bool:
            return bool(conn.execute(SQL.remove_worker, (worker_id,)).rowcount == 1)

        return self._run("removing a worker", op, idempotent=False)

    def list_workers(self, *, now: float, stale_after: float) -> list[WorkerInfo]:
        """See :meth:`Store.list_workers`."""

        def op(conn: Conn) -> list[WorkerInfo]:
            return [_sql.worker_from_row(row) for row in conn.execute(SQL.list_workers, (now - stale_after,))]

        return self._run("listing workers", op, idempotent=True)

    def reap_workers(self, *, older_than: float) -> int:
        """See :meth:`Store.reap_workers`."""

        def op(conn: Conn) -> int:
            return int(conn.execute(SQL.reap_workers, (older_than,)).rowcount)

        return self._run("reaping stale workers", op, idempotent=True)
