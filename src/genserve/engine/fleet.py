"""The fleet: workers that are up (and those started but not up yet), the batches running on them,
and batch ids. The one owner of "which job runs where". (Each worker's ``resident`` models are the
residency manager's.)"""
from __future__ import annotations

from .types import BatchKey, QueuedJob, RunningBatch, WorkerState


class Fleet:
    def __init__(self, batch_id_prefix: str = "b") -> None:
        self.workers: dict[str, WorkerState] = {}
        self.pending: dict[str, None] = {}  # started by the driver, not up yet: oldest first
        self.running: dict[str, RunningBatch] = {}
        self._batch_of: dict[str, str] = {}  # running job id -> batch id
        self._seq = 0
        self._prefix = batch_id_prefix
        self._largest: tuple[int | None] | None = None  # cache of largest_capacity(); None = recompute

    def starting(self, worker_id: str) -> None:
        if worker_id not in self.workers:
            self.pending[worker_id] = None

    def up(self, worker_id: str, capacity: int | None) -> WorkerState:
        self.pending.pop(worker_id, None)
        w = self.workers[worker_id] = WorkerState(worker_id, capacity)
        self._largest = None
        return w

    def remove(self, worker_id: str) -> None:
        self.pending.pop(worker_id, None)
        self.workers.pop(worker_id, None)
        self._largest = None

    def largest_capacity(self) -> int | None:
        """The largest worker's capacity; None when there is no worker or one is unlimited."""
        if self._largest is None:
            caps = [w.capacity for w in self.workers.values()]
            self._largest = (None if not caps or None in caps else max(caps),)  # type: ignore[type-var]
        return self._largest[0]

    def start(self, key: BatchKey, jobs: list[QueuedJob], worker: WorkerState, now: float) -> RunningBatch:
        self._seq += 1
        batch = RunningBatch(f"{self._prefix}-{self._seq:06d}", worker.id, key, {j.id: j for j in jobs}, now, len(jobs),
                             tuple(j.id for j in jobs), len(jobs))
        self.running[batch.id] = batch
        for job in jobs:
            self._batch_of[job.id] = batch.id
        worker.batch_id = batch.id
        worker.batches_run += 1
        worker.busy.start(now)
        return batch

    def join(self, batch: RunningBatch, jobs: list[QueuedJob]) -> None:
        """Step-level batching: jobs join a running set."""
        for job in jobs:
            batch.jobs[job.id] = job
            self._batch_of[job.id] = batch.id
        batch.job_ids += tuple(j.id for j in jobs)
        batch.size += len(jobs)
        batch.joined += len(jobs)
        batch.most_at_once = max(batch.most_at_once, len(batch.jobs))

    def release(self, batch_id: str, now: float) -> tuple[RunningBatch, WorkerState | None] | None:
        """Take a batch off the running set; its jobs are the caller's. Also returns its worker
        when that worker is still up and now idle."""
        batch = self.running.pop(batch_id, None)
        if batch is None:
            return None
        for job_id in batch.jobs:
            self._batch_of.pop(job_id, None)
        worker = self.workers.get(batch.worker)
        if worker is None or worker.batch_id != batch_id:
            return batch, None
        worker.batch_id = None
        worker.busy.stop(now)
        return batch, worker

    def job_left(self, job_id: str) -> RunningBatch | None:
        """A running job reached its outcome before its batch ended: it leaves the batch."""
        batch_id = self._batch_of.pop(job_id, None)
        if batch_id is None:
            return None
        batch = self.running[batch_id]
        batch.jobs.pop(job_id, None)
        return batch

    def running_jobs(self) -> int:
        return len(self._batch_of)

    def batch_of(self, job_id: str) -> str | None:
        return self._batch_of.get(job_id)

    def batches_on(self, worker_id: str) -> list[RunningBatch]:
        return [b for b in self.running.values() if b.worker == worker_id]

    def running_model(self, w: WorkerState) -> str | None:
        batch = self.running.get(w.batch_id) if w.batch_id is not None else None
        return batch.key.model if batch is not None else None

    def idle(self, excluded: dict | set) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.idle and w.id not in excluded]

    def has_idle(self, excluded: dict | set) -> bool:
        # Each running batch holds one distinct worker (a lost worker's batches are released), so
        # fewer batches than workers means one is free — exact unless a worker is excluded.
        if excluded:
            return bool(self.idle(excluded))
        return len(self.running) < len(self.workers)
