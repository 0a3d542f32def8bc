"""Plain data the engine takes in and hands out, and the error taxonomy: one stable code per way a job can fail
(used in job records, API errors, attempt history and metrics), with whether it is worth retrying decided here,
once. No behaviour beyond small invariants."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import NamedTuple



class ErrorCode(StrEnum):
    OUT_OF_MEMORY = "out_of_memory"  # the device ran out of memory for this batch
    TIMEOUT = "timeout"  # the job's deadline passed, or its worker stopped making progress
    WORKER_CRASHED = "worker_crashed"  # the worker process died (or went silent) under the job
    MODEL_LOAD_FAILED = "model_load_failed"
    STORAGE_ERROR = "storage_error"  # writing the output failed
    INVALID_REQUEST = "invalid_request"
    OUTPUT_MISMATCH = "output_mismatch"  # the pipeline returned another size / frame count than asked for
    CANCELED = "canceled"
    PREEMPTED = "preempted"  # taken out of a running set before it ran (requeued, no attempt used)
    INTERRUPTED = "interrupted"  # the server shut down during the attempt: requeued, not counted
    INTERNAL = "internal"  # anything else: a bug, most likely deterministic for this input


# Retrying helps when the cause is the machine, not the request: another worker (or the same one
# later, or a smaller batch) may well succeed. An internal error is most likely a bug that would
# fail the same way again, so it is not retried.
RETRYABLE = frozenset({
    ErrorCode.OUT_OF_MEMORY, ErrorCode.TIMEOUT, ErrorCode.WORKER_CRASHED, ErrorCode.MODEL_LOAD_FAILED,
    ErrorCode.STORAGE_ERROR, ErrorCode.PREEMPTED, ErrorCode.INTERRUPTED,
})


def is_retryable(code: str) -> bool:
    return code in RETRYABLE


def classify_exception(exc: BaseException) -> ErrorCode:
    """The code for an exception raised while running a batch. By name, so no torch import here:
    ``torch.OutOfMemoryError`` / ``torch.cuda.OutOfMemoryError`` and CUDA's "out of memory"
    RuntimeErrors are OOM; OS errors happen writing outputs. An exception may name its code in a
    ``genserve_code`` attribute (the runner's output checks do)."""
    own = getattr(exc, "genserve_code", None)
    if own in ErrorCode.__members__.values():
        return ErrorCode(own)
    if "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower():
        return ErrorCode.OUT_OF_MEMORY
    if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer"):
        return ErrorCode.STORAGE_ERROR  # writing the output (to disk or to an object store) failed
    return ErrorCode.INTERNAL


class Priority(IntEnum):
    """Lower value is served first. Aging lowers a waiting job's effective value (see queues.py)."""

    HIGH = 0
    STANDARD = 1
    LOW = 2

    @classmethod
    def parse(cls, name: str) -> "Priority":
        return cls[name.upper()]


class BatchKey(NamedTuple):
    """Everything that must be equal for jobs to share one pipeline call. (A named tuple: it is
    hashed on every queue operation, and tuples hash in C.)"""

    model: str
    width: int
    height: int
    num_frames: int = 0  # 0 for image models
    steps: int = 1
    guidance: float = 1.0
    # What else must be equal inside one call, per the model's family (e.g. "neg" when jobs with
    # and without a negative prompt would change each other's output; a conditioning image digest).
    variant: str = ""
    # Execution options that change the computation (a step cache: "deep:interval=3"), so jobs that
    # asked for different trade-offs never share a denoiser call (DESIGN §5).
    execution: str = ""
    # LoRA batching "split" (docs/lora.md): the job's adapter set, so jobs with different adapters
    # never share a call; "" where adapters mix in one call (each row gets its own).
    loras: str = ""

    def label(self) -> str:
        frames = f"x{self.num_frames}f" if self.num_frames else ""
        variant = f":{self.variant}" if self.variant else ""
        execution = f":{self.execution}" if self.execution else ""
        loras = f":lora[{self.loras}]" if self.loras else ""
        return f"{self.model}:{self.width}x{self.height}{frames}:{self.steps}st:g{self.guidance:g}{variant}{execution}{loras}"


@dataclass(frozen=True)
class ModelLimits:
    """The per-model knobs the engine needs (validated at the config edge)."""

    max_batch_size: int = 1
    max_wait_s: float = 0.0  # 0 = dispatch as soon as a worker is free
    max_queue: int = 256  # queued (not running) jobs per model
    memory_bytes: int = 0  # weights hint used until a worker has measured the model (0 = unknown)
    min_warm: int = 0  # warm pool: workers that keep the model loaded from start-up
    keep_warm_s: float = 0.0  # stay loaded while requests keep arriving within this window
    idle_unload_s: float | None = 120.0  # unload after this long unused (None: never)
    est_job_seconds: float = 1.0  # expected device-seconds per job until batches have been timed
    est_load_seconds: float = 10.0  # expected cold start until a load has been timed
    step_batching: bool = False  # jobs join and leave a running set at denoising-step boundaries

    def stepped(self, key: "BatchKey") -> bool:
        """Whether jobs of ``key`` run in step-level sets: the model batches by steps and the jobs
        are text-only. A key with a variant (an init image, a mask, a conditioning image, ...)
        runs in request-level batches: the step loop drives text-to-image and text-to-video. So
        does a key with a step cache (its cache state lives in one pipeline call)."""
        return self.step_batching and not key.variant and not key.execution

    def queue_key(self, key: "BatchKey") -> "BatchKey":
        """The key a job waits under. Step-level batching shares a running set across step counts
        and guidance (each request keeps its own), so only the shape must match."""
        return key._replace(steps=0, guidance=0.0) if self.stepped(key) else key


@dataclass
class QueuedJob:
    id: str
    key: BatchKey
    priority: Priority
    enqueued_at: float
    attempts: int = 0  # failed attempts so far (an OOM batch split does not count)
    deadline: float | None = None  # fail with `timeout` if not finished by then
    avoid: set[str] = field(default_factory=set)  # workers it failed on: retried elsewhere when possible
    tenant: str | None = None  # None: outside fair share (the fast path)
    weight: float = 1.0  # the tenant's fair-share weight
    vstart: float = 0.0  # fair-share virtual start tag (queues.py); 0 for jobs without a tenant
    alone: bool = False  # its batch failed in a way its own input may cause: it runs in a batch of its own
    loras: tuple[str, ...] = ()  # the LoRA adapters it needs resident (ids; policies/adapters.py)


# ---- decisions: what the engine asks a driver to do --------------------------------------------


@dataclass(frozen=True)
class LoadModel:
    """Load ``model`` on ``worker`` before anything queued behind it on that worker."""

    worker: str
    model: str
    reason: str = "batch"  # batch | warm_pool | preload | operator


@dataclass(frozen=True)
class UnloadModel:
    worker: str
    model: str
    reason: str  # lru | idle | operator


@dataclass(frozen=True)
class ScaleTo:
    """Want ``devices`` devices in all (up + provisioning). The provider starts what is missing;
    surplus devices are retired one by one with ``RetireWorker`` once idle."""

    devices: int
    reason: str


@dataclass(frozen=True)
class RetireWorker:
    worker: str
    reason: str


@dataclass(frozen=True)
class RunBatch:
    batch_id: str
    worker: str
    key: BatchKey
    job_ids: tuple[str, ...]
    needs_load: bool = False  # a LoadModel for this worker precedes it (this batch caused the load)
    waits_for_load: bool = False  # the model is still loading there (its own load, or a preload in flight)
    lora_evict: tuple[str, ...] = ()  # LoRA adapters the worker drops first, so the batch's fit


@dataclass(frozen=True)
class JoinBatch:
    """Step-level batching: add these jobs to the running set ``batch_id`` on ``worker``; they
    start at its next step boundary. A join the worker sees only after the set ended is dropped
    there, and the engine requeues the jobs when the batch's end is reported."""

    batch_id: str
    worker: str
    key: BatchKey
    job_ids: tuple[str, ...]
    lora_evict: tuple[str, ...] = ()  # LoRA adapters the worker drops first, so the joiners' fit


@dataclass(frozen=True)
class PauseRunning:
    """Step-level batching: take these jobs out of the running set at the next step boundary,
    keeping their latents on the worker (a higher-priority job needs the slot). The worker answers
    ``job_paused`` (or the job's outcome, if it finished first)."""

    worker: str
    batch_id: str
    job_ids: tuple[str, ...]


@dataclass(frozen=True)
class CancelRunning:
    """Stop these jobs of a running batch at the next step boundary."""

    worker: str
    batch_id: str
    job_ids: tuple[str, ...]


@dataclass(frozen=True)
class JobDequeued:
    """A queued job left the engine without running (canceled while queued)."""

    job_id: str
    reason: str  # "canceled"


@dataclass(frozen=True)
class FailJob:
    job_id: str
    code: str
    message: str


@dataclass(frozen=True)
class RetryJob:
    """An attempt failed and the job goes back to the queue, runnable from ``not_before`` on,
    on ``model`` (a fallback when it differs from the job's). ``counted`` is False for an OOM
    batch split, which does not use up an attempt."""

    job_id: str
    code: str
    message: str
    attempts: int
    not_before: float
    model: str
    counted: bool = True


@dataclass(frozen=True)
class KillWorker:
    """The worker is hung, stuck inside a step, or silent: kill it. Its running jobs come back
    through ``worker_down`` as failed attempts with ``code``."""

    worker: str
    code: str
    message: str


Decision = (LoadModel | UnloadModel | RunBatch | JoinBatch | PauseRunning | CancelRunning | JobDequeued | FailJob | RetryJob | KillWorker
            | ScaleTo | RetireWorker)


@dataclass(frozen=True)
class Admission:
    accepted: bool
    reason: str = ""  # "queue_full" | "unknown_model"
    retry_after_s: float = 0.0
    share: int = 0  # queue_full because the tenant holds its share (this many) while others wait; 0: the queue is full


@dataclass
class Resident:
    """A model held (or being loaded) by a worker, as the engine plans with it."""

    bytes: int
    last_used: float
    pinned: bool = False  # warm pool: never idle-unloaded, never evicted
    loading: bool = True  # LoadModel sent, ``model_loaded`` not yet seen
    load_started: float = 0.0


@dataclass
class BusyTracker:
    """Busy intervals of one worker, to answer "what share of the last ``window`` was it busy".
    Keeps a running total so a query only looks at the few intervals crossing the window's start."""

    window: float = 60.0
    intervals: deque[tuple[float, float]] = field(default_factory=deque)
    busy_since: float | None = None
    total: float = 0.0  # sum of the lengths of ``intervals``

    def start(self, now: float) -> None:
        self.busy_since = now

    def stop(self, now: float) -> None:
        if self.busy_since is not None:
            self.intervals.append((self.busy_since, now))
            self.total += now - self.busy_since
            self.busy_since = None
        cutoff = now - self.window
        while self.intervals and self.intervals[0][1] <= cutoff:
            s, e = self.intervals.popleft()
            self.total -= e - s

    def utilization(self, now: float) -> float:
        lo = now - self.window
        busy = self.total
        for s, e in self.intervals:
            if s >= lo:
                break
            busy -= min(e, lo) - s  # the part before the window
        if self.busy_since is not None:
            busy += now - max(self.busy_since, lo)
        return max(0.0, min(1.0, busy / self.window))


@dataclass
class WorkerState:
    id: str
    capacity: int | None = None  # bytes; None = not limited
    resident: dict[str, Resident] = field(default_factory=dict)
    batch_id: str | None = None
    batches_run: int = 0
    busy: BusyTracker = field(default_factory=BusyTracker)

    @property
    def idle(self) -> bool:
        return self.batch_id is None

    @property
    def used(self) -> int:
        return sum(r.bytes for r in self.resident.values())

    @property
    def loading(self) -> bool:
        return any(r.loading for r in self.resident.values())


@dataclass
class RunningBatch:
    id: str
    worker: str
    key: BatchKey
    jobs: dict[str, QueuedJob]  # still in the batch: jobs that ended early (output written, canceled) leave
    started_at: float
    size: int = 0  # jobs dispatched: what the batch's time and memory were spent on
    job_ids: tuple[str, ...] = ()  # every job dispatched in it, in order (``jobs`` loses those that ended)
    most_at_once: int = 0  # step-level batching: the largest running set it reached (memory is sized by it)
    joined: int = 0  # step-level batching: how many of ``job_ids`` (the last ones) joined after the start

    def missed_joins(self) -> list[QueuedJob]:
        """Jobs that joined but were never reported by the worker: the set ended before the join
        reached it. (Jobs of the start are always reported, done or canceled.)"""
        return [self.jobs[j] for j in self.job_ids[len(self.job_ids) - self.joined:] if j in self.jobs]
