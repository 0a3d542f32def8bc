"""Retry policy: whether, when and on which model a failed job runs again. Pure; no clock.

Jitter is derived from the job id and the retry number (a hash, not a global RNG), so the same
failure history always yields the same schedule — in the server, the simulator and the tests.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..types import ErrorCode, is_retryable


def _unit(seed: str) -> float:
    """A stable pseudo-random number in [0, 1) for ``seed``."""
    digest = hashlib.blake2b(seed.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: retry 1 waits ``first_s``, retry n ≥ 2 waits ``base_s · factor^(n-2)``,
    capped at ``max_s``, then spread by ± ``jitter`` (a fraction) so retries do not stampede."""

    first_s: float = 0.0
    base_s: float = 5.0
    factor: float = 2.0
    max_s: float = 60.0
    jitter: float = 0.2

    def delay(self, retry: int, seed: str = "") -> float:
        if retry <= 1:
            raw = self.first_s
        else:
            raw = min(self.max_s, self.base_s * self.factor ** (retry - 2))
        if raw <= 0 or self.jitter <= 0:
            return max(0.0, raw)
        spread = 1.0 - self.jitter + 2 * self.jitter * _unit(f"{seed}:{retry}")
        return min(self.max_s, raw * spread)


@dataclass(frozen=True)
class Retry:
    """Run the job again, not before ``at``, on ``model`` (the fallback when it changed)."""

    at: float
    model: str


@dataclass(frozen=True)
class RetryPolicy:
    """Up to ``max_attempts`` attempts for retryable errors, spaced by ``backoff``. After
    ``fallback_after`` failed attempts a model with a fallback is retried on the fallback (once:
    fallbacks do not chain). A retry that could not start before the job's deadline is not made."""

    max_attempts: int = 3
    backoff: Backoff = Backoff()
    fallback_after: int = 2
    fallbacks: Mapping[str, str] = field(default_factory=dict)

    def after_failure(self, job_id: str, model: str, failures: int, code: str, now: float,
                      deadline: float | None = None) -> Retry | None:
        """``failures``: failed attempts so far, this one included. None: fail the job with ``code``."""
        if not is_retryable(code) or failures >= self.max_attempts:
            return None
        at = now + self.backoff.delay(failures, job_id)
        if deadline is not None and at >= deadline:
            return None
        if failures == self.fallback_after and model in self.fallbacks:
            model = self.fallbacks[model]
        return Retry(at, model)

    @staticmethod
    def isolate(batch_size: int, code: str) -> bool:
        """A batch of several that failed with an error that is not the machine's (a bug, or an
        input the pipeline rejects) may have failed because of one job's input: each job then runs
        alone, before anyone's attempt counts, so the one at fault fails alone and the others run."""
        return batch_size > 1 and code in (ErrorCode.INTERNAL, ErrorCode.INVALID_REQUEST)

    @staticmethod
    def split(batch_size: int, code: str) -> int | None:
        """On OOM a batch is halved before anyone's attempt counts; None: nothing left to split."""
        if code != ErrorCode.OUT_OF_MEMORY or batch_size <= 1:
            return None
        return batch_size // 2
