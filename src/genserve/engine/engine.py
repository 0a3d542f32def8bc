"""The engine facade: every scheduling decision, as a pure function of events and ``now``.

It never reads a clock, sleeps, starts threads or does I/O. Drivers (the asyncio server, the
simulator, unit tests) feed it events and carry out the decisions it returns. The state lives in
components, each its only owner (DESIGN §5):

  waiting    Waiting           queues, parked retries, deadlines, aging
  fleet      Fleet             workers, running batches, batch ids
  residency  ResidencyManager  resident models, memory fit, idle unloads, warm pools, preloads
  failures   FailureTracker    retries, OOM caps, cancels, liveness watches, kills
  work       WorkModel         device-second estimates, arrival rate
  scaling    Scaling           autoscaling state around the pure ``Autoscaler.decide``
  dispatcher Dispatcher        placement: ready queues -> batches on workers, joins to running sets
                               (step-level batching; reads all of the above)
  preemption Preemption        step-level batching: low jobs being paused for high ones

The facade routes events to them and runs ``step`` as an ordered pipeline; ``next_deadline`` is
the earliest time any component could decide something new.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from .dispatch import Dispatcher
from .failures import FailureTracker
from .fleet import Fleet
from .policies.admission import ACCEPTED, admits, refusal
from .policies.adapters import AdapterResidency
from .policies.batching import BATCHING
from .policies.placement import PLACEMENT
from .policies.preempt import Preemption
from .policies.residency import RESIDENCY
from .policies.retry import RetryPolicy
from .residency_manager import ResidencyManager
from .scaling import Scaling
from .settings import EngineSettings
from .types import (Admission, BatchKey, CancelRunning, Decision, ErrorCode, FailJob, JobDequeued, ModelLimits,
                    Priority, QueuedJob, RetryJob, RunningBatch, WorkerState)
from .waiting import Waiting
from .work import WorkModel


class EngineReads:
    waiting: Waiting
    fleet: Fleet
    work: WorkModel
    adapters: AdapterResidency
    models: Mapping[str, ModelLimits]

    def admit(self, model: str, tenant: str | None = None, weight: float = 1.0, n: int = 1) -> Admission:
        """Would ``n`` new jobs of ``tenant`` (fair-share ``weight``) for ``model`` be accepted now?
        Asked before they are persisted. The rule, tenant-aware: policies/admission.py."""
        limits = self.models.get(model)
        if limits is None:
            return Admission(False, "unknown_model")
        mine, others = self.waiting.tenant_load(model, tenant)
        depth = self.waiting.depth(model)
        if admits(limits.max_queue, depth, mine, weight, others, n):
            return ACCEPTED
        return refusal(limits.max_queue, depth, mine, weight, others, n,
                       lambda ahead: self.work.drain_estimate(model, ahead, len(self.fleet.workers)))

    @property
    def workers(self) -> Mapping[str, WorkerState]:
        return self.fleet.workers

    def running_batch(self, batch_id: str) -> RunningBatch | None:
        return self.fleet.running.get(batch_id)

    def batches_on(self, worker_id: str) -> list[RunningBatch]:
        return self.fleet.batches_on(worker_id)

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

    def has_running(self) -> bool:
        return bool(self.fleet.running)

    def busy_workers(self) -> list[str]:
        return sorted({b.worker for b in self.fleet.running.values()})

    def job_work(self, key: BatchKey) -> float:
        return self.work.job_work(key)

    def resident_loras(self, worker_id: str) -> dict[str, int]:
        """The LoRA adapters ``worker_id`` holds (id -> bytes), least recently used first."""
        return self.adapters.resident(worker_id)

    def loras_reported(self, worker_id: str, resident: Mapping[str, int], now: float) -> None:
        """A worker's LoRA adapters after a batch (id -> measured bytes): they replace the plan.
        (The one adapter event; the rest of adapter residency happens in dispatch.)"""
        if worker_id in self.fleet.workers:
            self.adapters.reported(worker_id, resident)


class Engine(EngineReads):
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
        self.waiting = Waiting(self.models, BATCHING[s.batching](), s.aging_s, s.fair_share)
        self.fleet = Fleet(s.batch_id_prefix)
        self.work = WorkModel(self.models)
        self.residency = ResidencyManager(self.models, self.fleet, RESIDENCY[s.residency](), self.work.last_arrival,
                                          self.waiting.protected_models, preload=s.preload,
                                          preload_min_probability=s.preload_min_probability)
        self.failures = FailureTracker(s.retry, s.liveness)
        self.autoscaler = s.autoscaler
        self.scaling = Scaling(s.autoscaler) if s.autoscaler is not None else None
        self.preemption = Preemption()
        self.adapters = AdapterResidency(s.lora_memory)  # LoRA adapters per worker (docs/lora.md)
        self.dispatcher = Dispatcher(PLACEMENT[s.placement](s.saturation), self.waiting, self.fleet, self.residency,
                                     self.failures, self.work, self.preemption, self.adapters)
        self.draining = False  # shutting down: no new batches, loads or scaling; running ones finish

    # ---- jobs ------------------------------------------------------------------------------------

    def submit(self, job_id: str, key: BatchKey, priority: Priority, now: float, *, force: bool = False,
               deadline: float | None = None, attempts: int = 0, tenant: str | None = None,
               weight: float = 1.0, loras: Mapping[str, int] | None = None) -> Admission:
        """Queue a job. ``force`` skips the queue limit: used when re-entering jobs that were already
        accepted (server restart) — an accepted job is never turned away later. ``deadline``: fail
        it with ``timeout`` if it has not finished by then; ``attempts``: failed attempts so far;
        ``tenant``/``weight``: its fair share in the model's queue; ``loras``: adapter id -> bytes."""
        adm = self.admit(key.model, tenant, weight)
        if not adm.accepted and not (force and adm.reason == "queue_full"):
            return adm
        key = self.models[key.model].queue_key(key)
        if job_id in self.waiting or self.fleet.batch_of(job_id) is not None:
            return Admission(True)  # idempotent
        self.adapters.hint(loras or {})
        self.waiting.enter(QueuedJob(job_id, key, priority, now, attempts=attempts, deadline=deadline,
                                     tenant=tenant, weight=weight, loras=tuple(loras or ())))
        self.work.arrived(key, now, new=not force)
        if not force and self.residency.predictor is not None:
            self.residency.predictor.observe(key.model, now)
        return Admission(True)

    def cancel(self, job_id: str, now: float) -> list[Decision]:
        if job_id in self.waiting:
            self._take_waiting(job_id)
            return [JobDequeued(job_id, ErrorCode.CANCELED)]
        batch_id = self.fleet.batch_of(job_id)
        if job_id in self.preemption and not self.failures.cancel_sent(job_id):
            batch_id, worker = self.preemption.where(job_id)  # still in the set until the pause lands
            self.failures.send_cancel(job_id)
            return [CancelRunning(worker, batch_id, (job_id,))]
        if batch_id is not None and not self.failures.cancel_sent(job_id):
            self.failures.send_cancel(job_id)
            self.failures.stop_requested(batch_id, now)
            return [CancelRunning(self.fleet.running[batch_id].worker, batch_id, (job_id,))]
        return []

    # ---- workers, batches, models ------------------------------------------------------------------

    def worker_starting(self, worker_id: str) -> None:
        self.fleet.starting(worker_id)  # pending: a scale-down retires it first (scaling.py)

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
        if self.scaling is not None and worker_id in self.fleet.workers:
            self.scaling.device_lost()
        out: list[Decision] = []
        for batch in self.fleet.batches_on(worker_id):
            self._release(batch.id, now)
            out += self._fail_attempts(batch.jobs.values(), worker_id, code, message, now)
        out += self._unpaused(self.preemption.lost(worker=worker_id), now)
        self.fleet.remove(worker_id)
        self.adapters.drop_worker(worker_id)
        return out

    def batch_progress(self, batch_id: str, now: float) -> None:
        """The batch moved (model loaded, inference started, a step, an output): not hung."""
        batch = self.fleet.running.get(batch_id)
        if batch is not None:
            self.failures.progress(batch_id, batch.worker, now)

    def job_ended(self, job_id: str, now: float) -> None:
        """A job of a running batch reached its outcome (output written, or canceled) before the
        batch ended: whatever happens to the batch later, this job is not run again."""
        if self.fleet.job_left(job_id) is not None or self.preemption.done(job_id) is not None:
            self.failures.job_ended(job_id)

    def batch_finished(self, batch_id: str, now: float, peak_bytes: int = 0,
                       estimated_bytes: int = 0) -> list[Decision]:
        """The worker finished a batch (whatever each job's outcome) and is idle again.
        ``peak_bytes``: the working memory the worker measured for it (0 = not measured);
        ``estimated_bytes``: its estimate when it could not measure (a hint, never a measurement).
        A job that joined but was never reported never ran: the running set ended before the join
        reached the worker. It goes back to its queue, without using up an attempt."""
        batch = self._release(batch_id, now)
        if batch is None:
            return []
        n = batch.most_at_once or batch.size
        self.residency.memory.observe_batch(batch.key, n, peak_bytes)
        if not peak_bytes:
            self.residency.memory.observe_estimate(batch.key, n, estimated_bytes)
        missed = batch.missed_joins() if batch.joined else []
        self.work.batch_done(batch.key, batch.size - len(missed), max(0.0, now - batch.started_at))
        return self._requeue(missed, ErrorCode.PREEMPTED, "the running set ended before the job joined it", now)

    def batch_failed(self, batch_id: str, code: str, message: str, now: float) -> list[Decision]:
        """The worker reported the whole batch failed (and is idle again). Out of memory with more
        than one job: the batch size is remembered as too large for this shape on this worker and
        the jobs are requeued to run in smaller batches, without using up an attempt. An error that
        one job's input may cause (internal, invalid request) with more than one job: each job runs
        again alone, without using up an attempt, so only the job at fault fails. Otherwise each job
        has a failed attempt and goes through the retry policy."""
        batch = self._release(batch_id, now)
        if batch is None:
            return []
        out = self._unpaused(self.preemption.lost(batch_id=batch_id), now)
        if code == ErrorCode.MODEL_LOAD_FAILED:
            self.model_load_failed(batch.worker, batch.key.model, now)
        if self.failures.retry.isolate(batch.size, code):
            out, again = self.failures.isolate(batch.jobs.values(), code, message, now)
            for job in again:
                self.waiting.requeue(job, now, now)
            return out
        smaller = self.failures.retry.split(batch.size, code)
        if smaller is None:
            return out + self._fail_attempts(batch.jobs.values(), batch.worker, code, message, now)
        self.failures.out_of_memory(batch.key, batch.worker, smaller)
        return out + self._requeue(batch.jobs.values(), code, f"{message}; retrying in batches of ≤ {smaller}", now)

    def job_paused(self, job_id: str, now: float) -> list[Decision]:
        """The worker took a job out of its running set for a higher-priority one (its latents stay
        there): the job waits again, without using up an attempt (or ends, if canceled meanwhile)."""
        job = self.preemption.done(job_id)
        return self._unpaused([job], now) if job is not None else []

    def _unpaused(self, jobs: list[QueuedJob], now: float) -> list[Decision]:
        return self._requeue(jobs, ErrorCode.PREEMPTED, "paused at a step boundary for a higher-priority job", now)

    def model_loaded(self, worker_id: str, model: str, nbytes: int, now: float) -> None:
        """A worker finished loading ``model``; ``nbytes`` is what it measured it holds."""
        took = self.residency.loaded(worker_id, model, nbytes, now)
        if took is not None:
            self.work.load_done(model, took)

    def model_load_failed(self, worker_id: str, model: str, now: float) -> None:
        self.residency.load_failed(worker_id, model, now)

    def request_load(self, model: str, now: float, worker_id: str | None = None, *, pin: bool = False) -> list[Decision]:
        """Operator (or warm pool) asks for ``model`` to be loaded. Returns [] when no worker can."""
        return self.residency.request_load(model, now, self.failures.killing, worker_id, pin=pin)

    def request_unload(self, model: str, now: float, worker_id: str | None = None) -> list[Decision]:
        return self.residency.request_unload(model, worker_id)

    # ---- shutting down ---------------------------------------------------------------------------

    def drain(self, now: float) -> None:
        """The server is shutting down: from now on ``step`` starts nothing (no batch, load,
        preload or scaling); running batches go on, deadlines and liveness still apply. Queued
        jobs stay queued (they are durable and run after the restart)."""
        self.draining = True

    def interrupt_running(self, now: float) -> list[Decision]:
        """The drain's time is up: every running batch is given up (its worker is about to be
        stopped). Each job still in one goes back to its queue with the same attempts (an
        interruption is not the job's failure: ``RetryJob(counted=False)``), or ends canceled
        when a cancel was on its way."""
        out: list[Decision] = []
        for batch in list(self.fleet.running.values()):
            self._release(batch.id, now)
            out += self._requeue(batch.jobs.values(), ErrorCode.INTERRUPTED, "the server shut down during the attempt",
                                 now)
        return out

    # ---- the decision ----------------------------------------------------------------------------

    def step(self, now: float) -> list[Decision]:
        """Expire what is due, unload what has idled out, autoscale, fill warm pools, dispatch
        every ready batch that has a worker (best first), fail what can never fit, then preload.
        While draining, only the first (deadlines and liveness)."""
        out: list[Decision] = self._expire(now)
        if self.draining:
            return out
        out += self.residency.idle_unloads(now)
        if self.scaling is not None:
            decisions, retired = self.scaling.tick(now, self.waiting, self.fleet, self.work, self.failures.killing)
            for worker_id in retired:
                self.fleet.remove(worker_id)
                self.failures.retired(worker_id)
            out += decisions
        out += self.residency.fill_warm_pools(now, self.failures.killing)
        out += self.dispatcher.join_running(now)
        out += self.dispatcher.dispatch_ready(now)
        if self.waiting.queues:
            for key, why in self.residency.unplaceable(self.waiting.keys()):
                for job in list(self.waiting.jobs(key)):
                    self._take_waiting(job.id)
                    out.append(FailJob(job.id, ErrorCode.OUT_OF_MEMORY, why))
        out += self.residency.preload(now, self.failures.killing, self.work.last_key)
        return out

    def next_deadline(self, now: float) -> float | None:
        """When ``step`` could next decide something without a new event (None: only events matter)."""
        live = len(self.waiting.queues) + self.fleet.running_jobs()
        times = self.waiting.next_times(self._deadline_pending, live) + self.failures.next_times(self.fleet.running.values())
        if self.draining:  # nothing else would be acted on: a past batching window must not spin the timer
            return max(min(times), now) if times else None
        times += self.residency.next_times(now)
        times += self.dispatcher.next_times(now)
        if self.scaling is not None:
            times.append(self.scaling.next_time(now))
        return max(min(times), now) if times else None

    # ---- internals -------------------------------------------------------------------------------

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

    def _requeue(self, jobs: Iterable[QueuedJob], code: str, message: str, now: float) -> list[Decision]:
        """Jobs back in line at once without using up an attempt (``RetryJob(counted=False)``), or
        ended canceled when a cancel was on its way."""
        out: list[Decision] = []
        for job in jobs:
            if not self.failures.canceled(job.id, out):
                self.waiting.requeue(job, now, now)
                out.append(RetryJob(job.id, code, message, job.attempts, now, job.key.model, counted=False))
        return out

    def _take_waiting(self, job_id: str) -> QueuedJob:
        self.residency.invalidate()  # the model may have lost its last queued job
        return self.waiting.take(job_id)

    def _deadline_pending(self, job_id: str) -> bool:
        return job_id in self.waiting or (self.fleet.batch_of(job_id) is not None
                                          and not self.failures.cancel_sent(job_id))
