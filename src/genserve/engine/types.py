"""Plain data the engine takes in and hands out. No behaviour beyond small invariants."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Priority(IntEnum):
    """Lower value is served first. Aging lowers a waiting job's effective value (see queues.py)."""

    HIGH = 0
    STANDARD = 1
    LOW = 2

    @classmethod
    def parse(cls, name: str) -> "Priority":
        return cls[name.upper()]


@dataclass(frozen=True, order=True)
class BatchKey:
    """Everything that must be equal for jobs to share one pipeline call."""

    model: str
    width: int
    height: int
    num_frames: int = 0  # 0 for image models
    steps: int = 1
    guidance: float = 1.0

    def label(self) -> str:
        frames = f"x{self.num_frames}f" if self.num_frames else ""
        return f"{self.model}:{self.width}x{self.height}{frames}:{self.steps}st:g{self.guidance:g}"


@dataclass(frozen=True)
class ModelLimits:
    """The per-model knobs the engine needs (validated at the config edge)."""

    max_batch_size: int = 1
    max_wait_s: float = 0.0  # 0 = dispatch as soon as a worker is free
    max_queue: int = 256  # queued (not running) jobs per model


@dataclass
class QueuedJob:
    id: str
    key: BatchKey
    priority: Priority
    enqueued_at: float
    attempts: int = 0  # failed attempts so far (an OOM batch split does not count)
    deadline: float | None = None  # fail with `timeout` if not finished by then
    avoid: set[str] = field(default_factory=set)  # workers it failed on: retried elsewhere when possible


# ---- decisions: what the engine asks a driver to do --------------------------------------------


@dataclass(frozen=True)
class LoadModel:
    """Load ``model`` on ``worker`` before anything queued behind it on that worker."""

    worker: str
    model: str


@dataclass(frozen=True)
class RunBatch:
    batch_id: str
    worker: str
    key: BatchKey
    job_ids: tuple[str, ...]
    needs_load: bool = False  # a LoadModel for this worker precedes it


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


Decision = LoadModel | RunBatch | CancelRunning | JobDequeued | FailJob | RetryJob | KillWorker


@dataclass(frozen=True)
class Admission:
    accepted: bool
    reason: str = ""  # "queue_full" | "unknown_model"
    retry_after_s: float = 0.0


@dataclass
class WorkerState:
    id: str
    resident: set[str] = field(default_factory=set)
    batch_id: str | None = None
    batches_run: int = 0

    @property
    def idle(self) -> bool:
        return self.batch_id is None


@dataclass
class RunningBatch:
    id: str
    worker: str
    key: BatchKey
    jobs: dict[str, QueuedJob]
    started_at: float
