"""SQLite job store (WAL): the source of truth for jobs.

Calls are short and synchronous; the asyncio driver makes them inline, which keeps every state
change ordered with the engine's. A job row is committed before the API acknowledges it.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "canceled")
STATUSES = ("queued", "running") + TERMINAL
STAGES = (
    "received", "queued", "dispatched", "load_start", "load_end",
    "inference_start", "inference_end", "output_written", "finished",
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    client_id TEXT UNIQUE,
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
"""

# Columns added after the first release: ensured on open, so databases created earlier keep working.
_ADDED_COLUMNS = {
    "device_seconds": "REAL",  # this job's share of its batch's device time (set when the batch ends)
    "cost_usd": "REAL",  # device_seconds × the device type's price
    "device_type": "TEXT",  # price-table key of the worker that ran it (H100, cpu, …)
    "load_tier": "TEXT",  # where the model load this job waited for came from (disk, page_cache, host)
}


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed job survives a crash of the process (kill -9); only a
        # power loss could roll back the last transactions.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(_SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Databases made by an older genserve get the columns added since (all nullable)."""
        have = {r["name"] for r in self.db.execute("PRAGMA table_info(jobs)")}
        for name, decl in _ADDED_COLUMNS.items():
            if name not in have:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
        self.db.execute("CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(t_finished)")

    def close(self) -> None:
        self.db.close()

    def insert(self, job_id: str, client_id: str | None, params: dict[str, Any], now: float) -> None:
        self.db.execute(
            "INSERT INTO jobs (id, client_id, model, params, priority, status, t_received, t_queued)"
            " VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
            (job_id, client_id, params["model"], json.dumps(params), params["priority"], now, now),
        )

    def get(self, job_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _decode(row) if row else None

    def get_by_client_id(self, client_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM jobs WHERE client_id = ?", (client_id,)).fetchone()
        return _decode(row) if row else None

    def unfinished(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY t_queued, id"
        ).fetchall()
        return [_decode(r) for r in rows]

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM jobs ORDER BY t_received DESC LIMIT ?", (limit,)).fetchall()
        return [_decode(r) for r in rows]

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
            vals.append(json.dumps(v) if k == "results" else v)
        marks = ",".join("?" * len(job_ids))
        self.db.execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id IN ({marks})", (*vals, *job_ids))

    def requeue_unfinished(self) -> list[dict[str, Any]]:
        """On start: jobs that were running when the server stopped go back to queued (their
        worker is gone; nothing they produced was recorded, so running them again is safe)."""
        self.db.execute(
            "UPDATE jobs SET status = 'queued', batch_id = NULL, batch_size = NULL, worker = NULL,"
            " t_dispatched = NULL, t_load_start = NULL, t_load_end = NULL, load_tier = NULL, t_inference_start = NULL,"
            " t_inference_end = NULL, attempts = attempts + 1 WHERE status = 'running'"
        )
        return self.unfinished()


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["params"] = json.loads(d["params"])
    d["results"] = json.loads(d["results"])
    d["cancel_requested"] = bool(d["cancel_requested"])
    return d
