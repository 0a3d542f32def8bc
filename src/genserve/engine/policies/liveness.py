"""Liveness policies: when a worker counts as hung or silent, and when a crashing one is benched.

Pure: they compare times they are given. The engine applies ``Liveness`` to running batches and
workers; the pool applies ``RestartPolicy`` to worker processes that exited.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..types import ErrorCode
from .retry import Backoff


@dataclass
class BatchWatch:
    """What the engine knows about a running batch's pulse."""

    last_progress: float  # dispatch, model loaded, inference started, a step, an output
    stop_requested: float | None = None  # when some of its jobs were asked to stop (cancel, deadline)


@dataclass(frozen=True)
class Liveness:
    """A running batch with no progress for ``hang_timeout_s`` is hung; one asked to stop that has
    not reached a step boundary ``stop_grace_s`` later is stuck inside a step; a worker not heard
    from (heartbeats included) for ``heartbeat_timeout_s`` is silent. Each gets its worker killed.
    None turns a check off (``Liveness.OFF``: unit tests about other things)."""

    hang_timeout_s: float | None = 600.0
    heartbeat_timeout_s: float | None = 60.0
    stop_grace_s: float | None = 10.0

    def _stuck(self, watch: BatchWatch) -> bool:
        return (self.stop_grace_s is not None and watch.stop_requested is not None
                and watch.last_progress <= watch.stop_requested)

    def batch_kill_at(self, watch: BatchWatch) -> float | None:
        times = []
        if self.hang_timeout_s is not None:
            times.append(watch.last_progress + self.hang_timeout_s)
        if self._stuck(watch):
            times.append(watch.stop_requested + self.stop_grace_s)
        return min(times) if times else None

    def batch_verdict(self, watch: BatchWatch, now: float) -> tuple[str, str] | None:
        """(code, message) when the batch's worker must be killed now."""
        at = self.batch_kill_at(watch)
        if at is None or now < at:
            return None
        if self._stuck(watch) and now >= watch.stop_requested + self.stop_grace_s:
            return ErrorCode.TIMEOUT, f"worker did not stop within {self.stop_grace_s:g}s (stuck inside a step)"
        return ErrorCode.TIMEOUT, f"no progress for {self.hang_timeout_s:g}s (worker hung)"

    def silent_kill_at(self, last_seen: float) -> float | None:
        return None if self.heartbeat_timeout_s is None else last_seen + self.heartbeat_timeout_s


Liveness.OFF = Liveness(None, None, None)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class RestartPolicy:
    """Restart an exited worker after a backoff that grows with its recent crashes; after
    ``quarantine_after`` crashes within ``window_s`` it is quarantined (not restarted) instead."""

    backoff: Backoff = Backoff(first_s=0.5, base_s=1.0, factor=2.0, max_s=30.0, jitter=0.0)
    quarantine_after: int = 5
    window_s: float = 300.0

    def after_exit(self, crash_times: list[float], now: float) -> float | None:
        """``crash_times``: this worker's exits, this one included. The restart delay, or None."""
        recent = sum(1 for t in crash_times if now - t <= self.window_s)
        if recent >= self.quarantine_after:
            return None
        return self.backoff.delay(recent)
