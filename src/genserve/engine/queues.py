"""Per-batch-key queues ordered by priority class with aging, and fair share across tenants.

Fair share is start-time fair queuing (SFQ) with one unit of cost per job: a tenant's job gets the
virtual start tag ``max(V, F[tenant])`` and moves ``F[tenant]`` on by ``1 / weight``; ``V`` is the
tag of the last job dispatched. Inside a priority class jobs are served by tag, so a tenant with a
burst of 1000 jobs has tags far ahead of a steady trickle's, whose jobs go next. Jobs without a
tenant keep tag 0 and the original order (priority, queue time, id): the fast path, and the exact
order of before when no job has a tenant.

Aging promotes a job by its own wait. With fair share that would undo the share (the burst's old
jobs would be promoted past the trickle's new ones), so in a queue holding tenants' jobs a whole
class is promoted together, by the wait of its oldest job: classes age, tenants share.
"""
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
    """Service order inside a queue without tenants (the hot path: kept a 3-tuple)."""
    return (effective_rank(job, now, aging_s), job.enqueued_at, job.id)


def _wide(k: tuple[int, float, str]) -> tuple[int, float, float, str]:
    """An ``order_key`` comparable with a fair-share key (tag 0: no tenant)."""
    return (k[0], 0.0, k[1], k[2])


def _promoted(priority: int, oldest: float, now: float, aging_s: float) -> int:
    if aging_s <= 0:
        return priority
    return max(0, priority - int(max(0.0, now - oldest) // aging_s))


def fair_ordered(jobs: Iterable[QueuedJob], now: float, aging_s: float) -> list[tuple[tuple, QueuedJob]]:
    """(order key, job) in service order for a queue with tenants' jobs: classes promoted by their
    oldest job's wait, then tags, then queue time."""
    jobs = list(jobs)
    oldest: dict[int, float] = {}
    for j in jobs:
        p = int(j.priority)
        if j.enqueued_at < oldest.get(p, float("inf")):
            oldest[p] = j.enqueued_at
    rank = {p: _promoted(p, t, now, aging_s) for p, t in oldest.items()}
    keyed = [((rank[int(j.priority)], j.vstart, j.enqueued_at, j.id), j) for j in jobs]
    keyed.sort(key=lambda kj: kj[0])
    return keyed


class FairShare:
    """The virtual clock and each tenant's finish tag (SFQ). One per engine: tags are comparable
    across models, so a tenant's burst on one model is charged against its share everywhere."""

    def __init__(self) -> None:
        self.v = 0.0
        self.finish: dict[str, float] = {}

    def tag(self, job: QueuedJob) -> None:
        assert job.tenant is not None
        start = max(self.v, self.finish.get(job.tenant, 0.0))
        self.finish[job.tenant] = start + 1.0 / job.weight
        job.vstart = start

    def served(self, job: QueuedJob) -> None:
        if job.vstart > self.v:
            self.v = job.vstart


class KeyedQueues:
    """Queued jobs grouped by batch key. Jobs of different keys are never mixed."""

    def __init__(self) -> None:
        self._by_key: dict[BatchKey, dict[str, QueuedJob]] = {}
        self._key_of: dict[str, BatchKey] = {}
        self._per_model: dict[str, int] = {}
        self._oldest: dict[BatchKey, float] = {}  # cache; absent = recompute
        self._fair: dict[BatchKey, int] = {}  # jobs with a tenant per key (absent: none)

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
        if job.tenant is not None:
            self._fair[job.key] = self._fair.get(job.key, 0) + 1

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
        if job.tenant is not None:
            left = self._fair[key] - 1
            if left:
                self._fair[key] = left
            else:
                del self._fair[key]
        return job

    def depth(self, model: str) -> int:
        return self._per_model.get(model, 0)

    def keys(self) -> list[BatchKey]:
        return list(self._by_key)

    def jobs(self, key: BatchKey) -> Iterable[QueuedJob]:
        return self._by_key.get(key, {}).values()

    def ordered(self, key: BatchKey, now: float, aging_s: float) -> list[QueuedJob]:
        if key in self._fair:
            return [j for _, j in fair_ordered(self.jobs(key), now, aging_s)]
        return sorted(self.jobs(key), key=lambda j: order_key(j, now, aging_s))

    def head_order(self, key: BatchKey, now: float, aging_s: float) -> tuple:
        """The order key of the job ``key``'s queue serves next, comparable across keys."""
        if key in self._fair:
            return fair_ordered(self.jobs(key), now, aging_s)[0][0]
        return _wide(min(order_key(j, now, aging_s) for j in self.jobs(key)))

    def size(self, key: BatchKey) -> int:
        return len(self._by_key.get(key, ()))

    def oldest_enqueued(self, key: BatchKey) -> float:
        old = self._oldest.get(key)
        if old is None:
            old = self._oldest[key] = min(j.enqueued_at for j in self.jobs(key))
        return old

    def all_ordered(self, now: float, aging_s: float) -> list[QueuedJob]:
        """Every queued job in service order (approximately, across keys: by each job's own key)."""
        keyed: list[tuple[tuple, QueuedJob]] = []
        for key in self._by_key:
            if key in self._fair:
                keyed += fair_ordered(self.jobs(key), now, aging_s)
            else:
                keyed += [(_wide(order_key(j, now, aging_s)), j) for j in self.jobs(key)]
        keyed.sort(key=lambda kj: kj[0])
        return [j for _, j in keyed]
