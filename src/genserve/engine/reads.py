"""The engine's read API: what drivers (the runtime, the simulator, the API) ask of its state
between decisions. Pure reads of the components; the decisions live in the facade (engine.py)."""
from __future__ import annotations

from collections.abc import Mapping

from .fleet import Fleet
from .types import BatchKey, RunningBatch, WorkerState
from .waiting import Waiting
from .work import WorkModel


class EngineReads:
    waiting: Waiting
    fleet: Fleet
    work: WorkModel

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
