"""A job's lifecycle, in one place: the API, the job store, the runtime, the SSE stream, the
bench client and the CLI all use these names."""
from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """``queued`` → ``running`` → one of the terminal statuses (a retried job goes back to
    ``queued``). A terminal job never changes again."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


def is_terminal(status: str | None) -> bool:
    """For statuses read back as plain strings (a store row, an SSE event name)."""
    return status in TERMINAL
