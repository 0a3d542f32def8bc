"""Per-batch-key queues ordered by priority class with aging."""
from __future__ import annotations

from collections.abc import Iterable

from .types import BatchKey, QueuedJob


def effective_rank(job: QueuedJob, now: float, aging_s: float) -> int:
    """A job is promoted one class for every ``aging_s`` it has waited, so ``low`` cannot starve:
    after 2·aging_s a low job competes as ``high`` and, being older, wins FIFO among highs."""
    if aging_s <= 0:
        return int(job.priority)
    promoted = int(max(0.0, now - job.enqueued_at) // aging_s)
    return max(0, int(job.priority) - promoted)


def order_key(job: QueuedJob, now: float, aging_s: float) -> tuple[int, float, str]:
    return (effective_rank(job, now, aging_s), job.enqueued_at, job.id)


class KeyedQueues:
    """Queued jobs grouped by batch key. Jobs of different keys are never mixed."""

    def __init__(self) -> None:
        self._by_key: dict[BatchKey, dict[str, QueuedJob]] = {}
        self._key_of: dict[str, BatchKey] = {}
        self._per_model: dict[str, int] = {}
        self._oldest: dict[BatchKey, float] = {}  # cache; absent = recompute

    def __len__(self) -> int:
        return len(self._key_of)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._key_of

    def add(self, job: QueuedJob) -> None:
        self._by_key.setdefault(job.key, {})[job.id] = job
        self._key_of[job.id] = job.key
        old = self._oldest.get(job.key)
        if old is not None and job.enqueued_at < old:
            self._oldest[job.key] = job.enqueued_at
        self._per_model[job.key.model] = self._per_model.get(job.key.model, 0) + 1

    def remove(self, job_id: str) -> QueuedJob:
        key = self._key_of.pop(job_id)
        bucket = self._by_key[key]
        job = bucket.pop(job_id)
        if not bucket:
            del self._by_key[key]
            self._oldest.pop(key, None)
        elif self._oldest.get(key) == job.enqueued_at:
            del self._oldest[key]
        self._per_model[key.model] -= 1
        return job

    def depth(self, model: str) -> int:
        return self._per_model.get(model, 0)

    def keys(self) -> list[BatchKey]:
        return list(self._by_key)

    def jobs(self, key: BatchKey) -> Iterable[QueuedJob]:
        return self._by_key.get(key, {}).values()

    def ordered(self, key: BatchKey, now: float, aging_s: float) -> list[QueuedJob]:
        return sorted(self.jobs(key), key=lambda j: order_key(j, now, aging_s))

    def size(self, key: BatchKey) -> int:
        return len(self._by_key.get(key, ()))

    def oldest_enqueued(self, key: BatchKey) -> float:
        old = self._oldest.get(key)
        if old is None:
            old = self._oldest[key] = min(j.enqueued_at for j in self.jobs(key))
        return old

    def all_ordered(self, now: float, aging_s: float) -> list[QueuedJob]:
        everything = [j for bucket in self._by_key.values() for j in bucket.values()]
        return sorted(everything, key=lambda j: order_key(j, now, aging_s))
