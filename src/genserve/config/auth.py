"""``[auth]``, ``[tenants.NAME]`` and ``[server] cors_origins``: parsed here, validated at the edge.

``parse_access(data, error)`` takes the config's error type (``genserve.config.load.ConfigError``) so
every message names its key without this module importing the config module (no import cycle).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .values import _check_table

DEFAULT_TENANT = "default"  # jobs submitted while auth is off belong here
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

PRIORITIES = ("high", "standard", "low")  # best first, as genserve.engine.Priority


@dataclass(frozen=True)
class AuthConfig:
    required: bool = False  # true: keys are required even before the first key exists
    metrics_token: str | None = None  # a bearer token that may read /metrics (besides admin keys)


@dataclass(frozen=True)
class TenantConfig:
    max_queued: int | None = None  # queued jobs at once (None: only the model's max_queue)
    rate_per_s: float | None = None  # token bucket refill (None: no rate limit)
    burst: int | None = None  # bucket size (default: max(1, rate_per_s))
    max_priority: str = "high"  # the best priority its jobs may ask for
    weight: float = 1.0  # fair share inside a model's queue

    def priority_allowed(self, priority: str) -> bool:
        return PRIORITIES.index(priority) >= PRIORITIES.index(self.max_priority)


@dataclass(frozen=True)
class AccessConfig:
    auth: AuthConfig = AuthConfig()
    tenants: Mapping[str, TenantConfig] = field(default_factory=dict)

    def tenant(self, name: str) -> TenantConfig:
        return self.tenants.get(name) or _UNCONFIGURED

    def metric_label(self, tenant: str) -> str:
        """Prometheus label: configured tenants by name, every other as "other" (bounded cardinality)."""
        return tenant if tenant in self.tenants else "other"


_UNCONFIGURED = TenantConfig()
_TENANT_KEYS = set(TenantConfig.__dataclass_fields__)
_AUTH_KEYS = set(AuthConfig.__dataclass_fields__)

Err = Callable[[str, str], Exception]


def parse_access(data: Mapping[str, Any], error: Err) -> AccessConfig:
    auth = _parse_auth(data.get("auth", {}), error)
    raw = data.get("tenants", {})
    if not isinstance(raw, dict):
        raise error("tenants", "must be a table of [tenants.NAME] tables")
    return AccessConfig(auth, {name: _parse_tenant(name, t, error) for name, t in raw.items()})


def parse_cors_origins(raw: Any, error: Err) -> tuple[str, ...]:
    """``[server] cors_origins``: exact origins ("https://app.example.com") or ["*"]."""
    key = "server.cors_origins"
    if not isinstance(raw, list) or not all(isinstance(o, str) for o in raw):
        raise error(key, f"must be a list of origins, got {raw!r}")
    for i, o in enumerate(raw):
        if o != "*" and not (o.startswith(("http://", "https://")) and "/" not in o.split("://", 1)[1]):
            raise error(f"{key}[{i}]", f"{o!r} is not an origin (scheme://host[:port], no path) or \"*\"")
    return tuple(raw)


def _table(key: str, raw: Any, known: set[str], error: Err) -> dict[str, Any]:
    _check_table(key, raw, known)  # a ConfigError naming the key, with "did you mean"
    return raw


def _parse_auth(raw: Any, error: Err) -> AuthConfig:
    raw = _table("auth", raw, _AUTH_KEYS, error)
    kw: dict[str, Any] = {}
    if "required" in raw:
        if not isinstance(raw["required"], bool):
            raise error("auth.required", f"must be true or false, got {raw['required']!r}")
        kw["required"] = raw["required"]
    if "metrics_token" in raw:
        tok = raw["metrics_token"]
        if not isinstance(tok, str) or len(tok) < 16:
            raise error("auth.metrics_token", "must be a string of at least 16 characters")
        kw["metrics_token"] = tok
    return AuthConfig(**kw)


def _number(key: str, v: Any, lo: float, integer: bool, error: Err) -> Any:
    ok = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, ok):
        raise error(key, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
    if v < lo or (not integer and v == 0 and lo > 0):
        raise error(key, f"must be ≥ {lo}" if integer else "must be > 0")
    return v if integer else float(v)


def _parse_tenant(name: str, raw: Any, error: Err) -> TenantConfig:
    p = f"tenants.{name}"
    if not TENANT_RE.match(name):
        raise error(p, "not a valid tenant name (letters, digits, _ . -; up to 64)")
    raw = _table(p, raw, _TENANT_KEYS, error)
    kw: dict[str, Any] = {}
    for k in ("max_queued", "burst"):
        if k in raw:
            kw[k] = _number(f"{p}.{k}", raw[k], 1, True, error)
    for k in ("rate_per_s", "weight"):
        if k in raw:
            kw[k] = _number(f"{p}.{k}", raw[k], 1e-9, False, error)
    if "max_priority" in raw:
        if raw["max_priority"] not in PRIORITIES:
            raise error(f"{p}.max_priority", f"must be one of {', '.join(PRIORITIES)}")
        kw["max_priority"] = raw["max_priority"]
    if "burst" in kw and "rate_per_s" not in kw:
        raise error(f"{p}.burst", "needs rate_per_s")
    return TenantConfig(**kw)
