"""The pure scheduling core. See DESIGN.md §1: events and ``now`` in, decisions out.

The facade (``engine.py``) routes events to components, each the only owner of its state (waiting, queues, fleet,
residency_manager, memory, failures, work, scaling, dispatch); the small named policies they consult live in
``policies/``. Imports nothing of genserve outside itself."""
from .engine import Engine
from .policies.liveness import Liveness, RestartPolicy
from .policies.retry import Backoff, RetryPolicy
from .settings import EngineSettings, engine_settings
from .types import (Admission, BatchKey, CancelRunning, Decision, ErrorCode, FailJob, JobDequeued, JoinBatch,
                    KillWorker, LoadModel, ModelLimits, PauseRunning, Priority, RetireWorker, RetryJob, RunBatch,
                    ScaleTo, UnloadModel, is_retryable)

__all__ = [
    "Admission", "Backoff", "BatchKey", "CancelRunning", "Decision", "Engine", "EngineSettings", "ErrorCode",
    "FailJob", "JobDequeued", "JoinBatch", "PauseRunning",
    "KillWorker", "Liveness", "LoadModel", "ModelLimits", "Priority", "RestartPolicy", "RetireWorker", "RetryJob",
    "RetryPolicy", "RunBatch", "ScaleTo", "UnloadModel", "engine_settings", "is_retryable",
]
