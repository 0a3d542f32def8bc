"""The retry policy's boundaries (engine/policies/retry.py): the last attempt, a retry that would
start exactly at the deadline, and the attempt after which a job moves to its fallback model."""
from genserve.engine import ErrorCode
from genserve.engine.policies.retry import Backoff, Retry, RetryPolicy

NO_JITTER = Backoff(first_s=0.0, base_s=5.0, factor=2.0, max_s=60.0, jitter=0.0)
CRASH = ErrorCode.WORKER_CRASHED


def test_the_last_attempt_is_not_retried():
    p = RetryPolicy(max_attempts=3, backoff=NO_JITTER)
    assert p.after_failure("j", "m", 2, CRASH, 10.0) == Retry(15.0, "m")  # attempt 3 may still run
    assert p.after_failure("j", "m", 3, CRASH, 10.0) is None  # three failed: that was the last


def test_a_retry_that_would_start_at_the_deadline_is_not_made():
    p = RetryPolicy(max_attempts=5, backoff=NO_JITTER)
    # The second failure waits 5 s: at 15.0. A deadline of exactly 15.0 leaves no time to run.
    assert p.after_failure("j", "m", 2, CRASH, 10.0, deadline=15.0) is None
    assert p.after_failure("j", "m", 2, CRASH, 10.0, deadline=15.001) == Retry(15.0, "m")
    # The first retry starts at once: still not when the deadline is now.
    assert p.after_failure("j", "m", 1, CRASH, 10.0, deadline=10.0) is None
    assert p.after_failure("j", "m", 1, CRASH, 10.0, deadline=10.5) == Retry(10.0, "m")


def test_the_fallback_is_taken_after_exactly_fallback_after_failures_and_does_not_chain():
    p = RetryPolicy(max_attempts=6, backoff=NO_JITTER, fallback_after=2, fallbacks={"big": "small", "small": "tiny"})
    assert p.after_failure("j", "big", 1, CRASH, 0.0).model == "big"  # one failure: same model
    assert p.after_failure("j", "big", 2, CRASH, 0.0).model == "small"  # the second: the fallback
    # On the fallback, a further failure stays there: "small" has a fallback of its own, not taken.
    assert p.after_failure("j", "small", 3, CRASH, 0.0).model == "small"
    assert p.after_failure("j", "small", 4, CRASH, 0.0).model == "small"


def test_errors_that_are_not_the_machines_are_not_retried():
    p = RetryPolicy(max_attempts=3, backoff=NO_JITTER)
    assert p.after_failure("j", "m", 1, ErrorCode.INTERNAL, 0.0) is None
    assert p.after_failure("j", "m", 1, ErrorCode.OUT_OF_MEMORY, 0.0) == Retry(0.0, "m")
