"""Waiting jobs: the keyed queues (priority classes with aging), jobs parked until a retry's
backoff is over, and the deadline heap. The one owner of "who is waiting, and in what order"."""
from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping

from .policies.batching import BatchingPolicy
from .queues import FairShare, KeyedQueues
from .types import BatchKey, ModelLimits, QueuedJob


class Waiting:
    def __init__(self, models: Mapping[str, ModelLimits], batching: BatchingPolicy, aging_s: float,
                 fair_share: bool = True) -> None:
        self.models = models
        self.batching = batching
        self.aging_s = aging_s
        self.fair = FairShare() if fair_share else None
        self.queues = KeyedQueues()
        self._parked: dict[str, tuple[float, QueuedJob]] = {}  # job id -> (runnable from, job)
        self._deadlines: list[tuple[float, str]] = []  # heap of (deadline, job id); stale entries skipped

    def __contains__(self, job_id: str) -> bool:
        """Waiting to run: in a queue, or parked until its retry backoff is over."""
        return job_id in self.queues or job_id in self._parked

    def __bool__(self) -> bool:
        return bool(self.queues) or bool(self._parked)

    # ---- entering and leaving -----------------------------------------------------------------------

    def enter(self, job: QueuedJob) -> None:
        """A new (or restored) job joins its queue; its deadline, if any, starts counting. A job
        with a tenant gets its fair-share tag (kept through retries: its place in line)."""
        if job.tenant is not None:
            if self.fair is None:
                job.tenant = None  # fair share off: served as if it had no tenant
            else:
                self.fair.tag(job)
        self.queues.add(job)
        if job.deadline is not None:
            heapq.heappush(self._deadlines, (job.deadline, job.id))

    def requeue(self, job: QueuedJob, at: float, now: float) -> None:
        """A job whose attempt failed waits again: in its queue at once, or parked until ``at``."""
        if at <= now:
            self.queues.add(job)
        else:
            self._parked[job.id] = (at, job)

    def take(self, job_id: str, served: bool = False) -> QueuedJob:
        """Remove a waiting job (canceled, failed, or — ``served`` — dispatched)."""
        if job_id in self._parked:
            return self._parked.pop(job_id)[1]
        job = self.queues.remove(job_id)
        if served and job.tenant is not None and self.fair is not None:
            self.fair.served(job)
        return job

    def unpark_due(self, now: float) -> None:
        for job_id, (at, job) in list(self._parked.items()):
            if at <= now:
                del self._parked[job_id]
                self.queues.add(job)

    def due_deadlines(self, now: float) -> list[str]:
        """Job ids whose deadline has come (popped: each is reported once). Some may have ended
        already; the caller decides what each still means."""
        due = []
        while self._deadlines and self._deadlines[0][0] <= now:
            due.append(heapq.heappop(self._deadlines)[1])
        return due

    def next_times(self, pending: Callable[[str], bool], live: int = 0) -> list[float]:
        """Parked jobs' wake-up times and the earliest deadline still ``pending``. ``live``: how
        many jobs could still have one (queued or running, parked ones are added here)."""
        times = [at for at, _ in self._parked.values()]
        if len(self._deadlines) > 64 and len(self._deadlines) > 2 * (live + len(self._parked)):
            # Jobs that finished long before their deadline leave stale entries: drop them once the
            # heap is twice what is live (amortized O(1)), so memory follows the live jobs only.
            self._deadlines = [e for e in self._deadlines if pending(e[1])]
            heapq.heapify(self._deadlines)
        heap = self._deadlines
        while heap and not pending(heap[0][1]):
            heapq.heappop(heap)  # the job finished or left: its deadline no longer matters
        if heap:
            times.append(heap[0][0])
        return times

    # ---- reading ----------------------------------------------------------------------------------

    def keys(self) -> list[BatchKey]:
        return self.queues.keys()

    def jobs(self, key: BatchKey) -> Iterable[QueuedJob]:
        return self.queues.jobs(key)

    def depth(self, model: str) -> int:
        return self.queues.depth(model)

    def ordered(self, key: BatchKey, now: float) -> Iterator[QueuedJob]:
        """``key``'s jobs in service order, lazily (take what you need: no full sort)."""
        return self.queues.iter_ordered(key, now, self.aging_s)

    def first(self, key: BatchKey, now: float) -> QueuedJob:
        """The job ``key``'s queue serves next."""
        return self.queues.first(key, now, self.aging_s)

    def head_order(self, key: BatchKey, now: float) -> tuple:
        return self.queues.head_order(key, now, self.aging_s)

    def ready(self, key: BatchKey, now: float) -> bool:
        return self.batching.ready(self.queues.size(key), self.queues.oldest_enqueued(key), self.models[key.model], now)

    def ready_at(self, key: BatchKey) -> float | None:
        return self.batching.ready_at(self.queues.size(key), self.queues.oldest_enqueued(key), self.models[key.model])

    def tenant_load(self, model: str, tenant: str | None) -> tuple[int, float]:
        """(``tenant``'s jobs queued for ``model``, the other tenants' summed weights): what
        admission weighs. With fair share off every job counts as one tenant's: the plain limit."""
        return self.queues.tenant_load(model, tenant if self.fair is not None else None)

    def protected_models(self) -> set[str]:
        """Models with queued work: never evicted or idle-unloaded (no needless reload)."""
        return {k.model for k in self.queues.keys()}

    def position(self, job_id: str, now: float) -> int | None:
        """0-based position among all queued jobs of the same model, in service order. Computed
        from the order index in O(keys · log² n): a status read never sorts the queue."""
        if job_id not in self.queues:
            return None
        return self.queues.position(job_id, now, self.aging_s)
