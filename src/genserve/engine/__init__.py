"""The pure scheduling core. See DESIGN.md §1: events and ``now`` in, decisions out."""
from .engine import Engine
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
    RetireWorker,
    RunBatch,
    ScaleTo,
    UnloadModel,
)

__all__ = [
    "Admission", "BatchKey", "CancelRunning", "Decision", "Engine", "FailJob", "JobDequeued", "LoadModel",
    "ModelLimits", "Priority", "RetireWorker", "RunBatch", "ScaleTo", "UnloadModel",
]
