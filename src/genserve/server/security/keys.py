"""API keys, stored hashed in ``<data dir>/keys.db`` (SQLite).

A key is ``gsk_`` + 32 random bytes (URL-safe base64); only its SHA-256 is stored, so a stolen
database yields no usable key, and a fast hash is enough because the key has 256 bits of entropy
(no dictionary to attack). The server looks a presented key up by its hash and compares in constant
time. A running server sees keys created or revoked by ``genserve keys`` (another process) without a
restart: SQLite's ``PRAGMA data_version`` changes when another connection commits, and the cached
table is re-read only then — one cheap pragma per request.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ...config.auth import TENANT_RE
from .files import private_db

SCOPES = ("jobs", "admin")
KEY_PREFIX = "gsk_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    scope TEXT NOT NULL,
    name TEXT,
    created REAL NOT NULL,
    revoked REAL
);
"""


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's tenant and scope (``key_id`` None: auth is off)."""

    tenant: str
    scope: str
    key_id: str | None = None

    @property
    def admin(self) -> bool:
        return self.scope == "admin"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key(tenant: str, scope: str) -> tuple[str, str]:
    """(key id, key) for a valid tenant name and scope; both stores call it."""
    if not TENANT_RE.match(tenant):
        raise ValueError(f"tenant: {tenant!r} is not a valid name (letters, digits, _ . -; up to 64)")
    if scope not in SCOPES:
        raise ValueError(f"scope: must be one of {', '.join(SCOPES)}")
    return "key_" + secrets.token_hex(6), KEY_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    def __init__(self, data_dir: Path) -> None:
        self.path = private_db(data_dir / "keys.db")  # 0600, in a 0700 directory when created here
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(_SCHEMA)
        self._version: int | None = None
        self._by_hash: dict[str, tuple[str, Principal]] = {}
        self._any = False

    def close(self) -> None:
        self.db.close()

    # ---- administration (the CLI) -----------------------------------------------------------------

    def create(self, tenant: str, scope: str = "jobs", name: str | None = None) -> tuple[str, str]:
        """A new key for ``tenant``: (key id, the key itself — shown once, never stored)."""
        key_id, key = new_key(tenant, scope)
        self.db.execute("INSERT INTO api_keys (id, hash, tenant, scope, name, created) VALUES (?, ?, ?, ?, ?, ?)",
                        (key_id, hash_key(key), tenant, scope, name, time.time()))
        self._version = None  # data_version only moves for other connections' commits
        return key_id, key

    def list(self) -> list[dict]:
        rows = self.db.execute("SELECT id, tenant, scope, name, created, revoked FROM api_keys ORDER BY created")
        return [dict(r) for r in rows]

    def revoke(self, key_id: str) -> bool:
        cur = self.db.execute("UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), key_id))
        self._version = None
        return cur.rowcount == 1

    # ---- the server's side ---------------------------------------------------------------------

    def any_keys(self) -> bool:
        """Has any key ever been created? (A revoked key still counts: revoking every key must not
        silently open the server.)"""
        self._refresh()
        return self._any

    def verify(self, key: str) -> Principal | None:
        self._refresh()
        if not key.startswith(KEY_PREFIX):
            return None
        h = hash_key(key)
        found = self._by_hash.get(h)
        # The lookup is by hash, so its timing says nothing about the key; the stored hash is still
        # compared in constant time.
        if found is None or not hmac.compare_digest(found[0], h):
            return None
        return found[1]

    def _refresh(self) -> None:
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:
            return
        rows = self.db.execute("SELECT id, hash, tenant, scope, revoked FROM api_keys").fetchall()
        self._any = bool(rows)
        self._by_hash = {r["hash"]: (r["hash"], Principal(r["tenant"], r["scope"], r["id"]))
                         for r in rows if r["revoked"] is None}
        self._version = version
