"""Per-tenant admission: a token bucket per tenant (``rate_per_s`` refill, ``burst`` size). Pure:
``now`` is an argument; the server keeps one ``RateLimiter`` in memory (a restart refills buckets)."""
from __future__ import annotations

from ...config.auth import TenantConfig


class RateLimiter:
    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, as of)

    def take(self, tenant: str, cfg: TenantConfig, n: int, now: float) -> float:
        """Take ``n`` tokens: 0.0 when granted, else the seconds until ``n`` would be (nothing taken)."""
        if cfg.rate_per_s is None:
            return 0.0
        size = float(cfg.burst if cfg.burst is not None else max(1.0, cfg.rate_per_s))
        tokens, since = self._buckets.get(tenant, (size, now))
        tokens = min(size, tokens + max(0.0, now - since) * cfg.rate_per_s)
        if n > size:
            self._buckets[tenant] = (tokens, now)
            return float("inf")  # can never be granted at once
        if tokens >= n:
            self._buckets[tenant] = (tokens - n, now)
            return 0.0
        self._buckets[tenant] = (tokens, now)
        return (n - tokens) / cfg.rate_per_s
