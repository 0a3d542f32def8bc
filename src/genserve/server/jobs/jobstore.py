"""SQLite job store (WAL): the source of truth for jobs (the default backend of
``store.interface.Store``; PostgreSQL's is ``store.postgres``).

Calls are short and synchronous; the asyncio driver makes them inline, which keeps every state
change ordered with the engine's. A job row is committed before the API acknowledges it.
"""
from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ...config.auth import DEFAULT_TENANT
from ...engine.types import ErrorCode
from ..security.files import narrow_db, private_db
from ..status import JobStatus
from .store.interface import Page, QueueLimitReached  # noqa: F401 — Page: importers of this module
from .store.migrations import upgrade_sqlite

STAGES = (
    "received", "queued", "dispatched", "load_start", "load_end",
    "inference_start", "inference_end", "output_written", "finished",
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    client_id TEXT,  -- unique per tenant (index jobs_client)
    model TEXT NOT NULL,
    params TEXT NOT NULL,
    priority TEXT NOT NULL,
    status TEXT NOT NULL,
    error_code TEXT,
    error_message TEXT,
    results TEXT NOT NULL DEFAULT '[]',
    batch_id TEXT,
    batch_size INTEGER,
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    {", ".join(f"t_{s} REAL" for s in STAGES)}
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE INDEX IF NOT EXISTS jobs_batch ON jobs(batch_id);
-- One row per time a job was handed to a worker: who ran it, how it ended (code NULL: success).
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT,
    model TEXT,
    batch_id TEXT,
    batch_size INTEGER,
    code TEXT,
    message TEXT,
    started REAL NOT NULL,
    ended REAL,
    PRIMARY KEY (job_id, attempt)
);
-- Webhook deliveries outlive the process: pending ones are picked up again after a restart.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    event TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT,
    created REAL NOT NULL,
    delivered REAL
);
CREATE INDEX IF NOT EXISTS webhook_pending ON webhook_deliveries(status, next_at);
"""

# Columns added after the first release: added on open when missing, so old databases keep working.
_ADDED_COLUMNS = {"jobs": {
    "served_model": "TEXT",  # the model that produced the output (a fallback, when it differs)
    "device_seconds": "REAL",  # this job's share of its batch's device time (set when the batch ends)
    "cost_usd": "REAL",  # device_seconds × the device type's price
    "device_type": "TEXT",  # price-table key of the worker that ran it (H100, cpu, …)
    "load_tier": "TEXT",  # where the model load this job waited for came from (disk, page_cache, host)
    "step_batching": "TEXT",  # step mode: JSON {joined_step, shared_with} (NULL: request-level batch)
    "t_results_deleted": "REAL",  # when retention (or the API) deleted the job's result files
    "tenant": f"TEXT NOT NULL DEFAULT '{DEFAULT_TENANT}'",  # whose job (jobs from before tenants: default)
    "adopted": "INTEGER",  # 1: finished with an output found after its report was lost (stats: downtime)
    # JSON {cache, steps_computed, steps_reused, prompt_cache, compiled}: what ran (docs/performance.md)
    "execution": "TEXT",
    "compile_s": "REAL",  # of the load this job waited for: torch.compile and its warm-up (inside the load)
    "lora_load_s": "REAL",  # seconds its worker spent loading its LoRA adapters (within inference)
}}
_JSON_COLUMNS = {"results", "step_batching", "execution"}


class JobStore:
    backend = "sqlite"
    IntegrityError = sqlite3.IntegrityError  # a duplicate job id, or client id within a tenant

    def __init__(self, path: Path) -> None:
        private_db(path)  # 0600 (and so its -wal / -shm), in a 0700 directory when created here
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        # Bytes that are not UTF-8 (written by something else, or an older bug) read as U+FFFD
        # instead of failing the read: no stored row may make a route answer 500.
        self.db.text_factory = lambda b: b.decode("utf-8", "replace")
        self.db.execute("PRAGMA journal_mode=WAL")
        narrow_db(path)  # a -wal / -shm an older version left 0644
        # NORMAL in WAL mode: a committed job survives a crash of the process (kill -9); only a
        # power loss could roll back the last transactions.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        _drop_global_client_id_unique(self.db)
        self.db.executescript(_SCHEMA)
        for table, cols in _ADDED_COLUMNS.items():
            have = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for col, decl in cols.items():
                if col not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
        self.db.execute("CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(t_finished)")
        self.db.execute("CREATE UNIQUE INDEX IF NOT EXISTS jobs_client ON jobs(tenant, client_id)")
        self.db.execute("CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs(tenant, status)")
        # Listing pages (page()): a tenant's jobs in submission order; the rowid tie-break is in every index.
        self.db.execute("CREATE INDEX IF NOT EXISTS jobs_tenant_received ON jobs(tenant, t_received)")
        upgrade_sqlite(self.db)  # versions after the baseline above (store/migrations.py)

    def close(self) -> None:
        self.db.close()

    def insert(self, job_id: str, client_id: str | None, params: dict[str, Any], now: float,
               tenant: str = DEFAULT_TENANT, *, max_queued: int | None = None) -> None:
        """``max_queued``: refuse (``QueueLimitReached``) when the tenant already has that many
        jobs queued, counted and inserted in one write transaction."""
        sql = ("INSERT INTO jobs (id, client_id, model, params, priority, status, t_received, t_queued, tenant)"
               " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
        args = (job_id, client_id, params["model"], json.dumps(params), params["priority"], JobStatus.QUEUED, now,
                now, tenant)
        if max_queued is None:
            self.db.execute(sql, args)
            return
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            queued = self.queued_count(tenant)
            if queued >= max_queued:
                raise QueueLimitReached(tenant, queued, max_queued)
            self.db.execute(sql, args)

    def get(self, job_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _decode(row) if row else None

    def get_by_client_id(self, client_id: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any] | None:
        """Client ids are unique per tenant: another tenant's id is another job."""
        row = self.db.execute("SELECT * FROM jobs WHERE tenant = ? AND client_id = ?", (tenant, client_id)).fetchone()
        return _decode(row) if row else None

    def queued_count(self, tenant: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE tenant = ? AND status = ?",
                               (tenant, JobStatus.QUEUED)).fetchone()[0]

    def unfinished(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY t_queued, id", (JobStatus.QUEUED, JobStatus.RUNNING)
        ).fetchall()
        return [_decode(r) for r in rows]

    def recent(self, limit: int = 50, tenant: str | None = None, status: str | None = None,
               model: str | None = None) -> list[dict[str, Any]]:
        """The newest jobs first: of ``tenant`` (None: every tenant's), optionally only those in
        ``status`` / for ``model``."""
        return self.page(limit, tenant=tenant, status=status, models=None if model is None else (model,)).items

    def page(self, limit: int, *, after: str | None = None, order: str = "desc", tenant: str | None = None,
             status: str | None = None, models: tuple[str, ...] | None = None) -> "Page":
        """One page of jobs in submission order (``desc``: newest first), resuming strictly after the
        job ``after`` (a cursor: the last id of the previous page). The position is (t_received,
        rowid): unique and fixed when a job is inserted (rowids follow insertion; the store never
        VACUUMs, which could renumber them), so a page never repeats or skips a job
        when others arrive or change status meanwhile (new ones land before the first page in
        ``desc`` order, after the last in ``asc``). Filters: ``tenant`` (None: every tenant's),
        ``status``, ``models`` (any of them). Raises KeyError when there is no job ``after``."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be asc or desc, got {order!r}")
        conds = [(c, v) for c, v in (("tenant = ?", tenant), ("status = ?", status)) if v is not None]
        if models is not None:
            conds.append((f"model IN ({','.join('?' * len(models))})", models))
        if after is not None:
            pos = self.db.execute("SELECT t_received, rowid FROM jobs WHERE id = ?", (after,)).fetchone()
            if pos is None:
                raise KeyError(after)
            conds.append((f"(t_received, rowid) {'<' if order == 'desc' else '>'} (?, ?)", tuple(pos)))
        where = " AND ".join(c for c, _ in conds)
        args = [x for _, v in conds for x in (v if isinstance(v, tuple) else (v,))]
        direction = "DESC" if order == "desc" else "ASC"
        rows = self.db.execute(f"SELECT * FROM jobs {'WHERE ' + where if where else ''}"
                               f" ORDER BY t_received {direction}, rowid {direction} LIMIT ?",
                               (*args, limit + 1)).fetchall()
        return Page([_decode(r) for r in rows[:limit]], len(rows) > limit)

    def usage(self, since: float, tenant: str | None = None) -> list[dict[str, Any]]:
        """Jobs received since ``since`` by tenant, model and UTC day: counts by outcome, and the
        device-seconds and cost charged to them."""
        where, args = "t_received >= ?", [since]
        if tenant is not None:
            where, args = where + " AND tenant = ?", [since, tenant]
        rows = self.db.execute(
            "SELECT tenant, model, date(t_received, 'unixepoch') AS day, COUNT(*) AS jobs,"
            " SUM(status = 'succeeded') AS succeeded, SUM(status = 'failed') AS failed,"
            " SUM(status = 'canceled') AS canceled, COALESCE(SUM(device_seconds), 0.0) AS device_seconds,"
            " COALESCE(SUM(cost_usd), 0.0) AS cost_usd"
            f" FROM jobs WHERE {where} GROUP BY tenant, model, day ORDER BY tenant, day, model", args).fetchall()
        return [dict(r) for r in rows]

    def active_since(self, since: float, limit: int = 100_000) -> list[dict[str, Any]]:
        """Jobs that finished at or after ``since`` or have not finished: what a stats window needs."""
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE t_finished IS NULL OR t_finished >= ? ORDER BY t_received DESC LIMIT ?",
            (since, limit)).fetchall()
        return [_decode(r) for r in rows]

    def update(self, job_ids: list[str] | tuple[str, ...], **fields: Any) -> None:
        if not job_ids:
            return
        cols = []
        vals: list[Any] = []
        for k, v in fields.items():
            cols.append(f"{k} = ?")
            vals.append(json.dumps(v) if k in _JSON_COLUMNS and v is not None else v)
        marks = ",".join("?" * len(job_ids))
        self.db.execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id IN ({marks})", (*vals, *job_ids))

    def requeue_unfinished(self, now: float, *, keep: Collection[str] = (),
                           only: Collection[str] | None = None) -> list[dict[str, Any]]:
        """On start: jobs that were running when the server stopped go back to queued: their worker
        died with the server, which counts as a failed attempt. (An output written just before the
        crash is found by the caller, which then does not run the job again.) ``keep``: jobs left
        running (a cluster worker that survived the server still runs them); ``only``: just these."""
        where, args = "", []
        if keep:
            where += f" AND {{col}} NOT IN ({','.join('?' * len(keep))})"
            args += list(keep)
        if only is not None:
            where += f" AND {{col}} IN ({','.join('?' * len(only))})"
            args += list(only)
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "UPDATE attempts SET code = ?, message = 'the server stopped during the attempt',"
                " ended = ? WHERE ended IS NULL" + where.format(col="job_id"), (ErrorCode.WORKER_CRASHED, now, *args))
            self.db.execute(
                "UPDATE jobs SET status = ?, batch_id = NULL, batch_size = NULL, worker = NULL,"
                " t_dispatched = NULL, t_load_start = NULL, t_load_end = NULL, load_tier = NULL, t_inference_start = NULL,"
                " t_inference_end = NULL, attempts = attempts + 1 WHERE status = ?" + where.format(col="id"),
                (JobStatus.QUEUED, JobStatus.RUNNING, *args))
        return self.unfinished()

    # ---- attempts ----------------------------------------------------------------------------------

    def start_attempts(self, job_ids: tuple[str, ...], worker: str, model: str, batch_id: str, now: float) -> None:
        self.db.executemany(
            "INSERT INTO attempts (job_id, attempt, worker, model, batch_id, batch_size, started)"
            " VALUES (?, (SELECT COALESCE(MAX(attempt), 0) + 1 FROM attempts WHERE job_id = ?), ?, ?, ?, ?, ?)",
            [(j, j, worker, model, batch_id, len(job_ids), now) for j in job_ids])

    def end_attempt(self, job_id: str, code: str | None, message: str | None, now: float) -> None:
        """Close the job's open attempt (if any): ``code`` None is a success."""
        self.db.execute("UPDATE attempts SET code = ?, message = ?, ended = ? WHERE job_id = ? AND ended IS NULL",
                        (code, message, now, job_id))

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY attempt", (job_id,)).fetchall()
        return [dict(r) for r in rows]

    # ---- retention ---------------------------------------------------------------------------------

    def finished_with_results(self, before: float | None, limit: int) -> list[dict[str, Any]]:
        """Finished jobs that still have result files, oldest first (finished before ``before``,
        when given): (id, results, t_finished)."""
        cond = "" if before is None else " AND t_finished < ?"
        rows = self.db.execute(
            f"SELECT id, results, t_finished FROM jobs WHERE t_finished IS NOT NULL AND results != '[]'{cond}"
            " ORDER BY t_finished LIMIT ?", ((before,) if before is not None else ()) + (limit,)).fetchall()
        return [{"id": r["id"], "results": json.loads(r["results"]), "t_finished": r["t_finished"]} for r in rows]

    def finished_before(self, before: float, limit: int) -> list[dict[str, Any]]:
        """Finished jobs older than ``before``, oldest first: (id, results)."""
        rows = self.db.execute("SELECT id, results FROM jobs WHERE t_finished < ? ORDER BY t_finished LIMIT ?",
                               (before, limit)).fetchall()
        return [{"id": r["id"], "results": json.loads(r["results"])} for r in rows]

    def results_deleted(self, job_id: str, now: float) -> None:
        self.db.execute("UPDATE jobs SET results = '[]', t_results_deleted = ? WHERE id = ?", (now, job_id))

    def delete_job(self, job_id: str) -> bool:
        """Remove a job's record, its attempts and its delivered or failed webhook deliveries
        (pending ones still go out). Returns whether there was one."""
        with self.db:
            self.db.execute("BEGIN")
            n = self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount
            self.db.execute("DELETE FROM attempts WHERE job_id = ?", (job_id,))
            self.db.execute("DELETE FROM webhook_deliveries WHERE job_id = ? AND status != 'pending'", (job_id,))
        return n > 0

    def stored_result_bytes(self) -> int:
        """The bytes of every result the records point to, thumbnails included (one scan: used once, at start)."""
        row = self.db.execute("SELECT COALESCE(SUM(json_extract(r.value, '$.bytes')"
                              " + COALESCE(json_extract(r.value, '$.thumbnail.bytes'), 0)), 0) FROM jobs,"
                              " json_each(jobs.results) AS r WHERE jobs.results != '[]'").fetchone()
        return int(row[0])

    # ---- webhook deliveries ------------------------------------------------------------------------

    def add_delivery(self, delivery_id: str, job_id: str, url: str, event: str, payload: str, now: float) -> None:
        self.db.execute(
            "INSERT INTO webhook_deliveries (id, job_id, url, event, payload, next_at, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", (delivery_id, job_id, url, event, payload, now, now))

    def pending_deliveries(self, limit: int = 64) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM webhook_deliveries WHERE status = 'pending' ORDER BY next_at, created"
                               " LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    def update_delivery(self, delivery_id: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE webhook_deliveries SET {cols} WHERE id = ?", (*fields.values(), delivery_id))

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT id, event, status, attempts, last_error, created, delivered"
                               " FROM webhook_deliveries WHERE job_id = ? ORDER BY created", (job_id,)).fetchall()
        return [dict(r) for r in rows]


def _drop_global_client_id_unique(db: sqlite3.Connection) -> None:
    """Databases from before tenants declared ``client_id UNIQUE`` across all jobs; client ids are
    now unique per tenant. SQLite cannot drop a column constraint, so the table is rebuilt once
    (same columns, same rows) inside one transaction."""
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()
    if row is None or "client_id TEXT UNIQUE" not in row[0]:
        return
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ALTER TABLE jobs RENAME TO jobs_old")
        db.execute(row[0].replace("client_id TEXT UNIQUE", "client_id TEXT"))  # the old CREATE TABLE jobs
        db.execute("INSERT INTO jobs SELECT * FROM jobs_old")
        db.execute("DROP TABLE jobs_old")


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    """A stored job as readers see it: always valid Unicode (older versions stored prompts with
    lone surrogates, which cannot be encoded as JSON or UTF-8 again: they read as U+FFFD), and
    unreadable JSON as empty rather than an exception. Readers must not assume params written by
    older versions have every field of today's."""
    d = dict(row)  # columns are valid text (see text_factory); only JSON can spell a lone surrogate
    params = _loads(d["params"], {})
    d["params"] = params if isinstance(params, dict) else {}
    results = _loads(d["results"], [])
    d["results"] = [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []
    for col in ("step_batching", "execution"):
        if d.get(col) is not None:
            value = _loads(d[col], None)
            d[col] = value if isinstance(value, dict) else None
    d["cancel_requested"] = bool(d["cancel_requested"])
    return d


def _loads(text: Any, default: Any) -> Any:
    try:
        value = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return default
    return _clean(value) if "\\ud" in text or "\\uD" in text else value  # escapes of U+D800..U+DFFF


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(v: Any) -> Any:
    """``v`` with every lone surrogate in its strings replaced by U+FFFD."""
    if isinstance(v, str):
        return _SURROGATE.sub("\ufffd", v)
    if isinstance(v, list):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {_clean(k): _clean(x) for k, x in v.items()}
    return v
