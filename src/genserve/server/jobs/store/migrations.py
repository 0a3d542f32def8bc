"""Versioned schema migrations for both store backends.

Each backend has an ordered list of migrations; a database records the versions applied in
``schema_migrations`` and ``upgrade`` applies the missing ones, each in its own transaction, in
order. ``genserve serve`` upgrades at start; ``genserve db upgrade`` does it on its own (before a
rolling deploy: run it once, then restart gateways and engines). A migration is never edited once
released: a change is a new version.

SQLite's version 1 is the schema ``jobstore.JobStore`` has always created on open (``CREATE ... IF
NOT EXISTS`` plus the columns it adds to older files); it is recorded, not re-run, so databases from
before versioning upgrade in place. PostgreSQL's versions create everything from scratch.

On PostgreSQL several processes may start at once: ``upgrade`` takes a transaction-scoped advisory
lock first, so exactly one applies each version and the others then find it applied.
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any



@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]  # empty: a baseline, recorded only


_TRACK_SQLITE = "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT, applied REAL)"
_TRACK_PG = "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT, applied DOUBLE PRECISION)"
MIGRATE_LOCK = 0x67656E_0001  # pg_advisory_xact_lock key: one migrator at a time

SQLITE: tuple[Migration, ...] = (
    Migration(1, "jobs, attempts, webhook deliveries (the schema before versioning)", ()),
)

# Spelled out, not derived from jobstore.STAGES: a released migration never changes.
_T = ", ".join(f"t_{s} DOUBLE PRECISION" for s in (
    "received", "queued", "dispatched", "load_start", "load_end", "inference_start", "inference_end",
    "output_written", "finished"))
POSTGRES: tuple[Migration, ...] = (
    Migration(1, "jobs, attempts, webhook deliveries, API keys", (
        # seq: the listing's tie-break, fixed at insert (SQLite's rowid)
        f"""CREATE TABLE jobs (
            seq BIGSERIAL UNIQUE, id TEXT PRIMARY KEY, client_id TEXT, model TEXT NOT NULL, params TEXT NOT NULL,
            priority TEXT NOT NULL, status TEXT NOT NULL, error_code TEXT, error_message TEXT,
            results TEXT NOT NULL DEFAULT '[]', batch_id TEXT, batch_size INTEGER, worker TEXT,
            attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0, {_T},
            served_model TEXT, device_seconds DOUBLE PRECISION, cost_usd DOUBLE PRECISION, device_type TEXT,
            load_tier TEXT, step_batching TEXT, t_results_deleted DOUBLE PRECISION,
            tenant TEXT NOT NULL DEFAULT 'default')""",
        "CREATE INDEX jobs_status ON jobs(status)",
        "CREATE INDEX jobs_batch ON jobs(batch_id)",
        "CREATE INDEX jobs_finished ON jobs(t_finished)",
        "CREATE UNIQUE INDEX jobs_client ON jobs(tenant, client_id)",
        "CREATE INDEX jobs_tenant ON jobs(tenant, status)",
        "CREATE INDEX jobs_tenant_received ON jobs(tenant, t_received, seq)",
        "CREATE INDEX jobs_received ON jobs(t_received, seq)",
        """CREATE TABLE attempts (
            job_id TEXT NOT NULL, attempt INTEGER NOT NULL, worker TEXT, model TEXT, batch_id TEXT,
            batch_size INTEGER, code TEXT, message TEXT, started DOUBLE PRECISION NOT NULL, ended DOUBLE PRECISION,
            PRIMARY KEY (job_id, attempt))""",
        """CREATE TABLE webhook_deliveries (
            id TEXT PRIMARY KEY, job_id TEXT NOT NULL, url TEXT NOT NULL, event TEXT NOT NULL, payload TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
            next_at DOUBLE PRECISION NOT NULL, last_error TEXT, created DOUBLE PRECISION NOT NULL,
            delivered DOUBLE PRECISION)""",
        "CREATE INDEX webhook_pending ON webhook_deliveries(status, next_at)",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, scope TEXT NOT NULL, name TEXT,
            created DOUBLE PRECISION NOT NULL, revoked DOUBLE PRECISION)""",
    )),
    Migration(2, "a new job wakes the leading engine and every gateway (LISTEN/NOTIFY)", (
        # Sent when the inserting transaction commits, so a listener never hears of a job it cannot
        # read yet. The "queued" event is what gateways' SSE streams show first; everything after it
        # is published by the leading engine (server/jobs/store/bus.py).
        """CREATE FUNCTION genserve_job_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('genserve_jobs', NEW.id);
            PERFORM pg_notify('genserve_events', json_build_object(
                'kind', 'queued', 'job_id', NEW.id, 'now', NEW.t_received,
                'data', json_build_object('model', NEW.model, 'priority', NEW.priority, 'tenant', NEW.tenant))::text);
            RETURN NULL;
        END $$""",
        "CREATE TRIGGER jobs_inserted AFTER INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION genserve_job_inserted()",
    )),
    Migration(3, "what ran (execution, compile_s) and outputs adopted after a restart (adopted)", (
        "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS adopted INTEGER",
        "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS execution TEXT",
        "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS compile_s DOUBLE PRECISION",
    )),
    Migration(4, "LoRA adapters: the registry (server/jobs/loras.py) and each job's adapter load time", (
        """CREATE TABLE IF NOT EXISTS loras (
            owner TEXT NOT NULL, name TEXT NOT NULL, model TEXT NOT NULL, id TEXT NOT NULL, bytes BIGINT NOT NULL,
            rank INTEGER NOT NULL, targets TEXT NOT NULL, layers INTEGER NOT NULL, dtype TEXT NOT NULL,
            layout TEXT NOT NULL, source TEXT, created DOUBLE PRECISION NOT NULL, PRIMARY KEY (owner, name))""",
        "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS lora_load_s DOUBLE PRECISION",
    )),
)

LATEST = {"sqlite": SQLITE[-1].version, "postgres": POSTGRES[-1].version}


def upgrade_sqlite(db: sqlite3.Connection) -> list[int]:
    """Apply the missing SQLite migrations (``db`` in autocommit mode); the versions applied now."""
    db.execute(_TRACK_SQLITE)
    have = {r[0] for r in db.execute("SELECT version FROM schema_migrations")}
    done = []
    for m in SQLITE:
        if m.version in have:
            continue
        with db:
            db.execute("BEGIN IMMEDIATE")
            for sql in m.statements:
                db.execute(sql)
            db.execute("INSERT OR IGNORE INTO schema_migrations VALUES (?, ?, ?)", (m.version, m.name, time.time()))
        done.append(m.version)
    return done


def upgrade_postgres(conn: Any) -> list[int]:
    """Apply the missing PostgreSQL migrations over the psycopg connection ``conn`` (autocommit);
    the versions applied now (none when another process got there first)."""
    done = []
    for m in POSTGRES:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            conn.execute(_TRACK_PG)
            if conn.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (m.version,)).fetchone():
                continue
            for sql in m.statements:
                conn.execute(sql)
            conn.execute("INSERT INTO schema_migrations VALUES (%s, %s, %s)", (m.version, m.name, time.time()))
        done.append(m.version)
    return done


def applied_postgres(conn: Any) -> list[int]:
    if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
        return []
    return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def applied_sqlite(db: sqlite3.Connection) -> list[int]:
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_migrations'").fetchone() is None:
        return []
    return [r[0] for r in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
