"""The pure scheduling core. See DESIGN.md §1: events and ``now`` in, decisions out."""
from .engine import Engine
from .errors import ErrorCode, is_retryable
from .liveness import Liveness, RestartPolicy
from .retry import Backoff, RetryPolicy
from .settings import EngineSettings, engine_settings
from .types import (
    Admission,
    BatchKey,
    CancelRunning,
    Decision,
    FailJob,
    JobDequeued,
    JoinBatch,
    PauseRunning,
    KillWorker,
    LoadModel,
    ModelLimits,
    Priority,
    RetireWorker,
    RetryJob,
    RunBatch,
    ScaleTo,
    UnloadModel,
)

__all__ = [
    "Admission", "Backoff", "BatchKey", "CancelRunning", "Decision", "Engine", "EngineSettings", "ErrorCode",
    "FailJob", "JobDequeued", "JoinBatch", "PauseRunning",
    "KillWorker", "Liveness", "LoadModel", "ModelLimits", "Priority", "RestartPolicy", "RetireWorker", "RetryJob",
    "RetryPolicy", "RunBatch", "ScaleTo", "UnloadModel", "engine_settings", "is_retryable",
]
