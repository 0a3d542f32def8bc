"""PostgreSQL job store: the ``Store`` interface over psycopg 3 and a connection pool, for several
processes sharing one database (gateways and engines, docs/ha.md).

Each call takes a pooled connection for one statement or one transaction and returns it; nothing
holds a transaction open across an ``await``. Rows read as the SQLite store's do (same keys, JSON
decoded by ``jobstore._decode``); the listing's tie-break is the ``seq`` column (SQLite's rowid),
dropped from the records. Where the two differ in SQL (dates, JSON arrays, ``FILTER``), the
difference is spelled here, never in callers.

``insert(..., max_queued=)`` is exact across gateways: the tenant's count and the insert run in one
transaction that holds a transaction-scoped advisory lock on the tenant, so two gateways cannot both
see room for the last slot.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from ....config.auth import DEFAULT_TENANT
from ....engine.types import ErrorCode
from ...status import JobStatus
from ..jobstore import _JSON_COLUMNS, Page, _decode
from .interface import QueueLimitReached
from .migrations import upgrade_postgres

_COLUMNS = {  # columns ``update`` may set (names go into SQL text: only these)
    "status", "error_code", "error_message", "results", "batch_id", "batch_size", "worker", "attempts",
    "cancel_requested", "served_model", "device_seconds", "cost_usd", "device_type", "load_tier", "step_batching",
    "t_results_deleted", "t_received", "t_queued", "t_dispatched", "t_load_start", "t_load_end",
    "t_inference_start", "t_inference_end", "t_output_written", "t_finished", "adopted", "execution", "compile_s",
    "lora_load_s",
}
_DELIVERY_COLUMNS = {"status", "attempts", "next_at", "last_error", "delivered"}


def open_pool(dsn: str, size: int, name: str = "genserve") -> ConnectionPool:
    pool = ConnectionPool(dsn, min_size=1, max_size=size, name=name, open=False,
                          kwargs={"autocommit": True, "row_factory": dict_row})
    pool.open(wait=True, timeout=30)
    return pool


def _job(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    row.pop("seq", None)
    return _decode(row)  # type: ignore[arg-type]


class PgJobStore:
    backend = "postgres"
    IntegrityError = psycopg.errors.UniqueViolation

    def __init__(self, dsn: str, pool_size: int = 8, *, migrate: bool = True) -> None:
        self.dsn = dsn
        self.pool = open_pool(dsn, pool_size)
        if migrate:
            with self.pool.connection() as c:
                upgrade_postgres(c)

    def close(self) -> None:
        self.pool.close()

    def _all(self, sql: str, args: Any = ()) -> list[dict[str, Any]]:
        with self.pool.connection() as c:
            return c.execute(sql, args).fetchall()

    def _one(self, sql: str, args: Any = ()) -> dict[str, Any] | None:
        with self.pool.connection() as c:
            return c.execute(sql, args).fetchone()

    def _run(self, sql: str, args: Any = ()) -> int:
        with self.pool.connection() as c:
            return c.execute(sql, args).rowcount

    def notify(self, channel: str, payload: str) -> None:
        """NOTIFY ``channel`` (bus.py): heard by every process LISTENing on it, in commit order."""
        self._run("SELECT pg_notify(%s, %s)", (channel, payload))

    def request_cancel(self, job_id: str, channel: str) -> None:
        """Record a cancel request and wake the leading engine, in one transaction (a gateway's cancel)."""
        with self.pool.connection() as c, c.transaction():
            c.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = %s", (job_id,))
            c.execute("SELECT pg_notify(%s, %s)", (channel, job_id))

    def ping(self) -> bool:
        """Can this process use the database now? (a gateway's readiness)"""
        try:
            with self.pool.connection(timeout=2.0) as c:
                c.execute("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 — any failure means not ready
            return False

    def queued_for_model(self, model: str) -> int:
        return self._one("SELECT COUNT(*) AS n FROM jobs WHERE model = %s AND status = %s",
                         (model, JobStatus.QUEUED.value))["n"]  # type: ignore[index]

    # ---- jobs ------------------------------------------------------------------------------------

    def insert(self, job_id: str, client_id: str | None, params: dict[str, Any], now: float,
               tenant: str = DEFAULT_TENANT, *, max_queued: int | None = None) -> None:
        sql = ("INSERT INTO jobs (id, client_id, model, params, priority, status, t_received, t_queued, tenant)"
               " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)")
        args = (job_id, client_id, params["model"], json.dumps(params), params["priority"], JobStatus.QUEUED.value,
                now, now, tenant)
        with self.pool.connection() as c, c.transaction():
            if max_queued is not None:
                c.execute("SELECT pg_advisory_xact_lock(hashtextextended('genserve.tenant.' || %s, 0))", (tenant,))
                queued = c.execute("SELECT COUNT(*) AS n FROM jobs WHERE tenant = %s AND status = %s",
                                   (tenant, JobStatus.QUEUED.value)).fetchone()["n"]
                if queued >= max_queued:
                    raise QueueLimitReached(tenant, queued, max_queued)
            c.execute(sql, args)

    def get(self, job_id: str) -> dict[str, Any] | None:
        return _job(self._one("SELECT * FROM jobs WHERE id = %s", (job_id,)))

    def get_by_client_id(self, client_id: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any] | None:
        return _job(self._one("SELECT * FROM jobs WHERE tenant = %s AND client_id = %s", (tenant, client_id)))

    def queued_count(self, tenant: str) -> int:
        return self._one("SELECT COUNT(*) AS n FROM jobs WHERE tenant = %s AND status = %s",
                         (tenant, JobStatus.QUEUED.value))["n"]  # type: ignore[index]

    def unfinished(self, limit: int | None = None) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM jobs WHERE status IN (%s, %s) ORDER BY t_queued, id"
                         + (" LIMIT %s" if limit is not None else ""),
                         (JobStatus.QUEUED.value, JobStatus.RUNNING.value) + ((limit,) if limit is not None else ()))
        return [_job(r) for r in rows]  # type: ignore[misc]

    def recent(self, limit: int = 50, tenant: str | None = None, status: str | None = None,
               model: str | None = None) -> list[dict[str, Any]]:
        return self.page(limit, tenant=tenant, status=status, models=None if model is None else (model,)).items

    def page(self, limit: int, *, after: str | None = None, order: str = "desc", tenant: str | None = None,
             status: str | None = None, models: tuple[str, ...] | None = None) -> Page:
        """As ``JobStore.page``: (t_received, seq) is each job's fixed position."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be asc or desc, got {order!r}")
        conds: list[str] = []
        args: list[Any] = []
        for c, v in (("tenant = %s", tenant), ("status = %s", status)):
            if v is not None:
                conds.append(c)
                args.append(v)
        if models is not None:
            conds.append("model = ANY(%s)")
            args.append(list(models))
        if after is not None:
            pos = self._one("SELECT t_received, seq FROM jobs WHERE id = %s", (after,))
            if pos is None:
                raise KeyError(after)
            conds.append(f"(t_received, seq) {'<' if order == 'desc' else '>'} (%s, %s)")
            args += [pos["t_received"], pos["seq"]]
        where = ("WHERE " + " AND ".join(conds)) if conds else ""
        d = "DESC" if order == "desc" else "ASC"
        rows = self._all(f"SELECT * FROM jobs {where} ORDER BY t_received {d}, seq {d} LIMIT %s", (*args, limit + 1))
        return Page([_job(r) for r in rows[:limit]], len(rows) > limit)  # type: ignore[misc]

    def usage(self, since: float, tenant: str | None = None) -> list[dict[str, Any]]:
        where, args = "t_received >= %s", [since]
        if tenant is not None:
            where, args = where + " AND tenant = %s", [since, tenant]
        return self._all(
            "SELECT tenant, model, to_char(to_timestamp(t_received) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day,"
            " COUNT(*) AS jobs, COUNT(*) FILTER (WHERE status = 'succeeded') AS succeeded,"
            " COUNT(*) FILTER (WHERE status = 'failed') AS failed,"
            " COUNT(*) FILTER (WHERE status = 'canceled') AS canceled,"
            " COALESCE(SUM(device_seconds), 0.0) AS device_seconds, COALESCE(SUM(cost_usd), 0.0) AS cost_usd"
            f" FROM jobs WHERE {where} GROUP BY tenant, model, day ORDER BY tenant, day, model", args)

    def active_since(self, since: float, limit: int = 100_000) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM jobs WHERE t_finished IS NULL OR t_finished >= %s"
                         " ORDER BY t_received DESC LIMIT %s", (since, limit))
        return [_job(r) for r in rows]  # type: ignore[misc]

    def update(self, job_ids: list[str] | tuple[str, ...], **fields: Any) -> None:
        if not job_ids:
            return
        bad = set(fields) - _COLUMNS
        if bad:
            raise ValueError(f"no such job column: {sorted(bad)}")
        cols = ", ".join(f"{k} = %s" for k in fields)
        vals = [json.dumps(v) if k in _JSON_COLUMNS and v is not None else _plain(v) for k, v in fields.items()]
        self._run(f"UPDATE jobs SET {cols} WHERE id = ANY(%s)", (*vals, list(job_ids)))

    def requeue_unfinished(self, now: float, *, keep: Collection[str] = (),
                           only: Collection[str] | None = None) -> list[dict[str, Any]]:
        """As ``JobStore.requeue_unfinished``, in one transaction."""
        where, args = "", []
        if keep:
            where += " AND NOT ({col} = ANY(%s))"
            args.append(list(keep))
        if only is not None:
            where += " AND {col} = ANY(%s)"
            args.append(list(only))
        with self.pool.connection() as c, c.transaction():
            c.execute("UPDATE attempts SET code = %s, message = 'the server stopped during the attempt',"
                      " ended = %s WHERE ended IS NULL" + where.format(col="job_id"),
                      (ErrorCode.WORKER_CRASHED.value, now, *args))
            c.execute("UPDATE jobs SET status = %s, batch_id = NULL, batch_size = NULL, worker = NULL,"
                      " t_dispatched = NULL, t_load_start = NULL, t_load_end = NULL, load_tier = NULL,"
                      " t_inference_start = NULL, t_inference_end = NULL, attempts = attempts + 1"
                      " WHERE status = %s" + where.format(col="id"),
                      (JobStatus.QUEUED.value, JobStatus.RUNNING.value, *args))
        return self.unfinished()

    # ---- attempts --------------------------------------------------------------------------------

    def start_attempts(self, job_ids: tuple[str, ...], worker: str, model: str, batch_id: str, now: float) -> None:
        with self.pool.connection() as c, c.transaction():
            c.cursor().executemany(
                "INSERT INTO attempts (job_id, attempt, worker, model, batch_id, batch_size, started)"
                " VALUES (%s, (SELECT COALESCE(MAX(attempt), 0) + 1 FROM attempts WHERE job_id = %s),"
                " %s, %s, %s, %s, %s)",
                [(j, j, worker, model, batch_id, len(job_ids), now) for j in job_ids])

    def end_attempt(self, job_id: str, code: str | None, message: str | None, now: float) -> None:
        self._run("UPDATE attempts SET code = %s, message = %s, ended = %s WHERE job_id = %s AND ended IS NULL",
                  (_plain(code), message, now, job_id))

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM attempts WHERE job_id = %s ORDER BY attempt", (job_id,))

    # ---- retention -------------------------------------------------------------------------------

    def finished_with_results(self, before: float | None, limit: int) -> list[dict[str, Any]]:
        cond = "" if before is None else " AND t_finished < %s"
        rows = self._all(f"SELECT id, results, t_finished FROM jobs WHERE t_finished IS NOT NULL AND results != '[]'"
                         f"{cond} ORDER BY t_finished LIMIT %s", ((before,) if before is not None else ()) + (limit,))
        return [{"id": r["id"], "results": json.loads(r["results"]), "t_finished": r["t_finished"]} for r in rows]

    def finished_before(self, before: float, limit: int) -> list[dict[str, Any]]:
        rows = self._all("SELECT id, results FROM jobs WHERE t_finished < %s ORDER BY t_finished LIMIT %s",
                         (before, limit))
        return [{"id": r["id"], "results": json.loads(r["results"])} for r in rows]

    def results_deleted(self, job_id: str, now: float) -> None:
        self._run("UPDATE jobs SET results = '[]', t_results_deleted = %s WHERE id = %s", (now, job_id))

    def delete_job(self, job_id: str) -> bool:
        with self.pool.connection() as c, c.transaction():
            n = c.execute("DELETE FROM jobs WHERE id = %s", (job_id,)).rowcount
            c.execute("DELETE FROM attempts WHERE job_id = %s", (job_id,))
            c.execute("DELETE FROM webhook_deliveries WHERE job_id = %s AND status != 'pending'", (job_id,))
        return n > 0

    def stored_result_bytes(self) -> int:
        row = self._one("SELECT COALESCE(SUM(COALESCE((r->>'bytes')::bigint, 0)"
                        " + COALESCE((r->'thumbnail'->>'bytes')::bigint, 0)), 0) AS n"
                        " FROM jobs, jsonb_array_elements(jobs.results::jsonb) AS r WHERE jobs.results != '[]'")
        return int(row["n"])  # type: ignore[index]

    # ---- webhook deliveries ----------------------------------------------------------------------

    def add_delivery(self, delivery_id: str, job_id: str, url: str, event: str, payload: str, now: float) -> None:
        self._run("INSERT INTO webhook_deliveries (id, job_id, url, event, payload, next_at, created)"
                  " VALUES (%s, %s, %s, %s, %s, %s, %s)", (delivery_id, job_id, url, event, payload, now, now))

    def pending_deliveries(self, limit: int = 64) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM webhook_deliveries WHERE status = 'pending' ORDER BY next_at, created"
                         " LIMIT %s", (limit,))

    def update_delivery(self, delivery_id: str, **fields: Any) -> None:
        bad = set(fields) - _DELIVERY_COLUMNS
        if bad:
            raise ValueError(f"no such delivery column: {sorted(bad)}")
        cols = ", ".join(f"{k} = %s" for k in fields)
        self._run(f"UPDATE webhook_deliveries SET {cols} WHERE id = %s", (*fields.values(), delivery_id))

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT id, event, status, attempts, last_error, created, delivered"
                         " FROM webhook_deliveries WHERE job_id = %s ORDER BY created", (job_id,))


def _plain(v: Any) -> Any:
    """str-valued enums (JobStatus, ErrorCode) as their text, booleans as the 0/1 SQLite stores."""
    if isinstance(v, bool):
        return int(v)
    return v.value if hasattr(v, "value") and isinstance(v, str) else v
