"""Priority at step boundaries (step-level batching): when a running set is full and a ``high`` job
waits for its shape, a ``low`` job of the set is paused — the worker keeps its latents and it goes
back to its queue, to be resumed later (on the same worker it continues from the step it reached;
elsewhere it starts again). Never lost: until the worker confirms the pause, the job is tracked
here, and a lost batch or worker puts it back in line."""
from __future__ import annotations

from ..types import Priority, QueuedJob, RunningBatch


class Preemption:
    def __init__(self) -> None:
        self._pausing: dict[str, tuple[QueuedJob, str, str]] = {}  # job id -> (job, batch id, worker)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._pausing

    def victim(self, batch: RunningBatch, head: QueuedJob, cancel_sent) -> QueuedJob | None:
        """The job of a full set that ``head`` may displace: only a ``high`` job displaces, only a
        ``low`` one is displaced — the one that joined last (the least progress to park)."""
        if head.priority != Priority.HIGH:
            return None
        for job_id in reversed(batch.job_ids):
            job = batch.jobs.get(job_id)
            if job is not None and job.priority == Priority.LOW and not cancel_sent(job_id):
                return job
        return None

    def start(self, job: QueuedJob, batch: RunningBatch) -> None:
        self._pausing[job.id] = (job, batch.id, batch.worker)

    def where(self, job_id: str) -> tuple[str, str]:
        """(batch id, worker) of a job being paused."""
        _, batch_id, worker = self._pausing[job_id]
        return batch_id, worker

    def done(self, job_id: str) -> QueuedJob | None:
        """The worker paused it (or it ended there first): it is no longer ours to track."""
        entry = self._pausing.pop(job_id, None)
        return entry[0] if entry is not None else None

    def lost(self, *, batch_id: str | None = None, worker: str | None = None) -> list[QueuedJob]:
        """Jobs being paused in a batch that failed, or on a worker that went down: they never
        confirmed the pause and go back in line."""
        gone = [jid for jid, (_, b, w) in self._pausing.items() if b == batch_id or w == worker]
        return [self._pausing.pop(jid)[0] for jid in gone]
