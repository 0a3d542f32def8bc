"""API keys in PostgreSQL (``[store] backend = "postgres"``): the ``api_keys`` table of the one
database gateways and engines share (created by the job store's migrations), so a key created on
any machine works on every gateway and revoking it takes effect on every gateway from its next
request.

The same hashing, scopes and constant-time comparison as ``KeyStore`` (keys.py), which this extends;
only where the rows live differs. SQLite's ``PRAGMA data_version`` has no PostgreSQL equivalent, so
the cached table is checked with one tiny aggregate per request (row count and the latest
creation/revocation time): cheap on a table of a few hundred rows, and a revocation is never missed.
"""
from __future__ import annotations

import time

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from .keys import KeyStore, Principal, hash_key, new_key


class PgKeyStore(KeyStore):
    def __init__(self, dsn: str, pool_size: int = 2) -> None:  # noqa: D107 (KeyStore.__init__ opens SQLite: not called)
        self.path = dsn.split("@")[-1]  # shown by `genserve keys create`: host/db, never the password
        self.pool = ConnectionPool(dsn, min_size=1, max_size=pool_size, name="genserve-keys", open=False,
                                   kwargs={"autocommit": True, "row_factory": dict_row})
        self.pool.open(wait=True, timeout=30)
        self._version: tuple | None = None
        self._by_hash: dict[str, tuple[str, Principal]] = {}
        self._any = False

    def close(self) -> None:
        self.pool.close()

    def create(self, tenant: str, scope: str = "jobs", name: str | None = None) -> tuple[str, str]:
        key_id, key = new_key(tenant, scope)
        with self.pool.connection() as c:
            c.execute("INSERT INTO api_keys (id, hash, tenant, scope, name, created) VALUES (%s, %s, %s, %s, %s, %s)",
                      (key_id, hash_key(key), tenant, scope, name, time.time()))
        self._version = None
        return key_id, key

    def list(self) -> list[dict]:
        with self.pool.connection() as c:
            return c.execute("SELECT id, tenant, scope, name, created, revoked FROM api_keys ORDER BY created").fetchall()

    def revoke(self, key_id: str) -> bool:
        with self.pool.connection() as c:
            n = c.execute("UPDATE api_keys SET revoked = %s WHERE id = %s AND revoked IS NULL",
                          (time.time(), key_id)).rowcount
        self._version = None
        return n == 1

    def _refresh(self) -> None:
        with self.pool.connection() as c:
            v = c.execute("SELECT COUNT(*) AS n, MAX(created) AS c, MAX(revoked) AS r,"
                          " COUNT(revoked) AS nr FROM api_keys").fetchone()
            version = (v["n"], v["c"], v["r"], v["nr"])
            if version == self._version:
                return
            rows = c.execute("SELECT id, hash, tenant, scope, revoked FROM api_keys").fetchall()
        self._any = bool(rows)
        self._by_hash = {r["hash"]: (r["hash"], Principal(r["tenant"], r["scope"], r["id"]))
                         for r in rows if r["revoked"] is None}
        self._version = version
