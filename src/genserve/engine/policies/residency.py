"""Residency policies: which models to evict when memory is short, and which to unload when idle."""
from __future__ import annotations

from typing import Protocol

from ..types import ModelLimits, WorkerState


class ResidencyPolicy(Protocol):
    name: str

    def eviction_order(self, worker: WorkerState, protected: set[str]) -> list[str]: ...
    def unload_at(self, model: str, worker: WorkerState, limits: ModelLimits,
                  last_arrival: float | None) -> float | None: ...


class LRU:
    """Evict the least recently used model first. Unload a model once it has gone ``idle_unload_s``
    unused and no request for it arrived within ``keep_warm_s``. Warm-pool (pinned) models, models
    still loading and ``protected`` ones (running or queued work) are never touched."""

    name = "lru"

    def eviction_order(self, worker: WorkerState, protected: set[str]) -> list[str]:
        movable = [m for m, r in worker.resident.items() if not (r.pinned or r.loading or m in protected)]
        return sorted(movable, key=lambda m: (worker.resident[m].last_used, m))

    def unload_at(self, model: str, worker: WorkerState, limits: ModelLimits, last_arrival: float | None) -> float | None:
        """When ``model`` becomes due for an idle unload on ``worker`` (None: never)."""
        r = worker.resident[model]
        if r.pinned or r.loading or limits.idle_unload_s is None:
            return None
        due = r.last_used + limits.idle_unload_s
        if limits.keep_warm_s > 0 and last_arrival is not None:
            due = max(due, last_arrival + limits.keep_warm_s)
        return due


RESIDENCY = {LRU.name: LRU}
