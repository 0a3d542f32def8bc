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

import heapq
from collections.abc import Iterable, Iterator

from sortedcontainers import SortedList

from .types import BatchKey, QueuedJob


def effective_rank(job: QueuedJob, now: float, aging_s: float) -> int:
    """A job is promoted one class for every ``aging_s`` it has waited, so ``low`` cannot starve:
    after 2·aging_s a low job competes as ``high`` and, being older, wins FIFO among highs."""
    if aging_s <= 0:
        return int(job.priority)
    promoted = int(max(0.0, now - job.enqueued_at) // aging_s)
    return max(0, int(job.priority) - promoted)


def order_key(job: QueuedJob, now: float, aging_s: float) -> tuple[int, float, str]:
    """Service order inside a queue without tenants (what the index keeps, as a 3-tuple)."""
    return (effective_rank(job, now, aging_s), job.enqueued_at, job.id)


def _promoted(priority: int, oldest: float, now: float, aging_s: float) -> int:
    if aging_s <= 0:
        return priority
    return max(0, priority - int(max(0.0, now - oldest) // aging_s))


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


def _fair_run(c: "_Class", rank: int) -> Iterator[tuple[tuple, str]]:
    return (((rank, v, t, i), i) for v, t, i in c.by_tag)  # the class ages as one


def _plain_run(c: "_Class", p: int, now: float, aging_s: float) -> Iterator[tuple[tuple, str]]:
    return (((_promoted(p, t, now, aging_s), 0.0, t, i), i) for _, t, i in c.by_tag)  # each by its own wait


class _Class:
    """The jobs of one priority class of one batch key: sorted by (tag, queue time, id) — service
    order inside the class, with or without tenants — in O(log n) per add and remove; and the
    class's oldest job (which ages the whole class in a fair queue) from a heap of queue times whose
    entries for jobs that left are skipped when they come to the top (and dropped in one pass once
    they are half the heap: amortized O(1), memory follows the live jobs)."""

    __slots__ = ("by_tag", "_times", "_live")

    def __init__(self) -> None:
        self.by_tag: SortedList = SortedList()
        self._times: list[tuple[float, str]] = []
        self._live: dict[str, float] = {}  # job id -> queue time

    def add(self, job: QueuedJob) -> None:
        self.by_tag.add((job.vstart, job.enqueued_at, job.id))
        heapq.heappush(self._times, (job.enqueued_at, job.id))
        self._live[job.id] = job.enqueued_at

    def remove(self, job: QueuedJob) -> None:
        self.by_tag.remove((job.vstart, job.enqueued_at, job.id))
        del self._live[job.id]
        if len(self._times) > 2 * len(self._live) + 16:
            self._times = [(t, i) for i, t in self._live.items()]
            heapq.heapify(self._times)

    def oldest(self) -> float:
        times, live = self._times, self._live
        while live.get(times[0][1]) != times[0][0]:
            heapq.heappop(times)
        return times[0][0]


class KeyedQueues:
    """Queued jobs grouped by batch key. Jobs of different keys are never mixed.

    The order index: each key keeps one ``_Class`` per priority class, each sorted by its service
    order (the order key of a class's jobs is monotone in (tag, queue time, id): in a queue without
    tenants every tag is 0 and a job's own aging only ever promotes older jobs; in a fair queue the
    whole class shares one rank). So the next job of a key is the best of at most three class heads,
    a key's service order is a merge of three sorted runs, and a job's position is a count, per
    key and class, of the entries before it: a bisection. No read or event sorts the queue."""

    def __init__(self) -> None:
        self._by_key: dict[BatchKey, dict[str, QueuedJob]] = {}
        self._key_of: dict[str, BatchKey] = {}
        self._per_model: dict[str, int] = {}
        self._keys_of_model: dict[str, set[BatchKey]] = {}
        self._classes: dict[BatchKey, dict[int, _Class]] = {}
        self._fair: dict[BatchKey, int] = {}  # jobs with a tenant per key (absent: none)
        self._oldest: dict[BatchKey, float] = {}  # cache; absent = recompute from the class heads
        # model -> tenant (None: jobs without one) -> [queued jobs, weight]: what admission weighs
        self._tenants: dict[str, dict[str | None, list]] = {}

    def __len__(self) -> int:
        return len(self._key_of)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._key_of

    def add(self, job: QueuedJob) -> None:
        self._by_key.setdefault(job.key, {})[job.id] = job
        self._key_of[job.id] = job.key
        classes = self._classes.setdefault(job.key, {})
        p = int(job.priority)
        if p not in classes:
            classes[p] = _Class()
        classes[p].add(job)
        old = self._oldest.get(job.key)
        if old is not None and job.enqueued_at < old:
            self._oldest[job.key] = job.enqueued_at
        self._per_model[job.key.model] = self._per_model.get(job.key.model, 0) + 1
        self._keys_of_model.setdefault(job.key.model, set()).add(job.key)
        if job.tenant is not None:
            self._fair[job.key] = self._fair.get(job.key, 0) + 1
        held = self._tenants.setdefault(job.key.model, {}).setdefault(job.tenant, [0, job.weight])
        held[0] += 1
        held[1] = job.weight

    def remove(self, job_id: str) -> QueuedJob:
        key = self._key_of.pop(job_id)
        bucket = self._by_key[key]
        job = bucket.pop(job_id)
        classes = self._classes[key]
        p = int(job.priority)
        classes[p].remove(job)
        if not classes[p].by_tag:
            del classes[p]
        if not bucket:
            del self._by_key[key]
            del self._classes[key]
            self._keys_of_model[key.model].discard(key)
            self._oldest.pop(key, None)
        elif self._oldest.get(key) == job.enqueued_at:
            del self._oldest[key]
        self._per_model[key.model] -= 1
        tenants = self._tenants[key.model]
        tenants[job.tenant][0] -= 1
        if not tenants[job.tenant][0]:
            del tenants[job.tenant]
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

    def tenant_load(self, model: str, tenant: str | None) -> tuple[int, float]:
        """(``tenant``'s jobs queued for ``model``, the summed weights of the other tenants with
        jobs queued for it): O(tenants present), whatever the depth."""
        held = self._tenants.get(model)
        if not held:
            return 0, 0.0
        entry = held.get(tenant)
        if len(held) == (1 if entry is not None else 0):
            return entry[0], 0.0  # alone (the fast path: one tenant, or none at all)
        return (0 if entry is None else entry[0]), sum(w for t, (_, w) in held.items() if t != tenant)

    def jobs(self, key: BatchKey) -> Iterable[QueuedJob]:
        return self._by_key.get(key, {}).values()

    def size(self, key: BatchKey) -> int:
        return len(self._by_key.get(key, ()))

    def oldest_enqueued(self, key: BatchKey) -> float:
        old = self._oldest.get(key)
        if old is None:
            old = self._oldest[key] = min(c.oldest() for c in self._classes[key].values())
        return old

    # ---- service order (the index) ---------------------------------------------------------------

    def _runs(self, key: BatchKey, now: float, aging_s: float) -> list[Iterator[tuple[tuple, str]]]:
        """One sorted run of (wide order key, job id) per priority class of ``key``."""
        fair = key in self._fair
        return [_fair_run(c, _promoted(p, c.oldest(), now, aging_s)) if fair else _plain_run(c, p, now, aging_s)
                for p, c in self._classes.get(key, {}).items()]

    def iter_ordered(self, key: BatchKey, now: float, aging_s: float) -> Iterator[QueuedJob]:
        """``key``'s jobs in service order, lazily: taking the first k costs O(k log n)."""
        bucket = self._by_key.get(key, {})
        classes = self._classes.get(key, {})
        if len(classes) == 1:  # one class: its run is the order (the common case)
            return (bucket[i] for _, _, i in next(iter(classes.values())).by_tag)
        return (bucket[i] for _, i in heapq.merge(*self._runs(key, now, aging_s)))

    def ordered(self, key: BatchKey, now: float, aging_s: float) -> list[QueuedJob]:
        return list(self.iter_ordered(key, now, aging_s))

    def head_order(self, key: BatchKey, now: float, aging_s: float) -> tuple:
        """The order key of the job ``key``'s queue serves next, comparable across keys: the best
        of its class heads."""
        fair = key in self._fair
        best = None
        for p, c in self._classes[key].items():
            v, t, i = c.by_tag[0]
            k = ((_promoted(p, c.oldest(), now, aging_s), v, t, i) if fair
                 else (_promoted(p, t, now, aging_s), 0.0, t, i))
            if best is None or k < best:
                best = k
        return best

    def first(self, key: BatchKey, now: float, aging_s: float) -> QueuedJob:
        """The job ``key``'s queue serves next."""
        return self._by_key[key][self.head_order(key, now, aging_s)[3]]

    def order_of(self, job_id: str, now: float, aging_s: float) -> tuple:
        """A queued job's wide order key (what ``head_order`` compares)."""
        job = self._by_key[self._key_of[job_id]][job_id]
        p = int(job.priority)
        if job.key in self._fair:
            return (_promoted(p, self._classes[job.key][p].oldest(), now, aging_s), job.vstart,
                    job.enqueued_at, job.id)
        return (_promoted(p, job.enqueued_at, now, aging_s), 0.0, job.enqueued_at, job.id)

    def position(self, job_id: str, now: float, aging_s: float) -> int:
        """How many queued jobs of the same model come before ``job_id`` in service order (across
        keys, by each job's own key, as ``all_ordered``): per key and class, a bisection of its sorted
        run — O(keys · log² n), independent of how many jobs are queued elsewhere."""
        target = self.order_of(job_id, now, aging_s)
        before = 0
        for key in self._keys_of_model[self._key_of[job_id].model]:
            fair = key in self._fair
            for p, c in self._classes[key].items():
                if fair:
                    r = _promoted(p, c.oldest(), now, aging_s)
                    if r < target[0]:
                        before += len(c.by_tag)
                    elif r == target[0]:
                        before += c.by_tag.bisect_left(target[1:])
                else:
                    run = c.by_tag  # order keys (rank(t), 0, t, id) rise along it: bisect by predicate
                    lo, hi = 0, len(run)
                    while lo < hi:
                        mid = (lo + hi) // 2
                        _, t, i = run[mid]
                        if (_promoted(p, t, now, aging_s), 0.0, t, i) < target:
                            lo = mid + 1
                        else:
                            hi = mid
                    before += lo
        return before

    def all_ordered(self, now: float, aging_s: float) -> list[QueuedJob]:
        """Every queued job in service order (approximately, across keys: by each job's own key).
        O(n log n): for tests and tools, never per event."""
        merged = heapq.merge(*(run for key in self._by_key for run in self._runs(key, now, aging_s)))
        return [self._by_key[self._key_of[i]][i] for _, i in merged]
