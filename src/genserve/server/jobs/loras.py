"""The LoRA adapter registry: which adapters exist, for which base model, whose they are, and where
their file is. A table in the job store's SQLite database; the files live in the result store
(``loras/<sha256[:16]>.safetensors``), so every worker on every node reads them from there.

Validation happens here, without torch (backends/lora_file.py): a safetensors header, parsed by
hand, checked against the base model's denoiser (its weight headers) and the size cap. Tenancy as
for jobs: an upload belongs to its tenant and is invisible to the others (404); an admin's
uploads and the config's ``[loras.NAME]`` are shared (owner NULL). A tenant's own adapter shadows
a shared one of the same name.
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ...backends.lora_file import LoraFileError, adapter_file, base_modules, read_adapter
from ...config.errors import ConfigError
from ...config.load import Config
from ...storage import ResultStore
from ..requests import RequestError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
STORE_DIR = "loras"  # the result store's "job id" for adapter files
SHARED = ""  # the owner of shared adapters (admin uploads, the config's)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS loras (
    owner TEXT NOT NULL,  -- a tenant, or '' for shared adapters
    name TEXT NOT NULL,
    model TEXT NOT NULL,
    id TEXT NOT NULL,  -- sha256[:16] of the file: its result-store key and its identity on workers
    bytes INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    targets TEXT NOT NULL,  -- JSON list of module kinds (to_q, ...)
    layers INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    layout TEXT NOT NULL,
    source TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (owner, name)
);
"""


class _PgDb:
    """The few calls the registry makes, over PostgreSQL: ``?`` placeholders become ``%s``."""

    def __init__(self, dsn: str) -> None:
        from .store.postgres import open_pool  # psycopg only where PostgreSQL is used

        self.pool = open_pool(dsn, 2, "genserve-loras")

    def execute(self, sql: str, args: Any = ()) -> Any:
        with self.pool.connection() as c:
            cur = c.execute(sql.replace("?", "%s"), args)
            return _Rows(cur.fetchall() if cur.description else [])

    def close(self) -> None:
        self.pool.close()


class _Rows:
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return self.rows


def store_key(lora_id: str) -> str:
    return f"{STORE_DIR}/{lora_id}.safetensors"


class LoraRegistry:
    def __init__(self, db_path: Path | str, results: ResultStore, model_dirs: Mapping[str, Path | None],
                 max_bytes: int) -> None:
        """``db_path``: the SQLite job store's file, or a ``postgresql://`` DSN (the table is then
        the PostgreSQL store's, made by its migrations, so every gateway and engine sees one
        registry). ``model_dirs``: each base model's local directory (None: remote, its module table
        is unknown here and only the file's own consistency is checked)."""
        if str(db_path).startswith(("postgresql://", "postgres://")):
            self.db: Any = _PgDb(str(db_path))
        else:
            self.db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.executescript(_SCHEMA)
        self.results, self.model_dirs, self.max_bytes = results, model_dirs, max_bytes
        self._modules: dict[str, dict[str, tuple[int, int]] | None] = {}

    def close(self) -> None:
        self.db.close()

    def modules(self, model: str) -> dict[str, tuple[int, int]] | None:
        if model not in self._modules:
            d = self.model_dirs.get(model)
            self._modules[model] = base_modules(d) if d is not None and Path(d).is_dir() else None
        return self._modules[model]

    # ---- registering -------------------------------------------------------------------------------

    def register(self, name: str, model: str, data: bytes, owner: str | None, *, source: str | None = None,
                 replace: bool = False) -> dict[str, Any]:
        """Validate and store an adapter; its view. 400 naming the field (``file``: the module at
        fault in the message), 409 when the name is taken in that scope."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise RequestError("name", "must be 1-64 characters of letters, digits, '_', '.', '-' (starting with a "
                                       "letter or digit)")
        if model not in self.model_dirs:
            raise RequestError("model", f"unknown model {model!r}; available: {', '.join(sorted(self.model_dirs))}")
        if len(data) > self.max_bytes:
            raise RequestError("file", f"is {len(data)} bytes; the limit is {self.max_bytes} (server.max_lora_bytes)",
                               status=413, code="too_large")
        try:
            info = read_adapter(data, self.modules(model))
        except LoraFileError as e:
            raise RequestError("file", f"{e} (for base model {model})" if e.module else str(e)) from None
        scope = owner or SHARED
        if not replace and self._row(scope, name) is not None:
            raise RequestError("name", f"an adapter {name!r} exists already; delete it first", status=409,
                               code="conflict")
        lora_id = hashlib.sha256(data).hexdigest()[:16]
        self.results.put(STORE_DIR, f"{lora_id}.safetensors", data, "application/octet-stream")
        self.db.execute("DELETE FROM loras WHERE owner = ? AND name = ?", (scope, name))  # replace (both backends)
        self.db.execute("INSERT INTO loras VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (scope, name, model, lora_id, info.bytes, info.rank, json.dumps(info.targets),
                         len(info.layers), info.dtype, info.layout, source, time.time()))
        return self.view(self._row(scope, name))

    def register_source(self, name: str, model: str, source: str, owner: str | None = None, *,
                        fetch: Callable[[str], bytes] | None = None, replace: bool = False) -> dict[str, Any]:
        """An adapter from a path (directory or .safetensors) or an ``s3://`` URL (``fetch`` reads it)."""
        if source.startswith("s3://"):
            if not source.endswith(".safetensors"):
                raise RequestError("source", "an s3:// source must name a .safetensors object")
            if fetch is None:
                raise RequestError("source", "s3:// sources need [results] store = \"s3\" credentials")
            data = fetch(source)
        else:
            try:
                data = adapter_file(Path(source)).read_bytes()
            except LoraFileError as e:
                raise RequestError("source", str(e)) from None
            except OSError as e:
                raise RequestError("source", f"cannot be read: {e.strerror or e}") from None
        return self.register(name, model, data, owner, source=source, replace=replace)

    # ---- reading -----------------------------------------------------------------------------------

    def _row(self, owner: str, name: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM loras WHERE owner = ? AND name = ?", (owner, name)).fetchone()

    def find(self, name: str, tenant: str, admin: bool = False) -> dict[str, Any] | None:
        """The adapter ``name`` as ``tenant`` sees it: its own, else a shared one (an admin also
        sees every tenant's, by name, when unambiguous)."""
        row = self._row(tenant, name) or self._row(SHARED, name)
        if row is None and admin:
            rows = self.db.execute("SELECT * FROM loras WHERE name = ?", (name,)).fetchall()
            row = rows[0] if len(rows) == 1 else None
        return self.view(row) if row is not None else None

    def list(self, tenant: str, admin: bool = False) -> list[dict[str, Any]]:
        if admin:
            rows = self.db.execute("SELECT * FROM loras ORDER BY name, owner").fetchall()
        else:
            rows = self.db.execute("SELECT * FROM loras WHERE owner IN (?, ?) ORDER BY name, owner",
                                   (tenant, SHARED)).fetchall()
        return [self.view(r) for r in rows]

    def sizes(self, ids) -> dict[str, int]:
        """Adapter id -> its bytes (a hint for the engine until a worker has measured it)."""
        out = {}
        for i in ids:
            row = self.db.execute("SELECT bytes FROM loras WHERE id = ? LIMIT 1", (i,)).fetchone()
            out[i] = int(row["bytes"]) if row is not None else 0
        return out

    def delete(self, view: dict[str, Any]) -> None:
        owner = view["owner"] or SHARED
        self.db.execute("DELETE FROM loras WHERE owner = ? AND name = ?", (owner, view["name"]))
        if self.db.execute("SELECT 1 FROM loras WHERE id = ?", (view["id"],)).fetchone() is None:
            self.results.delete(store_key(view["id"]))  # no other registration holds the same bytes

    @staticmethod
    def view(row: sqlite3.Row) -> dict[str, Any]:
        return {"object": "lora", "name": row["name"], "model": row["model"], "id": row["id"], "bytes": row["bytes"],
                "rank": row["rank"], "targets": json.loads(row["targets"]), "layers": row["layers"],
                "dtype": row["dtype"], "layout": row["layout"], "owner": row["owner"] or None,
                "source": row["source"], "created": row["created"]}


def open_registry(config: Config, results: ResultStore) -> LoraRegistry:
    """The registry as a server process keeps it: in the job store's database (SQLite's jobs.db,
    or the PostgreSQL store every gateway and engine shares)."""
    s = config.server
    where = config.store.dsn if config.store.backend == "postgres" else s.data_dir / "jobs.db"
    return LoraRegistry(where, results, {
        name: None if m.source.startswith("s3://") else config.model_dir(name) for name, m in config.models.items()},
        s.max_lora_bytes)


def register_config_sources(registry: LoraRegistry, config: Config) -> None:
    """``[loras.NAME]``: shared, refreshed from their sources at start (once the base models are
    built); a source that fails is a config error naming it."""
    for lora in config.loras.values():
        try:
            registry.register_source(lora.name, lora.model, lora.source, fetch=s3_fetcher(config), replace=True)
        except RequestError as e:
            raise ConfigError(f"loras.{lora.name}.source", e.message) from None


def s3_fetcher(config: Config) -> Callable[[str], bytes]:
    """Reads an ``s3://`` object (a LoRA source) with the result store's endpoint and region."""
    def fetch(source: str) -> bytes:
        from ...storage.model_cache import fetch_object

        return fetch_object(source, endpoint_url=config.results.endpoint_url, region=config.results.region)
    return fetch


def jobs_using(store: Any, lora_id: str, name: str) -> list[dict[str, Any]]:
    """Queued or running jobs that asked for this adapter (it cannot be deleted under them)."""
    return [j for j in store.unfinished()
            if any(a.get("id") == lora_id and a.get("name") == name for a in j["params"].get("loras") or ())]
