"""The failure tracker: what went wrong and what follows — retries (policy in retry.py), batch
sizes that ran out of memory, cancels on their way to a worker, and liveness (policy in
liveness.py): each running batch's pulse, when each worker was last heard from, and the workers
we asked to be killed."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from .policies.liveness import BatchWatch, Liveness
from .policies.retry import RetryPolicy
from .types import (BatchKey, Decision, ErrorCode, FailJob, JobDequeued, KillWorker, QueuedJob, RetryJob, RunningBatch,
                    WorkerState)

Shape = tuple[str, int, int, int, str]  # (model, width, height, frames, worker)


def shape(key: BatchKey, worker_id: str) -> Shape:
    return (key.model, key.width, key.height, key.num_frames, worker_id)


class FailureTracker:
    def __init__(self, retry: RetryPolicy, liveness: Liveness) -> None:
        self.retry = retry
        self.liveness = liveness
        self._oom_cap: dict[Shape, int] = {}
        self._cancel_sent: set[str] = set()
        self._watch: dict[str, BatchWatch] = {}  # running batch id -> its pulse
        self._seen: dict[str, float] = {}  # worker id -> last heard from
        self.killing: dict[str, tuple[str, str]] = {}  # worker id -> (code, message) its jobs fail with
        self._any_avoid = False  # some job avoids a worker it failed on
        self.any_alone = False  # some job must run in a batch of its own
        self._liveness_on = any(x is not None for x in (liveness.hang_timeout_s, liveness.heartbeat_timeout_s,
                                                         liveness.stop_grace_s))

    # ---- workers ------------------------------------------------------------------------------------

    def heard(self, worker_id: str, now: float) -> None:
        self._seen[worker_id] = now

    def worker_gone(self, worker_id: str) -> tuple[str, str]:
        """The code and message its running jobs fail with: why we killed it, or a crash."""
        self._seen.pop(worker_id, None)
        return self.killing.pop(worker_id, (ErrorCode.WORKER_CRASHED, "worker process died"))

    def retired(self, worker_id: str) -> None:
        self._seen.pop(worker_id, None)  # gone on purpose: no heartbeat is expected any more

    def kill(self, worker_id: str, code: str, message: str) -> list[Decision]:
        if worker_id in self.killing:
            return []  # asked already; worker_down follows
        self.killing[worker_id] = (code, message)
        return [KillWorker(worker_id, code, message)]

    # ---- batches ------------------------------------------------------------------------------------

    def watch(self, batch_id: str, now: float) -> None:
        self._watch[batch_id] = BatchWatch(now)

    def unwatch(self, batch_id: str) -> None:
        self._watch.pop(batch_id, None)

    def progress(self, batch_id: str, worker_id: str, now: float) -> None:
        watch = self._watch.get(batch_id)
        if watch is not None:
            watch.last_progress = now
            self._seen[worker_id] = now

    def stop_requested(self, batch_id: str, now: float) -> None:
        watch = self._watch.get(batch_id)
        if watch is not None and watch.stop_requested is None:
            watch.stop_requested = now

    def batch_cap(self, key: BatchKey, worker_id: str, max_batch_size: int) -> int:
        return min(max_batch_size, self._oom_cap.get(shape(key, worker_id), max_batch_size))

    def out_of_memory(self, key: BatchKey, worker_id: str, smaller: int) -> None:
        """A batch of this shape ran out of memory on this worker: at most ``smaller`` from now on."""
        s = shape(key, worker_id)
        self._oom_cap[s] = min(smaller, self._oom_cap.get(s, smaller))

    # ---- jobs ---------------------------------------------------------------------------------------

    def cancel_sent(self, job_id: str) -> bool:
        return job_id in self._cancel_sent

    def send_cancel(self, job_id: str) -> None:
        self._cancel_sent.add(job_id)

    def job_ended(self, job_id: str) -> None:
        self._cancel_sent.discard(job_id)

    def canceled(self, job_id: str, out: list[Decision]) -> bool:
        """A job whose cancel was already sent ends canceled, whatever happened to its batch."""
        if job_id not in self._cancel_sent:
            return False
        self._cancel_sent.discard(job_id)
        out.append(JobDequeued(job_id, ErrorCode.CANCELED))
        return True

    def fail_attempts(self, jobs: Iterable[QueuedJob], worker_id: str, code: str, message: str,
                      now: float) -> tuple[list[Decision], list[tuple[QueuedJob, float]]]:
        """Each job had a failed attempt on ``worker_id``: the decisions, and the jobs to requeue
        (with when they may run again)."""
        out: list[Decision] = []
        again: list[tuple[QueuedJob, float]] = []
        for job in list(jobs):
            if self.canceled(job.id, out):
                continue
            job.attempts += 1
            job.avoid.add(worker_id)
            self._any_avoid = True
            retry = self.retry.after_failure(job.id, job.key.model, job.attempts, code, now, job.deadline)
            if retry is None:
                out.append(FailJob(job.id, code, f"{message} (attempt {job.attempts} of {self.retry.max_attempts})"))
                continue
            if retry.model != job.key.model:
                job.key = job.key._replace(model=retry.model)
            again.append((job, retry.at))
            out.append(RetryJob(job.id, code, message, job.attempts, retry.at, retry.model))
        return out, again

    def isolate(self, jobs: Iterable[QueuedJob], code: str, message: str,
                now: float) -> tuple[list[Decision], list[QueuedJob]]:
        """A batch of several failed in a way one job's input may cause: every job runs again
        alone, without using an attempt (the decisions, and the jobs to requeue now)."""
        out: list[Decision] = []
        again: list[QueuedJob] = []
        for job in list(jobs):
            if self.canceled(job.id, out):
                continue
            job.alone = True
            self.any_alone = True
            again.append(job)
            out.append(RetryJob(job.id, code, f"{message}; each job of the batch runs alone to find the one at fault",
                                job.attempts, now, job.key.model, counted=False))
        return out, again

    def allowed(self, job: QueuedJob, workers: list[WorkerState], up: Mapping[str, WorkerState],
                could_host: Callable[[WorkerState, BatchKey], bool]) -> list[WorkerState]:
        """The workers ``job`` may run on: those it has not failed on, as long as one of those is up
        and could ever host it (otherwise any: a one-worker deployment still retries, and a job is
        not stranded next to workers too small for it)."""
        if not job.avoid or not any(w.id not in job.avoid and w.id not in self.killing and could_host(w, job.key)
                                    for w in up.values()):
            return list(workers)
        return [w for w in workers if w.id not in job.avoid]

    @property
    def any_avoid(self) -> bool:
        return self._any_avoid

    # ---- time ---------------------------------------------------------------------------------------

    def liveness_kills(self, running: Iterable[RunningBatch], now: float) -> list[Decision]:
        """Hung, stuck and silent workers, to be killed now."""
        if not self._liveness_on:
            return []
        out: list[Decision] = []
        for batch in list(running):
            verdict = self.liveness.batch_verdict(self._watch[batch.id], now)
            if verdict is not None:
                out.extend(self.kill(batch.worker, *verdict))
        for worker_id, seen in list(self._seen.items()):
            at = self.liveness.silent_kill_at(seen)
            if at is not None and now >= at:
                out.extend(self.kill(worker_id, ErrorCode.WORKER_CRASHED,
                                     f"no heartbeat for {self.liveness.heartbeat_timeout_s:g}s"))
        return out

    def next_times(self, running: Iterable[RunningBatch]) -> list[float]:
        if not self._liveness_on:
            return []
        times = [self.liveness.batch_kill_at(self._watch[b.id]) for b in running if b.worker not in self.killing]
        times += [self.liveness.silent_kill_at(t) for w, t in self._seen.items() if w not in self.killing]
        return [t for t in times if t is not None]
