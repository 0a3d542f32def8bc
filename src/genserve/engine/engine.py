"""The engine: every scheduling decision, as a pure function of events and ``now``.

It never reads a clock, sleeps, starts threads or does I/O. Drivers (the asyncio server, unit
tests, later the simulator) feed it events and carry out the decisions it returns.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from .batching import BATCHING
from .placement import PLACEMENT
from .queues import KeyedQueues, order_key
from .types import (
    Admission,
    BatchKey,
    CancelRunning,
    Decision,
    FailJob,
    JobDequeued,
    LoadModel,
    ModelLimits,
    Priority,
    QueuedJob,
    RunBatch,
    RunningBatch,
    WorkerState,
)

DEFAULT_BATCH_SECONDS = 1.0  # used for Retry-After until a model has run a batch


class Engine:
    def __init__(
        self,
        models: Mapping[str, ModelLimits],
        *,
        aging_s: float = 30.0,
        max_attempts: int = 3,
        batching: str = "greedy",
        placement: str = "warm-first",
        batch_id_prefix: str = "b",
    ) -> None:
        self.models = dict(models)
        self.aging_s = aging_s
        self.max_attempts = max_attempts
        self.batching = BATCHING[batching]()
        self.placement = PLACEMENT[placement]()
        self.queues = KeyedQueues()
        self.workers: dict[str, WorkerState] = {}
        self.running: dict[str, RunningBatch] = {}
        self._running_job: dict[str, str] = {}  # job id -> batch id
        self._cancel_sent: set[str] = set()
        self._batch_seq = 0
        self._prefix = batch_id_prefix
        self._batch_seconds: dict[str, float] = {}  # model -> EWMA of batch wall time

    # ---- jobs ------------------------------------------------------------------------------------

    def admit(self, model: str) -> Admission:
        """Would a new job for ``model`` be accepted now? Asked before the job is persisted."""
        limits = self.models.get(model)
        if limits is None:
            return Admission(False, "unknown_model")
        depth = self.queues.depth(model)
        if depth >= limits.max_queue:
            return Admission(False, "queue_full", self._drain_estimate(model, depth))
        return Admission(True)

    def submit(self, job_id: str, key: BatchKey, priority: Priority, now: float, *, force: bool = False) -> Admission:
        """Queue a job. ``force`` skips the queue limit: used when re-entering jobs that were already
        accepted (server restart) — an accepted job is never turned away later."""
        adm = self.admit(key.model)
        if not adm.accepted and not (force and adm.reason == "queue_full"):
            return adm
        if job_id in self.queues or job_id in self._running_job:
            return Admission(True)  # idempotent
        self.queues.add(QueuedJob(job_id, key, priority, now))
        return Admission(True)

    def cancel(self, job_id: str, now: float) -> list[Decision]:
        if job_id in self.queues:
            self.queues.remove(job_id)
            return [JobDequeued(job_id, "canceled")]
        batch_id = self._running_job.get(job_id)
        if batch_id is not None and job_id not in self._cancel_sent:
            self._cancel_sent.add(job_id)
            batch = self.running[batch_id]
            return [CancelRunning(batch.worker, batch_id, (job_id,))]
        return []

    def is_queued(self, job_id: str) -> bool:
        return job_id in self.queues

    def queue_position(self, job_id: str, now: float) -> int | None:
        """0-based position among all queued jobs of the same model, in service order."""
        if job_id not in self.queues:
            return None
        ordered = self.queues.all_ordered(now, self.aging_s)
        model = next(j.key.model for j in ordered if j.id == job_id)
        same = [j.id for j in ordered if j.key.model == model]
        return same.index(job_id)

    def queue_depth(self, model: str) -> int:
        return self.queues.depth(model)

    # ---- workers ---------------------------------------------------------------------------------

    def worker_up(self, worker_id: str, now: float) -> None:
        self.workers[worker_id] = WorkerState(worker_id)

    def worker_down(self, worker_id: str, now: float) -> list[Decision]:
        """A worker vanished. Its running jobs go back to the queue (keeping their place in line)
        unless they have used up their attempts, in which case they fail."""
        self.workers.pop(worker_id, None)
        out: list[Decision] = []
        for batch in [b for b in self.running.values() if b.worker == worker_id]:
            del self.running[batch.id]
            for job in batch.jobs.values():
                del self._running_job[job.id]
                if job.id in self._cancel_sent:
                    self._cancel_sent.discard(job.id)
                    out.append(JobDequeued(job.id, "canceled"))
                    continue
                job.attempts += 1
                if job.attempts >= self.max_attempts:
                    out.append(FailJob(job.id, "worker_crashed", f"worker lost {job.attempts} times while running the job"))
                else:
                    self.queues.add(job)
        return out

    def model_loaded(self, worker_id: str, model: str) -> None:
        if worker_id in self.workers:
            self.workers[worker_id].resident.add(model)

    def model_unloaded(self, worker_id: str, model: str) -> None:
        if worker_id in self.workers:
            self.workers[worker_id].resident.discard(model)

    def batch_finished(self, batch_id: str, now: float) -> None:
        """The worker finished a batch (whatever each job's outcome) and is idle again."""
        batch = self.running.pop(batch_id, None)
        if batch is None:
            return
        for job_id in batch.jobs:
            self._running_job.pop(job_id, None)
            self._cancel_sent.discard(job_id)
        took = max(0.0, now - batch.started_at)
        prev = self._batch_seconds.get(batch.key.model)
        self._batch_seconds[batch.key.model] = took if prev is None else 0.7 * prev + 0.3 * took
        worker = self.workers.get(batch.worker)
        if worker is not None and worker.batch_id == batch_id:
            worker.batch_id = None

    # ---- the decision ----------------------------------------------------------------------------

    def step(self, now: float) -> list[Decision]:
        """Dispatch every ready batch that has an idle worker, best first."""
        out: list[Decision] = []
        while True:
            idle = [w for w in self.workers.values() if w.idle]
            if not idle:
                return out
            ready = [k for k in self.queues.keys() if self._ready(k, now)]
            if not ready:
                return out
            key = min(ready, key=lambda k: self._head_order(k, now))
            worker = self.placement.choose(key.model, idle)
            assert worker is not None
            out.extend(self._dispatch(key, worker, now))

    def next_deadline(self, now: float) -> float | None:
        """When ``step`` could next decide something without a new event (None: only events matter)."""
        if not any(w.idle for w in self.workers.values()):
            return None  # a batch_finished/worker_up event will come first
        times = []
        for key in self.queues.keys():
            jobs = list(self.queues.jobs(key))
            t = self.batching.ready_at(len(jobs), min(j.enqueued_at for j in jobs), self.models[key.model])
            if t is not None:
                times.append(max(t, now))
        return min(times) if times else None

    # ---- internals -------------------------------------------------------------------------------

    def _ready(self, key: BatchKey, now: float) -> bool:
        jobs = list(self.queues.jobs(key))
        return self.batching.ready(len(jobs), min(j.enqueued_at for j in jobs), self.models[key.model], now)

    def _head_order(self, key: BatchKey, now: float) -> tuple:
        return min(order_key(j, now, self.aging_s) for j in self.queues.jobs(key))

    def _dispatch(self, key: BatchKey, worker: WorkerState, now: float) -> list[Decision]:
        limits = self.models[key.model]
        chosen = self.queues.ordered(key, now, self.aging_s)[: limits.max_batch_size]
        for job in chosen:
            self.queues.remove(job.id)
        self._batch_seq += 1
        batch_id = f"{self._prefix}-{self._batch_seq:06d}"
        self.running[batch_id] = RunningBatch(batch_id, worker.id, key, {j.id: j for j in chosen}, now)
        for job in chosen:
            self._running_job[job.id] = batch_id
        worker.batch_id = batch_id
        worker.batches_run += 1
        out: list[Decision] = []
        needs_load = key.model not in worker.resident
        if needs_load:
            out.append(LoadModel(worker.id, key.model))
            # Assume success; a failed load is reported as a failed batch and retracted then.
            worker.resident.add(key.model)
        out.append(RunBatch(batch_id, worker.id, key, tuple(j.id for j in chosen), needs_load))
        return out

    def _drain_estimate(self, model: str, depth: int) -> float:
        limits = self.models[model]
        per_batch = self._batch_seconds.get(model, DEFAULT_BATCH_SECONDS)
        workers = max(1, len(self.workers))
        batches = math.ceil(max(1, depth) / limits.max_batch_size)
        # Retry-After is for "when is there room again": one batch's worth of drain is enough.
        return max(1.0, math.ceil(per_batch * min(batches, 1 + batches // workers)))
