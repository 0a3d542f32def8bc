"""Batching policies: when is a batch key's queue ready, and when will it be."""
from __future__ import annotations

from typing import Protocol

from ..types import ModelLimits


class BatchingPolicy(Protocol):
    name: str

    def ready(self, depth: int, oldest_enqueued: float, limits: ModelLimits, now: float) -> bool: ...
    def ready_at(self, depth: int, oldest_enqueued: float, limits: ModelLimits) -> float | None: ...


class GreedyWindow:
    """Dispatch when ``max_batch_size`` jobs wait, or when the oldest has waited ``max_wait_s``
    (immediately when the window is 0). The batch takes up to ``max_batch_size`` jobs."""

    name = "greedy"

    def ready(self, depth: int, oldest_enqueued: float, limits: ModelLimits, now: float) -> bool:
        if depth <= 0:
            return False
        return depth >= limits.max_batch_size or now >= oldest_enqueued + limits.max_wait_s

    def ready_at(self, depth: int, oldest_enqueued: float, limits: ModelLimits) -> float | None:
        """When ``ready`` turns true with no new arrivals (None: never, the queue is empty)."""
        if depth <= 0:
            return None
        if depth >= limits.max_batch_size:
            return float("-inf")
        return oldest_enqueued + limits.max_wait_s


BATCHING = {GreedyWindow.name: GreedyWindow}
