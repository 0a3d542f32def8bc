"""``[retention]``: how long results and job records are kept, and a cap on stored result bytes.

    [retention]
    results_days = 7          # result files of finished jobs deleted this long after they finished
    jobs_days = 30            # job records (and their results) deleted this long after they finished
    max_data_bytes = 50e9     # stored results above this: the oldest finished jobs' results go first
    sweep_interval_s = 300    # how often the server sweeps

Every key is optional; nothing is deleted unless asked. Parsed here, not in config/load.py, which only
calls ``parse_retention``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import suggest

DAY_S = 86_400.0


@dataclass(frozen=True)
class RetentionConfig:
    results_days: float | None = None
    jobs_days: float | None = None
    max_data_bytes: int | None = None
    sweep_interval_s: float = 300.0
    sweep_batch: int = 1000  # rows handled per query, so one sweep never holds the event loop long

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.results_days, self.jobs_days, self.max_data_bytes))

    def results_expire_at(self, t_finished: float | None) -> float | None:
        """When a finished job's results expire by age (the size cap may take them earlier)."""
        if t_finished is None or self.results_days is None:
            return self.record_expires_at(t_finished)
        at = t_finished + self.results_days * DAY_S
        rec = self.record_expires_at(t_finished)
        return at if rec is None else min(at, rec)

    def record_expires_at(self, t_finished: float | None) -> float | None:
        if t_finished is None or self.jobs_days is None:
            return None
        return t_finished + self.jobs_days * DAY_S


KEYS = set(RetentionConfig.__dataclass_fields__)


class RetentionError(ValueError):
    """A bad ``[retention]`` key; config/load.py turns it into its ``ConfigError`` (same key, same message)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def parse_retention(raw: Any) -> RetentionConfig:
    ConfigError = RetentionError
    if not isinstance(raw, dict):
        raise ConfigError("retention", f"must be a table, got {raw!r}")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise ConfigError(f"retention.{unknown[0]}", "unknown key" + (suggest(unknown[0], KEYS)
                          or f" (known: {', '.join(sorted(KEYS))})"))
    kw: dict[str, Any] = {}
    for k, lo in (("results_days", 0.0), ("jobs_days", 0.0), ("sweep_interval_s", 0.05)):
        if k in raw:
            v = raw[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"retention.{k}", f"must be a number, got {v!r}")
            if v < lo:
                raise ConfigError(f"retention.{k}", f"must be ≥ {lo:g}")
            kw[k] = float(v)
    if "max_data_bytes" in raw:
        v = raw["max_data_bytes"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError("retention.max_data_bytes", f"must be a number of bytes ≥ 0, got {v!r}")
        kw["max_data_bytes"] = int(v)
    if "sweep_batch" in raw:
        v = raw["sweep_batch"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError("retention.sweep_batch", f"must be an integer ≥ 1, got {v!r}")
        kw["sweep_batch"] = v
    r = RetentionConfig(**kw)
    if r.results_days is not None and r.jobs_days is not None and r.jobs_days < r.results_days:
        raise ConfigError("retention.jobs_days", f"must be ≥ results_days ({r.results_days:g}): a record outlives its results")
    return r
