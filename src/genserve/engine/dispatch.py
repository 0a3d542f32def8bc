"""Dispatch: turning ready queues into batches on workers. The placement policy picks a worker;
the residency manager says what must be evicted (or that nothing fits); the failure tracker caps a
batch that ran out of memory and keeps jobs off workers they failed on; the work model says how
long a busy warm worker will take. The only concern that reads every component, so it lives apart
from them and from the facade's event routing."""
from __future__ import annotations

import math
from itertools import chain, islice

from .failures import FailureTracker
from .fleet import Fleet
from .policies.adapters import AdapterResidency
from .policies.placement import PlacementPolicy
from .policies.preempt import Preemption
from .residency_manager import ResidencyManager
from .types import BatchKey, Decision, JoinBatch, PauseRunning, Priority, QueuedJob, RunBatch, WorkerState
from .waiting import Waiting
from .work import WorkModel

RECHECK_S = 1.0  # how soon to look again while a batch waits for a busy warm worker


class Dispatcher:
    def __init__(self, placement: PlacementPolicy, waiting: Waiting, fleet: Fleet, residency: ResidencyManager,
                 failures: FailureTracker, work: WorkModel, preemption: Preemption,
                 adapters: AdapterResidency | None = None) -> None:
        self.placement = placement
        self.adapters = adapters or AdapterResidency()
        self.preemption = preemption
        self.waiting, self.fleet, self.residency, self.failures, self.work = waiting, fleet, residency, failures, work
        self._waiting_on_warm = False  # a ready batch is holding out for a busy warm worker

    def dispatch_ready(self, now: float) -> list[Decision]:
        """Every ready batch that has a worker, best head job first."""
        out: list[Decision] = []
        self._waiting_on_warm = False
        blocked: set[BatchKey] = set()
        waiting = self.waiting
        while self.fleet.has_idle(self.failures.killing):
            ready = [k for k in waiting.keys() if k not in blocked and waiting.ready(k, now)]
            if not ready:
                break
            key = min(ready, key=lambda k: waiting.head_order(k, now))
            decisions = self.place(key, now)
            if decisions is None:
                blocked.add(key)
            else:
                out += decisions
        if blocked and not any(isinstance(d, RunBatch) for d in out) and self._quiescent():
            # Every worker is idle with nothing in flight, yet nothing fits because every resident
            # model has queued work. No event will ever change that: let the best batch evict them.
            key = min(blocked, key=lambda k: waiting.head_order(k, now))
            placed = self.place(key, now, protect_queued=False)
            if placed is None:
                # Still nothing: warm-pool copies fill every worker the batch could use. A warm pool
                # is a preference, an accepted job a commitment: a copy makes room (the warm pool
                # loads it again once there is room) rather than the job waiting forever.
                placed = self.place(key, now, protect_queued=False, evict_pinned=True)
            out += placed or []
        return out

    def join_running(self, now: float) -> list[Decision]:
        """Step-level batching: waiting jobs join a running set of their key at its next step,
        best first, while the set has room and its working memory fits (evicting models idle on
        that worker, as a new batch would; the worker unloads them between steps).
        Not while an idle worker holds the model loaded: a set of its own there runs in parallel
        (``dispatch_ready`` places it). Each key's queue is looked at on its own, so a job that
        cannot join never holds back another key's."""
        out: list[Decision] = []
        killing = self.failures.killing
        protected: set[str] | None = None
        for batch in list(self.fleet.running.values()):
            key = batch.key
            limits = self.waiting.models[key.model]
            room = limits.max_batch_size - len(batch.jobs)
            if not limits.stepped(key) or batch.worker in killing or not self.waiting.queues.size(key):
                continue
            if room <= 0:
                out += self._preempt(batch, now)
                room = limits.max_batch_size - len(batch.jobs)
                if room <= 0:
                    continue
            worker = self.fleet.workers.get(batch.worker)
            if worker is None or key.model not in worker.resident or self._idle_warm(key.model, killing):
                continue  # (not resident: its load failed, and the set will fail with it)
            if protected is None:
                protected = self.waiting.protected_models()
            if self.residency.fit(worker, key, len(batch.jobs) + 1, protected) is None:
                continue  # not even one more fits (checked before ordering a long queue)
            if self.failures.any_alone and any(j.alone for j in batch.jobs.values()):
                continue  # a job isolated after a failed batch keeps its set to itself
            jobs = self.waiting.ordered(key, now)  # lazily: only the first ``room`` are looked at
            if self.failures.any_avoid:
                jobs = (j for j in jobs if self._allowed(j, [worker]))
            if self.failures.any_alone:
                jobs = (j for j in jobs if not j.alone)
            jobs = list(islice(jobs, room))
            n = len(jobs)
            while n and self.residency.fit(worker, key, len(batch.jobs) + n, protected) is None:
                n -= 1
            if not n:
                continue
            out += self.residency.evict(worker, self.residency.fit(worker, key, len(batch.jobs) + n, protected) or [])
            chosen = self._adapters_fit(jobs[:n], batch.jobs.values())
            for job in chosen:
                self.waiting.take(job.id, served=True)
            if not self.waiting.depth(key.model):
                self.residency.invalidate()
            self.fleet.join(batch, chosen)
            worker.resident[key.model].last_used = now
            out.append(JoinBatch(batch.id, worker.id, key, tuple(j.id for j in chosen),
                                 self._adapters_for(worker, [*batch.jobs.values()])))
        return out

    def _preempt(self, batch, now: float) -> list[Decision]:
        """A full set and a ``high`` job waiting for its shape: pause a ``low`` job of the set."""
        if not any(j.priority == Priority.LOW for j in batch.jobs.values()):
            return []  # nothing to displace: no need to look at the queue
        head = self.waiting.first(batch.key, now)  # in service order (priority, aging, fair share)
        victim = self.preemption.victim(batch, head, self.failures.cancel_sent)
        if victim is None:
            return []
        self.fleet.job_left(victim.id)
        self.preemption.start(victim, batch)
        return [PauseRunning(batch.worker, batch.id, (victim.id,))]

    def _idle_warm(self, model: str, killing) -> bool:
        return any(w.idle and w.id not in killing and (r := w.resident.get(model)) is not None and not r.loading
                   for w in self.fleet.workers.values())

    def place(self, key: BatchKey, now: float, *, protect_queued: bool = True,
              evict_pinned: bool = False) -> list[Decision] | None:
        """Choose a worker for ``key``'s batch, size the batch to what fits, and plan evictions,
        the load if needed, and the run. None: not now."""
        limits = self.waiting.models[key.model]
        head = self.waiting.first(key, now)
        killing = self.failures.killing
        # Only workers the head job has not failed on (while one is up), and none being killed.
        candidates = self._allowed(head, [w for w in self.fleet.workers.values() if w.id not in killing])
        if not candidates:
            return None
        protected = self.waiting.protected_models() if protect_queued else set()
        backlog = math.ceil(self.waiting.depth(key.model) / limits.max_batch_size)

        def evictions(w: WorkerState) -> list[str] | None:
            return self.residency.fit(w, key, 1, protected, evict_pinned=evict_pinned)

        # the adapters of the jobs this batch would take: a worker holding them is preferred
        wanted = {i for j in islice(self.waiting.ordered(key, now), limits.max_batch_size) for i in j.loras}
        worker = self.placement.choose(key.model, candidates, evictions,
                                       lambda w: w.busy.utilization(now), backlog,
                                       lambda w: self.work.time_left(self.fleet.running.get(w.batch_id or ""), now),
                                       self.work.load_seconds(key.model),
                                       affinity=lambda w: self.adapters.held(w.id, wanted) if wanted else 0)
        if worker is None:
            if any(key.model in w.resident and not w.idle for w in self.fleet.workers.values()):
                self._waiting_on_warm = True
            return None
        size = self.failures.batch_cap(key, worker.id, limits.max_batch_size)
        jobs = self.waiting.ordered(key, now)  # lazily: only the first ``size`` are looked at
        if self.failures.any_avoid:
            jobs = (j for j in jobs if self._allowed(j, [worker]))
        if self.failures.any_alone:  # a job to run alone runs alone; the others batch without it
            first = next(jobs, None)
            if first is not None and first.alone:
                jobs = iter([first])
            else:
                jobs = (j for j in chain([first] if first is not None else [], jobs) if not j.alone)
        jobs = list(islice(jobs, size))
        # The largest prefix of the batch that fits; shrinking beats an OOM.
        n = len(jobs)
        while n > 1 and self.residency.fit(worker, key, n, protected, evict_pinned=evict_pinned) is None:
            n -= 1
        evict = self.residency.fit(worker, key, n, protected, evict_pinned=evict_pinned)
        assert evict is not None
        out = self.residency.evict(worker, evict)
        needs_load = key.model not in worker.resident
        if needs_load:
            out += self.residency.load(worker, key.model, now, "batch")
        chosen = self._adapters_fit(jobs[:n])
        for job in chosen:
            self.waiting.take(job.id, served=True)
        if not self.waiting.depth(key.model):
            self.residency.invalidate()  # copies elsewhere lost their protection
        batch = self.fleet.start(key, chosen, worker, now)
        self.failures.watch(batch.id, now)
        resident = worker.resident[key.model]
        resident.last_used = now
        out.append(RunBatch(batch.id, worker.id, key, tuple(j.id for j in chosen), needs_load, resident.loading,
                            self._adapters_for(worker, chosen)))
        return out

    def _adapters_fit(self, jobs: list[QueuedJob], running=()) -> list[QueuedJob]:
        """The longest prefix of ``jobs`` whose LoRA adapters (with those of ``running``) fit the
        worker's adapter memory together; the first job always (its adapters alone are its need)."""
        if not any(j.loras for j in jobs):
            return jobs
        ids = {i for j in running for i in j.loras}
        out = []
        for j in jobs:
            if out and not self.adapters.fits(ids | set(j.loras)):
                break
            ids |= set(j.loras)
            out.append(j)
        return out

    def _adapters_for(self, worker: WorkerState, jobs) -> tuple[str, ...]:
        """Plan the adapters ``jobs`` need on ``worker``: what it must evict (LRU) for them."""
        ids = [i for j in jobs for i in j.loras]
        if not ids:
            return ()
        evict = self.adapters.evictions(worker.id, ids)
        self.adapters.use(worker.id, ids, evict)
        return tuple(evict)

    def next_times(self, now: float) -> list[float]:
        """When a batching window closes (while a worker is free to take the batch)."""
        if not self.fleet.has_idle(self.failures.killing):
            return []
        times: list[float] = []
        avoid = self.failures.any_avoid
        idle = self.fleet.idle(self.failures.killing) if avoid else []
        for key in self.waiting.keys():
            if avoid and not self._allowed(self.waiting.first(key, now), idle):
                continue  # waits for a worker it has not failed on: an event, not a time
            t = self.waiting.ready_at(key)
            if t is not None and t > now:
                times.append(t)
        if self._waiting_on_warm:
            times.append(now + RECHECK_S)  # utilization of the busy warm workers keeps rising
        return times

    def _allowed(self, job: QueuedJob, workers: list[WorkerState]) -> list[WorkerState]:
        return self.failures.allowed(job, workers, self.fleet.workers, self.residency.could_host)

    def _quiescent(self) -> bool:
        return (bool(self.fleet.workers) and not self.failures.killing
                and all(w.idle and not w.loading for w in self.fleet.workers.values()))
