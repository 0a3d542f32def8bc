"""The engine facade: every scheduling decision, as a pure function of events and ``now``.

It never reads a clock, sleeps, starts threads or does I/O. Drivers (the asyncio server, the
simulator, unit tests) feed it events and carry out the decisions it returns. The state lives in
components, each its only owner (DESIGN §5):

  waiting    Waiting           queues, parked retries, deadlines, aging
  fleet      Fleet             workers, running batches, batch ids
  residency  ResidencyManager  resident models, memory fit, idle unloads, warm pools, preloads
  failures   FailureTracker    retries, OOM caps, cancels, liveness watches, kills
  work       WorkModel         device-second estimates, arrival rate
  autoscale  Autoscaler + ScaleState (pure ``decide``)

The facade routes events to them, runs ``step`` as an ordered pipeline and makes the placement
decision; ``next_deadline`` is the earliest time any component could decide something new.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from .autoscale import FleetSnapshot, ScaleState
from .batching import BATCHING
from .errors import ErrorCode
from .failures import FailureTracker
from .fleet import Fleet
from .placement import PLACEMENT
from .residency import RESIDENCY
from .residency_manager import ResidencyManager
from .retry import RetryPolicy
from .settings import EngineSettings
from .types import (Admission, BatchKey, CancelRunning, Decision, FailJob, JobDequeued, ModelLimits, Priority,
                    QueuedJob, RetireWorker, RetryJob, RunBatch, RunningBatch, ScaleTo, WorkerState)
from .waiting import Waiting
from .work import WorkModel

RECHECK_S = 1.0  # how soon to look again while a batch waits for a busy warm worker


class Engine:
    def __init__(self, models: Mapping[str, ModelLimits] | EngineSettings, *, max_attempts: int | None = None,
                 **settings) -> None:
        """``Engine(settings)``, or ``Engine(models, **EngineSettings fields)`` (``max_attempts``:
        shorthand for the default retry policy with that many attempts)."""
        if isinstance(models, EngineSettings):
            s = models
        else:
            if max_attempts is not None and "retry" not in settings:
                settings["retry"] = RetryPolicy(max_attempts=max_attempts)
            s = EngineSettings(dict(models), **settings)
        self.settings = s
        self.models = s.models
        self.placement = PLACEMENT[s.placement](s.saturation)
        self.waiting = Waiting(self.models, BATCHING[s.batching](), s.aging_s)
        self.fleet = Fleet(s.batch_id_prefix)
        self.work = WorkModel(self.models)
        self.residency = ResidencyManager(self.models, self.fleet, RESIDENCY[s.residency](), self.work.last_arrival,
                                          preload=s.preload, preload_min_probability=s.preload_min_probability)
        self.failures = FailureTracker(s.retry, s.liveness)
        self.autoscaler = s.autoscaler
        self.scale = self.autoscaler.initial_state() if self.autoscaler is not None else ScaleState()
        self.target_devices: int | None = None  # the last ScaleTo sent (None: ask the provider again)
        self._next_scale_at: float | None = None
        self._waiting_on_warm = False  # a ready batch is holding out for a busy warm worker

    @property
    def workers(self) -> Mapping[str, WorkerState]:
        return self.fleet.workers

    def running_batch(self, batch_id: str) -> RunningBatch | None:
        return self.fleet.running.get(batch_id)

    def batches_on(self, worker_id: str) -> list[RunningBatch]:
        return self.fleet.batches_on(worker_id)

    # ---- jobs ------------------------------------------------------------------------------------

    def admit(self, model: str) -> Admission:
        """Would a new job for ``model`` be accepted now? Asked before the job is persisted."""
        limits = self.models.get(model)
        if limits is None:
            return Admission(False, "unknown_model")
        depth = self.waiting.depth(model)
        if depth >= limits.max_queue:
            return Admission(False, "queue_full", self.work.drain_estimate(model, depth, len(self.fleet.workers)))
        return Admission(True)

    def submit(self, job_id: str, key: BatchKey, priority: Priority, now: float, *, force: bool = False,
               deadline: float | None = None, attempts: int = 0) -> Admission:
        """Queue a job. ``force`` skips the queue limit: used when re-entering jobs that were already
        accepted (server restart) — an accepted job is never turned away later. ``deadline``: fail
        it with ``timeout`` if it has not finished by then; ``attempts``: failed attempts so far."""
        adm = self.admit(key.model)
        if not adm.accepted and not (force and adm.reason == "queue_full"):
            return adm
        if job_id in self.waiting or self.fleet.batch_of(job_id) is not None:
            return Admission(True)  # idempotent
        self.waiting.enter(QueuedJob(job_id, key, priority, now, attempts=attempts, deadline=deadline))
        self.work.arrived(key, now, new=not force)
        if not force and self.residency.predictor is not None:
            self.residency.predictor.observe(key.model, now)
        return Admission(True)

    def cancel(self, job_id: str, now: float) -> list[Decision]:
        if job_id in self.waiting:
            self._take_waiting(job_id)
            return [JobDequeued(job_id, ErrorCode.CANCELED)]
        batch_id = self.fleet.batch_of(job_id)
        if batch_id is not None and not self.failures.cancel_sent(job_id):
            self.failures.send_cancel(job_id)
            self.failures.stop_requested(batch_id, now)
            return [CancelRunning(self.fleet.running[batch_id].worker, batch_id, (job_id,))]
        return []

    def is_queued(self, job_id: str) -> bool:
        """Waiting to run: in a queue, or waiting out a retry backoff."""
        return job_id in self.waiting

    def queue_position(self, job_id: str, now: float) -> int | None:
        return self.waiting.position(job_id, now)

    def queue_depth(self, model: str) -> int:
        return self.waiting.depth(model)

    def queued(self) -> int:
        return len(self.waiting.queues)

    def has_pending(self) -> bool:
        """Any job queued, waiting out a retry backoff, or running."""
        return bool(self.waiting) or bool(self.fleet.running)

    # ---- workers, batches, models ------------------------------------------------------------------

    def worker_up(self, worker_id: str, now: float, capacity: int | None = None) -> None:
        self.fleet.up(worker_id, capacity)
        self.failures.heard(worker_id, now)

    def worker_seen(self, worker_id: str, now: float) -> None:
        """Any message from the worker (a heartbeat included): it is alive."""
        if worker_id in self.fleet.workers:
            self.failures.heard(worker_id, now)

    def worker_down(self, worker_id: str, now: float) -> list[Decision]:
        """A worker vanished (crashed, or killed on our request). Each of its running jobs has a
        failed attempt — ``worker_crashed``, or the code we killed it for — and goes through the
        retry policy: back to the queue (keeping its place in line) or failed."""
        code, message = self.failures.worker_gone(worker_id)
        if self.autoscaler is not None and worker_id in self.fleet.workers:
            self.target_devices = None  # a device was lost: the next tick asks the provider again
        out: list[Decision] = []
        for batch in self.fleet.batches_on(worker_id):
            self._release(batch.id, now)
            out += self._fail_attempts(batch.jobs.values(), worker_id, code, message, now)
        self.fleet.remove(worker_id)
        return out

    def batch_progress(self, batch_id: str, now: float) -> None:
        """The batch moved (model loaded, inference started, a step, an output): not hung."""
        batch = self.fleet.running.get(batch_id)
        if batch is not None:
            self.failures.progress(batch_id, batch.worker, now)

    def job_ended(self, job_id: str, now: float) -> None:
        """A job of a running batch reached its outcome (output written, or canceled) before the
        batch ended: whatever happens to the batch later, this job is not run again."""
        if self.fleet.job_left(job_id) is not None:
            self.failures.job_ended(job_id)

    def batch_finished(self, batch_id: str, now: float, peak_bytes: int = 0) -> None:
        """The worker finished a batch (whatever each job's outcome) and is idle again.
        ``peak_bytes``: the working memory the worker measured for it (0 = not measured)."""
        batch = self._release(batch_id, now)
        if batch is not None:
            self.residency.memory.observe_batch(batch.key, batch.size, peak_bytes)
            self.work.batch_done(batch.key, batch.size, max(0.0, now - batch.started_at))

    def batch_failed(self, batch_id: str, code: str, message: str, now: float) -> list[Decision]:
        """The worker reported the whole batch failed (and is idle again). Out of memory with more
        than one job: the batch size is remembered as too large for this shape on this worker and
        the jobs are requeued to run in smaller batches, without using up an attempt. Otherwise
        each job has a failed attempt and goes through the retry policy."""
        batch = self._release(batch_id, now)
        if batch is None:
            return []
        if code == ErrorCode.MODEL_LOAD_FAILED:
            self.model_load_failed(batch.worker, batch.key.model, now)
        smaller = self.failures.retry.split(batch.size, code)
        if smaller is None:
            return self._fail_attempts(batch.jobs.values(), batch.worker, code, message, now)
        self.failures.out_of_memory(batch.key, batch.worker, smaller)
        out: list[Decision] = []
        for job in batch.jobs.values():
            if not self.failures.canceled(job.id, out):
                self.waiting.requeue(job, now, now)
                out.append(RetryJob(job.id, code, f"{message}; retrying in batches of ≤ {smaller}", job.attempts,
                                    now, job.key.model, counted=False))
        return out

    def model_loaded(self, worker_id: str, model: str, nbytes: int, now: float) -> None:
        """A worker finished loading ``model``; ``nbytes`` is what it measured it holds."""
        took = self.residency.loaded(worker_id, model, nbytes, now)
        if took is not None:
            self.work.load_done(model, took)

    def model_load_failed(self, worker_id: str, model: str, now: float) -> None:
        self.residency.load_failed(worker_id, model, now)

    def request_load(self, model: str, now: float, worker_id: str | None = None, *, pin: bool = False) -> list[Decision]:
        """Operator (or warm pool) asks for ``model`` to be loaded. Returns [] when no worker can."""
        return self.residency.request_load(model, now, self.waiting.protected_models(), self.failures.killing,
                                           worker_id, pin=pin)

    def request_unload(self, model: str, now: float, worker_id: str | None = None) -> list[Decision]:
        return self.residency.request_unload(model, worker_id)

    def job_work(self, key: BatchKey) -> float:
        return self.work.job_work(key)

    def fleet_snapshot(self, now: float) -> FleetSnapshot:
        w = self.waiting
        queued = sum(self.work.job_work(k) * sum(1 for _ in w.jobs(k)) for k in w.keys())
        up = len(self.fleet.workers)
        return FleetSnapshot(now, up, max(0, (self.target_devices or 0) - up),
                             sum(1 for x in self.fleet.workers.values() if not x.idle), queued,
                             self.work.running_work(self.fleet.running.values(), now), self.work.arrival_rate(now),
                             max((m.min_warm for m in self.models.values()), default=0))

    # ---- the decision ----------------------------------------------------------------------------

    def step(self, now: float) -> list[Decision]:
        """Expire what is due, unload what has idled out, autoscale, fill warm pools, dispatch
        every ready batch that has a worker (best first), fail what can never fit, then preload."""
        out: list[Decision] = self._expire(now)
        out += self.residency.idle_unloads(now, self.waiting.protected_models())
        if self.autoscaler is not None:
            out += self._autoscale(now)
        out += self.residency.fill_warm_pools(now, self.waiting.protected_models(), self.failures.killing)
        out += self._dispatch_ready(now)
        for key, need, biggest in self.residency.unplaceable(self.waiting.keys()):
            for job in list(self.waiting.jobs(key)):
                self._take_waiting(job.id)
                out.append(FailJob(job.id, ErrorCode.OUT_OF_MEMORY, f"{key.model} at {key.width}x{key.height} needs "
                                   f"~{need} bytes; the largest worker has {biggest}"))
        out += self.residency.preload(now, self.fleet.idle(self.failures.killing), self.waiting.protected_models(),
                                      self.work.last_key)
        return out

    def next_deadline(self, now: float) -> float | None:
        """When ``step`` could next decide something without a new event (None: only events matter)."""
        times = self.waiting.next_times(self._deadline_pending) + self.failures.next_times(self.fleet.running.values())
        times += self.residency.next_times(now, self.waiting.protected_models())
        if self.fleet.has_idle(self.failures.killing):
            avoid = self.failures.any_avoid
            idle = self.fleet.idle(self.failures.killing) if avoid else []
            for key in self.waiting.keys():
                if avoid and not self._allowed(self.waiting.ordered(key, now)[0], idle):
                    continue  # waits for a worker it has not failed on: an event, not a time
                t = self.waiting.ready_at(key)
                if t is not None and t > now:
                    times.append(t)
            if self._waiting_on_warm:
                times.append(now + RECHECK_S)  # utilization of the busy warm workers keeps rising
        if self.autoscaler is not None:
            times.append(max(now, self._next_scale_at if self._next_scale_at is not None else now))
        return max(min(times), now) if times else None

    def _dispatch_ready(self, now: float) -> list[Decision]:
        out: list[Decision] = []
        self._waiting_on_warm = False
        blocked: set[BatchKey] = set()
        while self.fleet.has_idle(self.failures.killing):
            ready = [k for k in self.waiting.keys() if k not in blocked and self.waiting.ready(k, now)]
            if not ready:
                break
            key = min(ready, key=lambda k: self.waiting.head_order(k, now))
            decisions = self._place(key, now)
            if decisions is None:
                blocked.add(key)
            else:
                out += decisions
        if blocked and not any(isinstance(d, RunBatch) for d in out) and self._quiescent():
            # Every worker is idle with nothing in flight, yet nothing fits because every resident
            # model has queued work. No event will ever change that: let the best batch evict them.
            key = min(blocked, key=lambda k: self.waiting.head_order(k, now))
            out += self._place(key, now, protect_queued=False) or []
        return out

    def _place(self, key: BatchKey, now: float, *, protect_queued: bool = True) -> list[Decision] | None:
        """Choose a worker for ``key``'s batch (placement policy), size the batch to what fits,
        and plan evictions, the load if needed, and the run. None: not now."""
        limits = self.models[key.model]
        ordered = self.waiting.ordered(key, now)
        killing = self.failures.killing
        # Only workers the head job has not failed on (while one is up), and none being killed.
        candidates = self._allowed(ordered[0], [w for w in self.fleet.workers.values() if w.id not in killing])
        if not candidates:
            return None
        protected = self.waiting.protected_models() if protect_queued else set()
        backlog = math.ceil(self.waiting.depth(key.model) / limits.max_batch_size)
        worker = self.placement.choose(key.model, candidates, lambda w: self.residency.fit(w, key, 1, protected),
                                       lambda w: w.busy.utilization(now), backlog,
                                       lambda w: self.work.time_left(self.fleet.running.get(w.batch_id or ""), now),
                                       self.work.load_seconds(key.model))
        if worker is None:
            if any(key.model in w.resident and not w.idle for w in self.fleet.workers.values()):
                self._waiting_on_warm = True
            return None
        size = self.failures.batch_cap(key, worker.id, limits.max_batch_size)
        jobs = [j for j in ordered if self._allowed(j, [worker])][:size]
        # The largest prefix of the batch that fits; shrinking beats an OOM.
        n = len(jobs)
        while n > 1 and self.residency.fit(worker, key, n, protected) is None:
            n -= 1
        evict = self.residency.fit(worker, key, n, protected)
        assert evict is not None
        out = self.residency.evict(worker, evict)
        needs_load = key.model not in worker.resident
        if needs_load:
            out += self.residency.load(worker, key.model, now, "batch", protected)
        chosen = jobs[:n]
        for job in chosen:
            self.waiting.take(job.id)
        if not self.waiting.depth(key.model):
            self.residency.invalidate()  # copies elsewhere lost their protection
        batch = self.fleet.start(key, chosen, worker, now)
        self.failures.watch(batch.id, now)
        resident = worker.resident[key.model]
        resident.last_used = now
        out.append(RunBatch(batch.id, worker.id, key, tuple(j.id for j in chosen), needs_load, resident.loading))
        return out

    # ---- internals -------------------------------------------------------------------------------

    def _autoscale(self, now: float) -> list[Decision]:
        assert self.autoscaler is not None
        if self._next_scale_at is not None and now < self._next_scale_at:
            return []
        self._next_scale_at = now + self.autoscaler.limits.interval_s
        snap = self.fleet_snapshot(now)
        want, self.scale = self.autoscaler.decide(snap, self.scale)
        out: list[Decision] = []
        if want != self.target_devices:
            out.append(ScaleTo(want, f"{self.autoscaler.policy.name}: queued {snap.queued_work_s:.1f} s of work, "
                                     f"arriving {snap.arrival_work_rate:.2f} dev-s/s, {snap.busy}/{snap.up} busy"))
            self.target_devices = want
        surplus = len(self.fleet.workers) - want
        if surplus > 0:
            # Retire idle workers, the ones holding the least (no warm-pool copies) first.
            idle = [w for w in self.fleet.idle(self.failures.killing)
                    if not w.loading and not any(r.pinned for r in w.resident.values())]
            for w in sorted(idle, key=lambda w: (w.used, w.busy.utilization(now), w.id))[:surplus]:
                self.fleet.remove(w.id)
                self.failures.retired(w.id)
                out.append(RetireWorker(w.id, "scale down"))
        return out

    def _expire(self, now: float) -> list[Decision]:
        """Everything time-driven: retries whose backoff is over rejoin their queue; jobs past their
        deadline fail (a running one is also stopped at its next step); hung, stuck and silent
        workers are killed."""
        out: list[Decision] = []
        self.waiting.unpark_due(now)
        late: dict[str, list[str]] = {}  # batch id -> its jobs past their deadline
        for job_id in self.waiting.due_deadlines(now):
            batch_id = self.fleet.batch_of(job_id)
            if job_id in self.waiting:
                self._take_waiting(job_id)
                out.append(FailJob(job_id, ErrorCode.TIMEOUT, "deadline passed before the job could run"))
            elif batch_id is not None and not self.failures.cancel_sent(job_id):
                late.setdefault(batch_id, []).append(job_id)
        for batch_id, job_ids in late.items():
            worker = self.fleet.running[batch_id].worker
            for job_id in job_ids:
                self.job_ended(job_id, now)
                out.append(FailJob(job_id, ErrorCode.TIMEOUT, "deadline passed while running"))
            self.failures.stop_requested(batch_id, now)
            out.append(CancelRunning(worker, batch_id, tuple(job_ids)))
        return out + self.failures.liveness_kills(self.fleet.running.values(), now)

    def _release(self, batch_id: str, now: float):
        """Take a batch off the running set and free its worker; its jobs are the caller's."""
        released = self.fleet.release(batch_id, now)
        if released is None:
            return None
        batch, freed = released
        self.failures.unwatch(batch_id)
        if freed is not None:
            self.residency.touched(freed, batch.key.model, now)
        return batch

    def _fail_attempts(self, jobs, worker_id: str, code: str, message: str, now: float) -> list[Decision]:
        out, again = self.failures.fail_attempts(jobs, worker_id, code, message, now)
        for job, at in again:
            self.waiting.requeue(job, at, now)
        return out

    def _take_waiting(self, job_id: str) -> QueuedJob:
        self.residency.invalidate()  # the model may have lost its last queued job
        return self.waiting.take(job_id)

    def _allowed(self, job: QueuedJob, workers: list[WorkerState]) -> list[WorkerState]:
        return self.failures.allowed(job, workers, self.fleet.workers)

    def _deadline_pending(self, job_id: str) -> bool:
        return job_id in self.waiting or (self.fleet.batch_of(job_id) is not None
                                          and not self.failures.cancel_sent(job_id))

    def _quiescent(self) -> bool:
        return (bool(self.fleet.workers) and not self.failures.killing
                and all(w.idle and not w.loading for w in self.fleet.workers.values()))
