"""The SQL text PostgresStore runs, and the shaping of its parameters and rows: its one job.

Statements the SQL stores share come from :mod:`threaddispatch.stores._sql` (built here for
psycopg's ``%s``); this module adds what is PostgreSQL's own: the schema's types and NOTIFY
triggers, the one-statement claim (``FOR UPDATE SKIP LOCKED``) and group commit, the reaper
and fail CTEs, COPY, and the wake-up NOTIFY. Pure text: it imports no driver.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from threaddispatch.stores import _sql
from threaddispatch.stores._sql import Statements, job_from_row, job_params
from threaddispatch.stores.base import Completion, JobRecord, JobState

#: The NOTIFY channel; payloads are JSON ``{"schema", "queue", "run_at"}``.
CHANNEL = "threaddispatch"
#: Payloads must be shorter than this many bytes (PostgreSQL's NOTIFY_PAYLOAD_MAX_LENGTH).
NOTIFY_MAX = 8000

PURGE_CHUNK = 1000  # finished jobs deleted per statement

TYPES: _sql.Types = {
    "SEQ": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    "INT": "BIGINT",
    "REAL": "DOUBLE PRECISION",
    "BOOL": "BOOLEAN",
}

# Migration 1: the shared tables (seq is an explicit last key of the claim index), then the
# wake-ups: one NOTIFY per queue per inserting statement (enqueue, COPY, cron, replay).
SCHEMA_V1 = (
    *_sql.schema_v1(TYPES, ready_keys="queue, priority DESC, run_at, seq"),
    f"""CREATE OR REPLACE FUNCTION dispatch_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', json_build_object(
                'schema', TG_TABLE_SCHEMA, 'queue', queue, 'run_at', min_run_at)::text)
            FROM (SELECT queue, min(run_at) AS min_run_at FROM dispatch_new_jobs GROUP BY queue) AS queues;
            RETURN NULL;
        END $$""",
    "DROP TRIGGER IF EXISTS dispatch_jobs_notify ON dispatch_jobs",
    """CREATE TRIGGER dispatch_jobs_notify AFTER INSERT ON dispatch_jobs
        REFERENCING NEW TABLE AS dispatch_new_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION dispatch_jobs_notify()""",
)

# Migration 2: vacuum the jobs table after 1% of its rows changed (the default waits for 20%),
# always with its indexes. Every claim and completion leaves a dead version of the row and a
# dead entry in the claim index until a vacuum removes them, and the claim walks past every
# dead entry of its queue: at 1M finished rows not yet vacuumed a claim costs 8x a vacuumed
# one. PostgreSQL >= 14 skips the index pass when few heap pages hold dead rows, which is
# exactly the queue table's case (its dead rows are the recently finished ones, on a few
# pages), so ``vacuum_index_cleanup = on`` keeps the pass.
SCHEMA_V2 = (
    "ALTER TABLE dispatch_jobs SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000, "
    "autovacuum_analyze_scale_factor = 0.02, vacuum_index_cleanup = on)",
)

# Migration 3: the worker registry (SQLite's migration 2).
SCHEMA_V3 = _sql.schema_workers(TYPES)

# Migration 4: the enqueuing span's traceparent, on jobs and dead letters (SQLite's migration 3).
SCHEMA_V4 = _sql.schema_trace_context(TYPES)

# Migration 5: depends_on, the waiting state and dispatch_job_deps (SQLite's migration 4).
SCHEMA_V5 = _sql.schema_dependencies(TYPES)

# Migration 6: serial locks (SQLite's migration 5).
SCHEMA_V6 = _sql.schema_locks(TYPES)

# Migration 7: a cron entry's overlap policy (SQLite's migration 6).
SCHEMA_V7 = _sql.schema_cron_overlap(TYPES)

# Migration 8: cluster limits, each queue's limits and token bucket (SQLite's migration 7).
SCHEMA_V8 = _sql.schema_queue_limits(TYPES)

# Migration 9: wake-ups for the jobs an UPDATE makes claimable, which the insert trigger never
# sees: a waiting job released (its dependencies completed, or ended otherwise under policy
# "run"; by the completion's statement, a failure, a cancellation, the reaper or the upkeep's
# sweep), and the next job of a serial lock once its holder finished (that job's state does
# not change: its turn comes). Row triggers whose WHEN is checked in the executor: the claims
# and completions of other jobs call no function. Each NOTIFY's run_at is the later of the
# job's and the statement's time (``updated_at``), so the jobs of one queue released together
# send equal payloads, which PostgreSQL folds into one notification per transaction. The
# lock trigger reads the table, so its function keeps the migrating session's search_path.
# The insert trigger now leaves out jobs inserted not ready (waiting, cancelled).
_NOTE = (
    "json_build_object('schema', TG_TABLE_SCHEMA, 'queue', {job}.queue, "
    "'run_at', greatest({job}.run_at, NEW.updated_at))"
)
SCHEMA_V9 = (
    f"""CREATE OR REPLACE FUNCTION dispatch_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', json_build_object(
                'schema', TG_TABLE_SCHEMA, 'queue', queue, 'run_at', min_run_at)::text)
            FROM (SELECT queue, min(run_at) AS min_run_at FROM dispatch_new_jobs
                  WHERE state IN {_sql.READY} GROUP BY queue) AS queues;
            RETURN NULL;
        END $$""",
    f"""CREATE OR REPLACE FUNCTION dispatch_jobs_released_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', {_NOTE.format(job="NEW")}::text);
            RETURN NULL;
        END $$""",
    "DROP TRIGGER IF EXISTS dispatch_jobs_released ON dispatch_jobs",
    """CREATE TRIGGER dispatch_jobs_released AFTER UPDATE OF state ON dispatch_jobs FOR EACH ROW
        WHEN (OLD.state = 'waiting' AND NEW.state = 'pending') EXECUTE FUNCTION dispatch_jobs_released_notify()""",
    f"""CREATE OR REPLACE FUNCTION dispatch_jobs_unlocked_notify() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', {_NOTE.format(job="turn")}::text)
            FROM (SELECT queue, run_at, state FROM dispatch_jobs
                  WHERE lock_key = OLD.lock_key AND state IN {_sql.ACTIVE} ORDER BY seq LIMIT 1) AS turn
            WHERE turn.state IN {_sql.READY};
            RETURN NULL;
        END $$""",
    "DROP TRIGGER IF EXISTS dispatch_jobs_unlocked ON dispatch_jobs",
    f"""CREATE TRIGGER dispatch_jobs_unlocked AFTER UPDATE OF state ON dispatch_jobs FOR EACH ROW
        WHEN (OLD.lock_key IS NOT NULL AND OLD.state IN {_sql.ACTIVE} AND NEW.state IN {_sql.FINAL})
        EXECUTE FUNCTION dispatch_jobs_unlocked_notify()""",
)

# Migration 10: wake-ups for the jobs an UPDATE hands back to the queue, now or later: a retry
# (its run_at the retry's time, so every listening process wakes then, not only the one that
# retried), a job released at stop, reaped or requeued (run_at now), by whichever process or
# method. The row is ready (pending or retrying) and was claimed or finished before (a waiting
# job released has its own trigger; a claim or completion of a ready row calls nothing).
SCHEMA_V10 = (
    "DROP TRIGGER IF EXISTS dispatch_jobs_ready ON dispatch_jobs",
    f"""CREATE TRIGGER dispatch_jobs_ready AFTER UPDATE OF state ON dispatch_jobs FOR EACH ROW
        WHEN (NEW.state IN {_sql.READY} AND OLD.state NOT IN {_sql.UNCLAIMED})
        EXECUTE FUNCTION dispatch_jobs_released_notify()""",
)

# Migration 11: a completion (running -> completed) releases the dependents of its jobs in an
# AFTER row trigger, each of its statements with a snapshot of its own, taken after the
# completion's UPDATE got the row: a dependent stored by a transaction that committed meanwhile
# is seen (the completion's own snapshot, older, may miss it: a release in the completion's
# statement left such a dependent to the upkeep's sweep). ``has_dependents`` marks the jobs it
# runs for (set before a dependent of them is stored, in a statement of its own), so completing
# any other job calls nothing. Existing dependencies are marked here.
SCHEMA_V11 = (
    "ALTER TABLE dispatch_jobs ADD COLUMN IF NOT EXISTS has_dependents BOOLEAN NOT NULL DEFAULT false",
    "UPDATE dispatch_jobs SET has_dependents = true WHERE id IN (SELECT depends_on FROM dispatch_job_deps)",
    """CREATE OR REPLACE FUNCTION dispatch_jobs_release_dependents() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
        BEGIN
            WITH consumed AS (DELETE FROM dispatch_job_deps WHERE depends_on = NEW.id RETURNING job_id)
            UPDATE dispatch_jobs AS w SET waiting_on = w.waiting_on - c.n,
                state = CASE WHEN w.waiting_on - c.n <= 0 THEN 'pending' ELSE w.state END,
                updated_at = NEW.updated_at
            FROM (SELECT job_id, count(*) AS n FROM consumed GROUP BY job_id) AS c
            WHERE w.id = c.job_id AND w.state = 'waiting';
            RETURN NULL;
        END $$""",
    "DROP TRIGGER IF EXISTS dispatch_jobs_completed ON dispatch_jobs",
    """CREATE TRIGGER dispatch_jobs_completed AFTER UPDATE OF state ON dispatch_jobs FOR EACH ROW
        WHEN (NEW.has_dependents AND OLD.state = 'running' AND NEW.state = 'completed')
        EXECUTE FUNCTION dispatch_jobs_release_dependents()""",
)

# Migration 12: every NOTIFY payload fits PostgreSQL's limit (8,000 bytes: ``pg_notify``
# refuses a longer one, failing the statement that fires the trigger, so a queue name near that
# length failed every enqueue into it). A payload that would not fit names no queue (JSON null:
# "look at every queue", which listeners already take) and keeps the schema and run_at. The
# three functions are migration 9's, each building its payload once as ``note``.
_FITS = (
    f"CASE WHEN octet_length(note) < {NOTIFY_MAX} THEN note "
    "ELSE json_build_object('schema', TG_TABLE_SCHEMA, 'queue', NULL, 'run_at', run_at)::text END"
)
SCHEMA_V12 = (
    f"""CREATE OR REPLACE FUNCTION dispatch_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', {_FITS})
            FROM (SELECT json_build_object('schema', TG_TABLE_SCHEMA, 'queue', queue, 'run_at', min(run_at))::text
                         AS note, min(run_at) AS run_at
                  FROM dispatch_new_jobs WHERE state IN {_sql.READY} GROUP BY queue) AS notes;
            RETURN NULL;
        END $$""",
    f"""CREATE OR REPLACE FUNCTION dispatch_jobs_released_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', {_FITS})
            FROM (SELECT {_NOTE.format(job="NEW")}::text AS note,
                         greatest(NEW.run_at, NEW.updated_at) AS run_at) AS notes;
            RETURN NULL;
        END $$""",
    f"""CREATE OR REPLACE FUNCTION dispatch_jobs_unlocked_notify() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', {_FITS})
            FROM (SELECT {_NOTE.format(job="turn")}::text AS note,
                         greatest(turn.run_at, NEW.updated_at) AS run_at
                  FROM (SELECT queue, run_at, state FROM dispatch_jobs
                        WHERE lock_key = OLD.lock_key AND state IN {_sql.ACTIVE} ORDER BY seq LIMIT 1) AS turn
                  WHERE turn.state IN {_sql.READY}) AS notes;
            RETURN NULL;
        END $$""",
)

# Migration 13: lock holds (LockHold; SQLite's migration 10), and their release's wake-up: a hold
# deleted (its handler returned, or its worker was reaped) notifies the lock's next job when that
# one is ready, as the unlocked trigger does for a job finishing (another claim's hold may still
# keep the lock: the listeners' claim then takes nothing, harmlessly).
SCHEMA_V13 = (
    *_sql.schema_lock_holds(TYPES),
    f"""CREATE OR REPLACE FUNCTION dispatch_lock_holds_released_notify() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', {_FITS})
            FROM (SELECT json_build_object('schema', TG_TABLE_SCHEMA, 'queue', turn.queue, 'run_at', turn.run_at)::text
                         AS note, turn.run_at AS run_at
                  FROM (SELECT queue, run_at, state FROM dispatch_jobs
                        WHERE lock_key = OLD.lock_key AND state IN {_sql.ACTIVE} ORDER BY seq LIMIT 1) AS turn
                  WHERE turn.state IN {_sql.READY}) AS notes;
            RETURN NULL;
        END $$""",
    "DROP TRIGGER IF EXISTS dispatch_lock_holds_released ON dispatch_lock_holds",
    """CREATE TRIGGER dispatch_lock_holds_released AFTER DELETE ON dispatch_lock_holds FOR EACH ROW
        EXECUTE FUNCTION dispatch_lock_holds_released_notify()""",
)

# Migration 14: a dead letter keeps its job's lock, unique key, dependencies and timeout, for its
# replay (SQLite's migration 11).
SCHEMA_V14 = _sql.schema_letter_job(TYPES)

# Migration 15: the waits' index by waiting job (SQLite's migration 12): the upkeep's sweeps probe
# each waiting job's rows (a nested loop over the whole table before: 9 s for 10k jobs waiting on
# one), as do a requeue's delete and an enqueue's second look (MISSED_WAITS).
SCHEMA_V15 = _sql.schema_dependents_index(TYPES)

# -- lifecycle -------------------------------------------------------------------------------------

VERSION_TABLE = _sql.version_table(TYPES)
MIGRATE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('threaddispatch.migrate'))"
VERSION_TABLE_EXISTS = "SELECT to_regclass('dispatch_schema_version')"
# The schema holding dispatch_jobs as the session's search_path resolves it (no row before migrating).
TABLE_SCHEMA = (
    "SELECT n.nspname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.oid = to_regclass('dispatch_jobs')"
)

# -- producers -------------------------------------------------------------------------------------

SQL = Statements("%s")
INSERT = SQL.insert_job
INSERT_UNIQUE = (
    f"{INSERT} ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state IN {_sql.ACTIVE} DO NOTHING RETURNING id"
)
COPY = f"COPY dispatch_jobs ({_sql.JOB_COLUMNS}) FROM STDIN"
# Mark a job as depended on before a dependent of it is stored (id): its completion's trigger
# then runs. A finished job needs no mark; a marked one no second.
MARK_DEPENDED_ON = (
    f"UPDATE dispatch_jobs SET has_dependents = true WHERE id = %s AND NOT has_dependents AND state NOT IN {_sql.FINAL}"
)
# Many at once (ids): every one whose row no one holds, in one statement that waits for no lock;
# then those left unmarked and unfinished (ids), each marked by MARK_DEPENDED_ON.
TRY_MARK_DEPENDED_ON = (
    "UPDATE dispatch_jobs SET has_dependents = true WHERE id = ANY(ARRAY(SELECT id FROM dispatch_jobs "
    f"WHERE id = ANY(%s) AND NOT has_dependents AND state NOT IN {_sql.FINAL} FOR NO KEY UPDATE SKIP LOCKED))"
)
UNMARKED = f"SELECT id FROM dispatch_jobs WHERE id = ANY(%s) AND NOT has_dependents AND state NOT IN {_sql.FINAL}"
# The same for jobs stored in the enqueue's own transaction (ids): rows no one else sees yet.
MARK_NEW_DEPENDED_ON = "UPDATE dispatch_jobs SET has_dependents = true WHERE id = ANY(%s)"
# The enqueue's second look at its new dependents (PostgresStore._settle_missed): wait for a
# dependency's row lock (id).
AWAIT_ROW = "SELECT 1 FROM dispatch_jobs WHERE id = %s FOR SHARE"
# First, in one statement, the rows no one holds (ids): the ids it returns need no wait (a
# completion not yet holding the row takes it after the dependents' commit, so its release sees
# them); the others (held, or gone) are each waited for with AWAIT_ROW.
TRY_ROWS = "SELECT id FROM dispatch_jobs WHERE id = ANY(%s) FOR SHARE SKIP LOCKED"
# Then take the waits of the new jobs (ids) on dependencies that finished meanwhile: the rows a
# release missed, (dependent, dependency, the dependency's state). A release that runs at the same
# time deletes the same rows: each row goes to one of the two (the row lock), never to both.
MISSED_WAITS = (
    "DELETE FROM dispatch_job_deps AS d USING dispatch_jobs AS p "
    f"WHERE d.job_id = ANY(%s) AND p.id = d.depends_on AND p.state IN {_sql.FINAL} "
    "RETURNING d.job_id, d.depends_on, p.state"
)
COUNT_QUEUES = "SELECT queue, state, count(*) FROM dispatch_jobs WHERE queue = ANY(%s) GROUP BY queue, state"

# -- workers ---------------------------------------------------------------------------------------


def _ready(holds: bool) -> str:
    """The claim's readiness test of row ``j``; ``holds``: the schema has the lock holds (migration 13)."""
    return f"j.state IN ('pending', 'retrying') AND j.run_at <= %(now)s AND {_sql.lock_free('j', holds=holds)}"


_CLAIM_ORDER = "ORDER BY j.priority DESC, j.run_at, j.seq"


def _claim_cte(pick: str) -> str:
    """The claim of the rows ``pick`` selects (and locks), as an UPDATE usable alone or inside WITH.

    ``pick`` runs once, as an InitPlan (``= ANY(ARRAY(...))``): as ``seq IN (pick)`` the planner
    may rescan it once per table row (a nested loop semi join, chosen on a table it believes
    tiny), and with SKIP LOCKED every rescan finds other rows, so a claim took past its limit.
    """
    return (
        "UPDATE dispatch_jobs SET state = 'running', worker_id = %(worker)s, attempts = attempts + 1, "
        "started_at = %(now)s, heartbeat_at = %(now)s, updated_at = %(now)s "
        f"WHERE seq = ANY(ARRAY({pick})) RETURNING seq, {_sql.JOB_COLUMNS}"
    )


# Named parameters of both claims: worker, now, queues (one name, or an array of distinct
# names), limit. One queue: an equality, so the ready index yields rows in claim order (no
# sort), also in a generic prepared plan. Several: the same index-ordered LIMIT once per
# queue (LATERAL over the array), then the top ``limit`` of those few rows. Each queue's
# first ``limit`` ready rows hold every row of the global first ``limit`` from that queue,
# so the order is the one ``queue = ANY(...) ORDER BY ... LIMIT`` gives, without reading
# and sorting the whole ready set (an external sort at 75k ready jobs). The rows a queue's
# scan locked but the top-N left out are unlocked when the statement ends.
def _claim_one(holds: bool) -> str:
    return _claim_cte(
        f"SELECT j.seq FROM dispatch_jobs AS j WHERE j.queue = %(queues)s AND {_ready(holds)} {_CLAIM_ORDER} "
        "LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
    )


def _claim_any(holds: bool) -> str:
    return _claim_cte(
        "SELECT head.seq FROM unnest(%(queues)s::text[]) AS asked(queue) CROSS JOIN LATERAL ("
        f"SELECT j.seq, j.priority, j.run_at FROM dispatch_jobs AS j WHERE j.queue = asked.queue "
        f"AND {_ready(holds)} {_CLAIM_ORDER} "
        "LIMIT %(limit)s FOR UPDATE SKIP LOCKED) AS head ORDER BY head.priority DESC, head.run_at, head.seq "
        "LIMIT %(limit)s"
    )


CLAIM_ONE = _claim_one(True)
CLAIM_ANY = _claim_any(True)

# A limited queue's bucket, its row locked until the claim's transaction ends: (queue).
QUEUE_BUCKET_LOCKED = f"{SQL.queue_bucket} FOR UPDATE"

COMPLETE = SQL.complete
# Parameters: :func:`outcome_params`.
# A completed job's waiting dependents are released by its row trigger (migration 11).
COMPLETE_MANY = (
    "UPDATE dispatch_jobs AS j SET state = 'completed', result = v.result, error = v.error, "
    "finished_at = %(now)s, updated_at = %(now)s "
    "FROM unnest(%(ids)s::text[], %(workers)s::text[], %(attempts)s::bigint[], %(results)s::text[], "
    "%(errors)s::text[]) AS v(id, worker_id, attempts, result, error) "
    "WHERE j.id = v.id AND j.state = 'running' AND j.worker_id = v.worker_id AND j.attempts = v.attempts "
    "RETURNING j.id"
)


def _complete_and_claim_sql(claim: str) -> str:
    # The UPDATEs see one snapshot and touch disjoint rows (running, ready); the LEFT JOIN keeps
    # the completed ids when nothing was claimed.
    return (
        f"WITH done AS ({COMPLETE_MANY}), claimed AS ({claim}) "
        "SELECT d.ids, c.* FROM (SELECT array_agg(id) AS ids FROM done) AS d LEFT JOIN claimed AS c ON true"
    )


COMPLETE_AND_CLAIM_ONE = _complete_and_claim_sql(CLAIM_ONE)
COMPLETE_AND_CLAIM_ANY = _complete_and_claim_sql(CLAIM_ANY)
#: The four claims (one queue, several, and each with completions) by whether the schema has the
#: lock holds: False only for a database kept below migration 13 (a store class whose MIGRATIONS stop before it).
CLAIMS: dict[bool, tuple[str, str, str, str]] = {
    True: (CLAIM_ONE, CLAIM_ANY, COMPLETE_AND_CLAIM_ONE, COMPLETE_AND_CLAIM_ANY),
    False: (
        _claim_one(False),
        _claim_any(False),
        _complete_and_claim_sql(_claim_one(False)),
        _complete_and_claim_sql(_claim_any(False)),
    ),
}
# An operator's cancel locks the job's row first, so its hold (Statements.hold_running) reads the
# state the cancel then changes: (id).
LOCK_JOB = "SELECT 1 FROM dispatch_jobs WHERE id = %s FOR UPDATE"
HEARTBEAT_HOLDS = (
    "UPDATE dispatch_lock_holds SET heartbeat_at = %s WHERE job_id = ANY(%s) AND worker_id = %s RETURNING job_id"
)

HEARTBEAT = (
    "UPDATE dispatch_jobs SET heartbeat_at = %s WHERE id = ANY(%s) AND state = 'running' "
    "AND worker_id = %s RETURNING id"
)

_REAP = """
WITH stale AS (
    SELECT seq FROM dispatch_jobs
    WHERE state = 'running' AND (heartbeat_at IS NULL OR heartbeat_at < %(older)s)
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE dispatch_jobs AS j SET
        state = CASE WHEN j.attempts >= j.max_retries + 1 THEN 'failed' ELSE 'pending' END,
        error = CASE WHEN j.attempts >= j.max_retries + 1 THEN %(lost)s ELSE j.error END,
        finished_at = CASE WHEN j.attempts >= j.max_retries + 1 THEN %(now)s ELSE j.finished_at END,
        worker_id = CASE WHEN j.attempts >= j.max_retries + 1 THEN j.worker_id ELSE NULL END,
        run_at = CASE WHEN j.attempts >= j.max_retries + 1 THEN j.run_at ELSE %(now)s END,
        updated_at = %(now)s
    FROM stale WHERE j.seq = stale.seq
    RETURNING j.id, j.name, j.queue, j.payload, j.priority, j.max_retries, j.attempts, j.state, {copy}
), letters AS (
    INSERT INTO dispatch_dead_letters ({columns})
    SELECT replace(gen_random_uuid()::text, '-', ''), id, name, queue, payload, priority, max_retries, attempts,
           %(lost)s, %(now)s, {copy}
    FROM moved WHERE state = 'failed'
)
SELECT id, state FROM moved
"""
#: The reap, by whether the schema has the dead letters' job fields (migration 14).
REAP = tuple(
    _REAP.format(columns=_sql.letter_columns(fields), copy=_sql.letter_copy(fields)) for fields in (False, True)
)

_FAIL = """
WITH failed AS (
    UPDATE dispatch_jobs SET state = 'failed', error = %(error)s, finished_at = %(now)s, updated_at = %(now)s
    WHERE id = %(id)s {fence}
    RETURNING id, name, queue, payload, priority, max_retries, attempts, {copy}
)
INSERT INTO dispatch_dead_letters ({columns})
SELECT %(letter)s, id, name, queue, payload, priority, max_retries, attempts, %(error)s, %(now)s, {copy}
FROM failed
RETURNING {columns}
"""
# Only while the job is still the claim (worker, attempts), either of which may be NULL: any.
CLAIM_FENCE = (
    "AND state = 'running' AND (%(worker)s::text IS NULL OR worker_id = %(worker)s) "
    "AND (%(attempts)s::bigint IS NULL OR attempts = %(attempts)s)"
)
#: The fail of any job and of a claim, by whether the schema has the dead letters' job fields (migration 14).
FAIL_ANY, FAIL_CLAIM = (
    tuple(
        _FAIL.format(fence=fence, columns=_sql.letter_columns(fields), copy=_sql.letter_copy(fields))
        for fields in (False, True)
    )
    for fence in ("", CLAIM_FENCE)
)

RELEASE = (
    "UPDATE dispatch_jobs SET state = 'pending', worker_id = NULL, run_at = %s, updated_at = %s, "
    "attempts = greatest(0, attempts - %s) WHERE id = ANY(%s) AND state = 'running' AND worker_id = %s"
)

# -- management ------------------------------------------------------------------------------------

JOB_EXISTS = "SELECT 1 FROM dispatch_jobs WHERE id = %s"
LOCK_FOR_REQUEUE = "SELECT state, unique_key FROM dispatch_jobs WHERE id = %s FOR UPDATE"
PURGE_FINISHED = (
    "DELETE FROM dispatch_jobs WHERE seq IN (SELECT seq FROM dispatch_jobs "
    f"WHERE state IN {_sql.FINAL} AND finished_at < %s LIMIT {PURGE_CHUNK} FOR UPDATE SKIP LOCKED)"
)
PAUSED_QUEUES = "SELECT queue FROM dispatch_queues WHERE paused"


def cancel_sql(*, fenced: bool, include_running: bool) -> str:
    """``Store.cancel``'s conditional update. Named parameters: id, error, now, worker, attempts."""
    states = _sql.ACTIVE if include_running else _sql.UNCLAIMED
    condition = CLAIM_FENCE if fenced else f"AND state IN {states}"
    return (
        "UPDATE dispatch_jobs SET state = 'cancelled', waiting_on = 0, error = coalesce(%(error)s, error), "
        f"finished_at = %(now)s, updated_at = %(now)s WHERE id = %(id)s {condition} RETURNING id"
    )


# -- cron and leases -------------------------------------------------------------------------------

ACQUIRE_LEASE = f"{SQL.acquire_lease} RETURNING holder"
UPSERT_CRON = f"{SQL.upsert_cron} RETURNING {_sql.CRON_COLUMNS}"


def set_cron_enabled_sql(enabled: bool) -> str:
    """``Store.set_cron_enabled`` as one statement returning the entry. Named parameters: now, name."""
    if enabled:
        change = "last_tick = %(now)s WHERE name = %(name)s AND last_tick = 'Infinity'"
    else:
        change = "last_tick = 'Infinity' WHERE name = %(name)s AND last_tick IS DISTINCT FROM 'Infinity'"
    # The second SELECT sees the row as it was before the update: used only when nothing changed.
    return (
        f"WITH changed AS (UPDATE dispatch_crons SET updated_at = %(now)s, {change} RETURNING {_sql.CRON_COLUMNS}) "
        f"SELECT {_sql.CRON_COLUMNS} FROM changed UNION ALL SELECT {_sql.CRON_COLUMNS} FROM dispatch_crons "
        "WHERE name = %(name)s AND NOT EXISTS (SELECT 1 FROM changed)"
    )


# -- wake-ups --------------------------------------------------------------------------------------

# NOTIFY (schema, run_at, queues): one notification per queue, as the insert trigger sends.
# A resumed queue's wake-up; a payload that would not fit names no queue, as migration 12's triggers.
WAKE = (
    f"SELECT pg_notify('{CHANNEL}', CASE WHEN octet_length(note) < {NOTIFY_MAX} THEN note "
    "ELSE json_build_object('schema', s, 'queue', NULL, 'run_at', r)::text END) "
    "FROM (SELECT s, r, json_build_object('schema', s, 'queue', q, 'run_at', r)::text AS note "
    "FROM (SELECT %s::text AS s, %s::float8 AS r) AS p, unnest(%s::text[]) AS q) AS notes"
)

# -- parameters and rows ---------------------------------------------------------------------------


def pg_job_params(job: JobRecord) -> tuple[Any, ...]:
    """:func:`~threaddispatch.stores._sql.job_params`; this store also takes a ``state`` given as its str value."""
    if type(job.state) is not JobState:
        job = dataclasses.replace(job, state=JobState(job.state))
    return job_params(job)


def claimed(rows: Sequence[Sequence[Any]]) -> list[JobRecord]:
    """Claimed rows ``(seq, *job columns)`` as records in claim order (RETURNING has no order)."""
    ordered = sorted(rows, key=lambda row: (-row[6], row[10], row[0]))  # priority, run_at, seq
    return [job_from_row(row[1:]) for row in ordered]


def outcome_params(outcomes: Sequence[Completion], now: float) -> dict[str, Any]:
    """The named parameters of :data:`COMPLETE_MANY`: one array per field of the outcomes."""
    return {
        "now": now,
        "ids": [o[0] for o in outcomes],
        "workers": [o[1] for o in outcomes],
        "attempts": [o[2] for o in outcomes],
        "results": [o[3] for o in outcomes],
        "errors": [o[4] for o in outcomes],
    }
