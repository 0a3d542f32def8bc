"""``[cluster]`` (which worker provider), ``[results]`` (which result store) and ``[store]`` (which
job database), parsed at the edge with errors that name the key. All default to this machine: local
processes, a local directory, SQLite files in the data directory."""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .values import _check_table

PROVIDERS = ("local", "ray")
STORES = ("local", "s3")
SERVE_MODES = ("redirect", "proxy")
BACKENDS = ("sqlite", "postgres")
# "auto", the GCS "HOST:PORT", or Ray Client's "ray://HOST:PORT"; HOST may be a bracketed IPv6 address.
_ADDRESS = re.compile(r"(?:ray://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


@dataclass(frozen=True)
class ClusterConfig:
    provider: str = "local"
    address: str = "auto"  # "auto", the GCS "HOST:PORT" or Ray Client's "ray://HOST:PORT"
    device_resource: str = "GPU"  # the Ray resource one worker takes one unit of
    workers: int | None = None  # initial Ray workers (default: server.workers); [autoscale] takes over
    namespace: str = "genserve"  # Ray namespace of the named worker actors
    name: str = "genserve"  # actor name prefix: two deployments on one cluster need different names
    cpus_per_worker: float = 1.0
    model_cache: str = "/tmp/genserve-model-cache"  # per node: where s3:// model sources are downloaded


@dataclass(frozen=True)
class ResultsConfig:
    store: str = "local"
    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    serve: str = "redirect"  # GET /v1/jobs/{id}/result: 307 to a presigned URL, or "proxy"
    presign_expiry_s: int = 3600

    def spec(self, data_dir: Path) -> dict[str, Any]:
        """What a worker needs to open the same store (plain data: it crosses process and node
        boundaries)."""
        if self.store == "local":
            return {"store": "local", "root": str(data_dir / "results")}
        return {"store": "s3", "bucket": self.bucket, "prefix": self.prefix, "endpoint_url": self.endpoint_url,
                "region": self.region, "serve": self.serve, "presign_expiry_s": self.presign_expiry_s}


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: where jobs, attempts, webhook deliveries and API keys live. ``sqlite``: files in
    the data directory (one server process); ``postgres``: one database that several gateways and
    engines share (docs/ha.md)."""

    backend: str = "sqlite"
    dsn: str | None = None  # postgresql://user:pass@host:port/db (also GENSERVE_STORE__DSN)
    pool_size: int = 8  # connections each process keeps to PostgreSQL (the LISTEN and leader ones extra)


def parse_store(raw: Any) -> StoreConfig:
    _check_table("store", raw, {f.name for f in fields(StoreConfig)})
    kw: dict[str, Any] = {}
    if "backend" in raw:
        kw["backend"] = _choice("store.backend", raw["backend"], BACKENDS)
    if "dsn" in raw:
        dsn = _str("store.dsn", raw["dsn"])
        if not dsn.startswith(("postgresql://", "postgres://")) and "=" not in dsn:
            raise ConfigError("store.dsn", "must be a PostgreSQL URI (postgresql://user@host:port/db) or "
                              f"a key=value connection string, got {dsn[:60]!r}")
        kw["dsn"] = dsn
    if "pool_size" in raw:
        v = raw["pool_size"]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 200:
            raise ConfigError("store.pool_size", f"must be an integer between 1 and 200, got {v!r}")
        kw["pool_size"] = v
    s = StoreConfig(**kw)
    if s.backend == "postgres" and not s.dsn:
        raise ConfigError("store.dsn", 'required when store.backend = "postgres" (or set GENSERVE_STORE__DSN)')
    return s


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(key, f"must be a non-empty string, got {v!r}")
    return v


def _choice(key: str, v: Any, options: tuple[str, ...]) -> str:
    if v not in options:
        raise ConfigError(key, f"must be one of {', '.join(options)}, got {v!r}")
    return v


def _address(v: str) -> str:
    m = _ADDRESS.fullmatch(v)
    if v != "auto" and not (m and 1 <= int(m.group(1)) <= 65535):
        raise ConfigError("cluster.address", "must be \"auto\", the GCS address \"HOST:PORT\" or a Ray Client "
                          f"address \"ray://HOST:PORT\", got {v!r}")
    return v


def parse_cluster(raw: Any) -> ClusterConfig:
    _check_table("cluster", raw, {f.name for f in fields(ClusterConfig)})
    kw: dict[str, Any] = {}
    if "provider" in raw:
        kw["provider"] = _choice("cluster.provider", raw["provider"], PROVIDERS)
    for k in ("address", "device_resource", "namespace", "name", "model_cache"):
        if k in raw:
            kw[k] = _str(f"cluster.{k}", raw[k])
    if "address" in raw:
        kw["address"] = _address(kw["address"])
    if "workers" in raw:
        v = raw["workers"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError("cluster.workers", f"must be an integer ≥ 0, got {v!r}")
        kw["workers"] = v
    if "cpus_per_worker" in raw:
        v = raw["cpus_per_worker"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError("cluster.cpus_per_worker", f"must be a number ≥ 0, got {v!r}")
        kw["cpus_per_worker"] = float(v)
    return ClusterConfig(**kw)


def parse_results(raw: Any) -> ResultsConfig:
    _check_table("results", raw, {f.name for f in fields(ResultsConfig)})
    kw: dict[str, Any] = {}
    if "store" in raw:
        kw["store"] = _choice("results.store", raw["store"], STORES)
    if "serve" in raw:
        kw["serve"] = _choice("results.serve", raw["serve"], SERVE_MODES)
    for k in ("bucket", "endpoint_url", "region"):
        if k in raw:
            kw[k] = _str(f"results.{k}", raw[k])
    if "prefix" in raw:
        if not isinstance(raw["prefix"], str):
            raise ConfigError("results.prefix", f"must be a string, got {raw['prefix']!r}")
        kw["prefix"] = raw["prefix"]
    if "presign_expiry_s" in raw:
        v = raw["presign_expiry_s"]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 7 * 86400:
            raise ConfigError("results.presign_expiry_s", f"must be an integer between 1 and 604800, got {v!r}")
        kw["presign_expiry_s"] = v
    r = ResultsConfig(**kw)
    if r.store == "s3" and not r.bucket:
        raise ConfigError("results.bucket", "required when results.store = \"s3\"")
    return r
