"""The error taxonomy: one stable code per way a job can fail, used in job records, API errors,
attempt history and metrics. Whether a code is worth retrying is decided here, once."""
from __future__ import annotations

from enum import StrEnum


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
