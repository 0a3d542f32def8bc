"""The engine: every scheduling decision, as a pure function of events and ``now``.

It never reads a clock, sleeps, starts threads or does I/O. Drivers (the asyncio server, unit
tests, later the simulator) feed it events and carry out the decisions it returns.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from .batching import BATCHING
from .errors import ErrorCode
from .liveness import BatchWatch, Liveness
from .placement import PLACEMENT
from .queues import KeyedQueues, order_key
from .retry import RetryPolicy
from .types import (
    Admission,
    BatchKey,
    CancelRunning,
    Decision,
    FailJob,
    JobDequeued,
    KillWorker,
    LoadModel,
    ModelLimits,
    Priority,
    QueuedJob,
    RetryJob,
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
        retry: RetryPolicy | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        self.models = dict(models)
        self.aging_s = aging_s
        self.retry = retry or RetryPolicy(max_attempts=max_attempts)
        self.liveness = liveness or Liveness()
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
        # Failure handling (see retry.py, liveness.py): jobs waiting out a retry backoff, batch
        # sizes that ran out of memory, each running batch's pulse, when each worker was last
        # heard from, and the workers we asked to be killed (with the code their jobs fail with).
        self._delayed: dict[str, tuple[float, QueuedJob]] = {}
        self._oom_cap: dict[tuple[str, int, int, int, str], int] = {}
        self._watch: dict[str, BatchWatch] = {}
        self._seen: dict[str, float] = {}
        self._killing: dict[str, tuple[str, str]] = {}

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

    def submit(self, job_id: str, key: BatchKey, priority: Priority, now: float, *, force: bool = False,
               deadline: float | None = None, attempts: int = 0) -> Admission:
        """Queue a job. ``force`` skips the queue limit: used when re-entering jobs that were already
        accepted (server restart) — an accepted job is never turned away later. ``deadline``: fail
        it with ``timeout`` if it has not finished by then; ``attempts``: failed attempts so far."""
        adm = self.admit(key.model)
        if not adm.accepted and not (force and adm.reason == "queue_full"):
            return adm
        if job_id in self.queues or job_id in self._running_job or job_id in self._delayed:
            return Admission(True)  # idempotent
        self.queues.add(QueuedJob(job_id, key, priority, now, attempts=attempts, deadline=deadline))
        return Admission(True)

    def cancel(self, job_id: str, now: float) -> list[Decision]:
        if job_id in self.queues or job_id in self._delayed:
            self._take_queued(job_id)
            return [JobDequeued(job_id, "canceled")]
        batch_id = self._running_job.get(job_id)
        if batch_id is not None and job_id not in self._cancel_sent:
            self._cancel_sent.add(job_id)
            batch = self.running[batch_id]
            self._stop_requested(batch_id, now)
            return [CancelRunning(batch.worker, batch_id, (job_id,))]
        return []

    def is_queued(self, job_id: str) -> bool:
        """Waiting to run: in a queue, or waiting out a retry backoff."""
        return job_id in self.queues or job_id in self._delayed

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
        self._seen[worker_id] = now

    def worker_seen(self, worker_id: str, now: float) -> None:
        """Any message from the worker (a heartbeat included): it is alive."""
        if worker_id in self.workers:
            self._seen[worker_id] = now

    def worker_down(self, worker_id: str, now: float) -> list[Decision]:
        """A worker vanished (crashed, or killed on our request). Each of its running jobs has a
        failed attempt — ``worker_crashed``, or the code we killed it for — and goes through the
        retry policy: back to the queue (keeping its place in line) or failed."""
        self.workers.pop(worker_id, None)
        self._seen.pop(worker_id, None)
        code, message = self._killing.pop(worker_id, (ErrorCode.WORKER_CRASHED, "worker process died"))
        out: list[Decision] = []
        for batch in [b for b in self.running.values() if b.worker == worker_id]:
            self._release(batch.id)
            out.extend(self._fail_attempts(batch.jobs.values(), worker_id, code, message, now))
        return out

    def batch_progress(self, batch_id: str, now: float) -> None:
        """The batch moved (model loaded, inference started, a step, an output): not hung."""
        watch = self._watch.get(batch_id)
        if watch is not None:
            watch.last_progress = now
            self._seen[self.running[batch_id].worker] = now

    def job_ended(self, job_id: str, now: float) -> None:
        """A job of a running batch reached its outcome (output written, or canceled) before the
        batch ended: whatever happens to the batch later, this job is not run again."""
        batch_id = self._running_job.pop(job_id, None)
        if batch_id is not None:
            self.running[batch_id].jobs.pop(job_id, None)
            self._cancel_sent.discard(job_id)

    def batch_failed(self, batch_id: str, code: str, message: str, now: float) -> list[Decision]:
        """The worker reported the whole batch failed (and is idle again). Out of memory with more
        than one job: the batch size is remembered as too large for this shape on this worker and
        the jobs are requeued to run in smaller batches, without using up an attempt. Otherwise
        each job has a failed attempt and goes through the retry policy."""
        batch = self._release(batch_id)
        if batch is None:
            return []
        smaller = self.retry.split(len(batch.jobs), code)
        if smaller is None:
            return self._fail_attempts(batch.jobs.values(), batch.worker, code, message, now)
        shape = self._shape(batch.key, batch.worker)
        self._oom_cap[shape] = min(smaller, self._oom_cap.get(shape, smaller))
        out: list[Decision] = []
        for job in batch.jobs.values():
            if self._canceled(job.id, out):
                continue
            self.queues.add(job)
            out.append(RetryJob(job.id, code, f"{message}; retrying in batches of ≤ {smaller}", job.attempts, now,
                                job.key.model, counted=False))
        return out

    def model_loaded(self, worker_id: str, model: str) -> None:
        if worker_id in self.workers:
            self.workers[worker_id].resident.add(model)

    def model_unloaded(self, worker_id: str, model: str) -> None:
        if worker_id in self.workers:
            self.workers[worker_id].resident.discard(model)

    def batch_finished(self, batch_id: str, now: float) -> None:
        """The worker finished a batch (whatever each job's outcome) and is idle again."""
        batch = self._release(batch_id)
        if batch is None:
            return
        took = max(0.0, now - batch.started_at)
        prev = self._batch_seconds.get(batch.key.model)
        self._batch_seconds[batch.key.model] = took if prev is None else 0.7 * prev + 0.3 * took

    # ---- the decision ----------------------------------------------------------------------------

    def step(self, now: float) -> list[Decision]:
        """Enforce deadlines and liveness, then dispatch every ready batch that has an idle worker
        it may run on, best first."""
        out = self._expire(now)
        unplaceable: set[BatchKey] = set()
        while True:
            idle = self._idle()
            if not idle:
                return out
            ready = [k for k in self.queues.keys() if k not in unplaceable and self._ready(k, now)]
            if not ready:
                return out
            key = min(ready, key=lambda k: self._head_order(k, now))
            allowed = self._allowed(self.queues.ordered(key, now, self.aging_s)[0], idle)
            if not allowed:
                unplaceable.add(key)  # its head job waits for a worker it has not failed on
                continue
            worker = self.placement.choose(key.model, allowed)
            assert worker is not None
            out.extend(self._dispatch(key, worker, now))

    def next_deadline(self, now: float) -> float | None:
        """When ``step`` could next decide something without a new event (None: only events matter)."""
        times = self._failure_deadlines()
        idle = self._idle()  # none: a batch_finished/worker_up event comes first
        for key in self.queues.keys() if idle else ():
            if not self._allowed(self.queues.ordered(key, now, self.aging_s)[0], idle):
                continue  # waits for a worker it has not failed on: an event, not a time
            jobs = list(self.queues.jobs(key))
            t = self.batching.ready_at(len(jobs), min(j.enqueued_at for j in jobs), self.models[key.model])
            if t is not None:
                times.append(t)
        return max(min(times), now) if times else None

    # ---- internals -------------------------------------------------------------------------------

    def _ready(self, key: BatchKey, now: float) -> bool:
        jobs = list(self.queues.jobs(key))
        return self.batching.ready(len(jobs), min(j.enqueued_at for j in jobs), self.models[key.model], now)

    def _head_order(self, key: BatchKey, now: float) -> tuple:
        return min(order_key(j, now, self.aging_s) for j in self.queues.jobs(key))

    def _dispatch(self, key: BatchKey, worker: WorkerState, now: float) -> list[Decision]:
        limits = self.models[key.model]
        size = min(limits.max_batch_size, self._oom_cap.get(self._shape(key, worker.id), limits.max_batch_size))
        chosen = [j for j in self.queues.ordered(key, now, self.aging_s) if self._allowed(j, [worker])][:size]
        for job in chosen:
            self.queues.remove(job.id)
        self._batch_seq += 1
        batch_id = f"{self._prefix}-{self._batch_seq:06d}"
        self.running[batch_id] = RunningBatch(batch_id, worker.id, key, {j.id: j for j in chosen}, now)
        self._watch[batch_id] = BatchWatch(now)
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

    # ---- failure handling internals (policies: retry.py, liveness.py) -------------------------------

    def _release(self, batch_id: str) -> RunningBatch | None:
        """Take a batch off the running set and free its worker; its jobs are the caller's."""
        batch = self.running.pop(batch_id, None)
        if batch is None:
            return None
        self._watch.pop(batch_id, None)
        for job_id in batch.jobs:
            self._running_job.pop(job_id, None)
        worker = self.workers.get(batch.worker)
        if worker is not None and worker.batch_id == batch_id:
            worker.batch_id = None
        return batch

    def _canceled(self, job_id: str, out: list[Decision]) -> bool:
        """A job whose cancel was already sent ends canceled, whatever happened to its batch."""
        if job_id not in self._cancel_sent:
            return False
        self._cancel_sent.discard(job_id)
        out.append(JobDequeued(job_id, "canceled"))
        return True

    def _fail_attempts(self, jobs, worker_id: str, code: str, message: str, now: float) -> list[Decision]:
        out: list[Decision] = []
        for job in list(jobs):
            if self._canceled(job.id, out):
                continue
            job.attempts += 1
            job.avoid.add(worker_id)
            retry = self.retry.after_failure(job.id, job.key.model, job.attempts, code, now, job.deadline)
            if retry is None:
                out.append(FailJob(job.id, code, f"{message} (attempt {job.attempts} of {self.retry.max_attempts})"))
                continue
            if retry.model != job.key.model:
                job.key = replace(job.key, model=retry.model)
            if retry.at <= now:
                self.queues.add(job)
            else:
                self._delayed[job.id] = (retry.at, job)
            out.append(RetryJob(job.id, code, message, job.attempts, retry.at, retry.model))
        return out

    def _take_queued(self, job_id: str) -> QueuedJob:
        if job_id in self._delayed:
            return self._delayed.pop(job_id)[1]
        return self.queues.remove(job_id)

    def _stop_requested(self, batch_id: str, now: float) -> None:
        watch = self._watch.get(batch_id)
        if watch is not None and watch.stop_requested is None:
            watch.stop_requested = now

    def _expire(self, now: float) -> list[Decision]:
        """Everything time-driven: retries whose backoff is over rejoin their queue; jobs past their
        deadline fail (a running one is also stopped at its next step); hung, stuck and silent
        workers are killed."""
        out: list[Decision] = []
        for job_id, (at, job) in list(self._delayed.items()):
            if at <= now:
                del self._delayed[job_id]
                self.queues.add(job)
        expired = [j.id for key in self.queues.keys() for j in self.queues.jobs(key) if _due(j.deadline, now)]
        for job_id, (_, job) in self._delayed.items():
            if _due(job.deadline, now):
                expired.append(job_id)
        for job_id in expired:
            self._take_queued(job_id)
            out.append(FailJob(job_id, ErrorCode.TIMEOUT, "deadline passed before the job could run"))
        for batch in list(self.running.values()):
            late = [j.id for j in batch.jobs.values() if _due(j.deadline, now) and j.id not in self._cancel_sent]
            for job_id in late:
                self.job_ended(job_id, now)
                out.append(FailJob(job_id, ErrorCode.TIMEOUT, "deadline passed while running"))
            if late:
                self._stop_requested(batch.id, now)
                out.append(CancelRunning(batch.worker, batch.id, tuple(late)))
            verdict = self.liveness.batch_verdict(self._watch[batch.id], now)
            if verdict is not None:
                out.extend(self._kill(batch.worker, *verdict))
        for worker_id, seen in list(self._seen.items()):
            if _due(self.liveness.silent_kill_at(seen), now):
                out.extend(self._kill(worker_id, ErrorCode.WORKER_CRASHED,
                                      f"no heartbeat for {self.liveness.heartbeat_timeout_s:g}s"))
        return out

    def _kill(self, worker_id: str, code: str, message: str) -> list[Decision]:
        if worker_id in self._killing:
            return []  # asked already; worker_down follows
        self._killing[worker_id] = (code, message)
        return [KillWorker(worker_id, code, message)]

    def _failure_deadlines(self) -> list[float]:
        times = [at for at, _ in self._delayed.values()]
        times += [j.deadline for _, j in self._delayed.values() if j.deadline is not None]
        times += [j.deadline for k in self.queues.keys() for j in self.queues.jobs(k) if j.deadline is not None]
        for batch in self.running.values():
            if batch.worker in self._killing:
                continue
            times += [j.deadline for j in batch.jobs.values() if j.deadline is not None and j.id not in self._cancel_sent]
            times.append(self.liveness.batch_kill_at(self._watch[batch.id]))
        times += [self.liveness.silent_kill_at(t) for w, t in self._seen.items() if w not in self._killing]
        return [t for t in times if t is not None]

    def _idle(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.idle and w.id not in self._killing]

    def _allowed(self, job: QueuedJob, workers: list[WorkerState]) -> list[WorkerState]:
        """The workers ``job`` may run on: those it has not failed on, as long as one of those is up
        (otherwise any: a one-worker deployment still retries)."""
        if not job.avoid or not any(w not in job.avoid for w in self.workers if w not in self._killing):
            return list(workers)
        return [w for w in workers if w.id not in job.avoid]

    @staticmethod
    def _shape(key: BatchKey, worker_id: str) -> tuple[str, int, int, int, str]:
        return (key.model, key.width, key.height, key.num_frames, worker_id)


def _due(deadline: float | None, now: float) -> bool:
    return deadline is not None and now >= deadline
