"""Failure handling on a fake timeline: retries, backoff, OOM splits, fallbacks, deadlines and
liveness, as events and times in, decisions out. No torch, no event loop."""
import pytest
from genserve.engine.types import classify_exception

from genserve.engine import (
    Backoff, BatchKey, CancelRunning, Engine, ErrorCode, FailJob, JobDequeued, KillWorker, Liveness, ModelLimits,
    Priority, RestartPolicy, RetryJob, RetryPolicy, RunBatch, is_retryable,
)

A = BatchKey("a", 64, 64, 0, 4, 1.0)
B = BatchKey("b", 64, 64, 0, 4, 1.0)
BACKOFF = Backoff(first_s=0.0, base_s=5.0, factor=2.0, max_s=60.0, jitter=0.2)


def make(workers=1, max_batch=8, retry=None, liveness=Liveness.OFF):
    limits = ModelLimits(max_batch, 0.0, 1000)
    eng = Engine({"a": limits, "b": limits}, retry=retry or RetryPolicy(backoff=BACKOFF), liveness=liveness)
    for i in range(workers):
        eng.worker_up(f"w{i}", 0.0)
    return eng


def runs(decisions):
    return [d for d in decisions if isinstance(d, RunBatch)]


def of(kind, decisions):
    return [d for d in decisions if isinstance(d, kind)]


def test_taxonomy_classifies_retryable_codes():
    assert {c.value for c in ErrorCode} == {"out_of_memory", "timeout", "worker_crashed", "model_load_failed",
                                            "storage_error", "invalid_request", "canceled", "internal", "preempted",
                                            "output_mismatch", "interrupted"}
    assert is_retryable("preempted") and is_retryable("out_of_memory") and is_retryable("worker_crashed")
    assert is_retryable("timeout") and is_retryable("interrupted")
    assert not is_retryable("invalid_request") and not is_retryable("canceled") and not is_retryable("internal")
    assert not is_retryable("output_mismatch")  # the same pipeline returns the same wrong size again

    class Mismatch(RuntimeError):
        genserve_code = "output_mismatch"

    assert classify_exception(Mismatch("64x64")) == ErrorCode.OUTPUT_MISMATCH


def test_backoff_is_immediate_then_exponential_with_bounded_deterministic_jitter():
    assert BACKOFF.delay(1, "job") == 0.0
    for n, nominal in ((2, 5.0), (3, 10.0), (4, 20.0), (5, 40.0), (9, 60.0)):
        d = BACKOFF.delay(n, "job")
        assert 0.8 * nominal <= d <= min(60.0, 1.2 * nominal)
        assert d == BACKOFF.delay(n, "job")  # the same history, the same schedule
    assert len({BACKOFF.delay(2, f"job{i}") for i in range(20)}) > 10  # spread across jobs
    assert Backoff(base_s=5, jitter=0).delay(3) == 10.0


def test_retry_schedule_on_a_fake_timeline_then_fail_with_the_code():
    eng = make(retry=RetryPolicy(max_attempts=3, backoff=BACKOFF))
    eng.submit("j", A, Priority.STANDARD, 0.0)
    [run] = runs(eng.step(0.0))
    # Attempt 1 fails at t=1: retried at once.
    [retry] = eng.batch_failed(run.batch_id, "storage_error", "disk full", 1.0)
    assert retry == RetryJob("j", "storage_error", "disk full", 1, 1.0, "a")
    [run] = runs(eng.step(1.0))
    # Attempt 2 fails at t=2: waits ~5 s (jitter), as an engine deadline, not a sleep.
    [retry] = eng.batch_failed(run.batch_id, "storage_error", "disk full", 2.0)
    assert 2.0 + 4.0 <= retry.not_before <= 2.0 + 6.0 and retry.attempts == 2
    assert eng.is_queued("j") and eng.queue_position("j", 2.0) is None  # waiting out its backoff
    assert eng.next_deadline(2.0) == retry.not_before
    assert eng.step(retry.not_before - 0.01) == []
    [run] = runs(eng.step(retry.not_before))
    # Attempt 3 fails: max_attempts reached, the job fails with the specific code.
    assert eng.batch_failed(run.batch_id, "storage_error", "disk full", 9.0) == [
        FailJob("j", "storage_error", "disk full (attempt 3 of 3)")]
    assert not eng.is_queued("j")


def test_non_retryable_error_fails_at_once():
    eng = make()
    eng.submit("j", A, Priority.STANDARD, 0.0)
    [run] = runs(eng.step(0.0))
    assert eng.batch_failed(run.batch_id, "internal", "bug", 1.0) == [FailJob("j", "internal", "bug (attempt 1 of 3)")]


def test_retry_goes_to_another_worker_and_waits_for_one_rather_than_reuse_the_failed_one():
    eng = make(workers=2)
    eng.submit("j", A, Priority.STANDARD, 0.0)
    eng.submit("k", B, Priority.STANDARD, 0.0)
    first = {r.job_ids[0]: r for r in runs(eng.step(0.0))}
    failed_on = first["j"].worker
    eng.batch_failed(first["j"].batch_id, "out_of_memory", "OOM", 1.0)
    # Its old worker is idle, the other is busy: the job waits for the other one — for an event,
    # so there is no timer to spin on meanwhile.
    assert runs(eng.step(1.0)) == []
    assert eng.next_deadline(1.0) is None
    eng.batch_finished(first["k"].batch_id, 2.0)
    [again] = runs(eng.step(2.0))
    assert again.job_ids == ("j",) and again.worker != failed_on


def test_single_worker_still_retries_on_itself():
    eng = make(workers=1)
    eng.submit("j", A, Priority.STANDARD, 0.0)
    [run] = runs(eng.step(0.0))
    eng.worker_down("w0", 1.0)
    eng.worker_up("w0", 2.0)
    assert runs(eng.step(2.0))[0].job_ids == ("j",)


def test_oom_splits_the_batch_without_using_an_attempt_and_remembers_the_size():
    eng = make(workers=1, max_batch=8)
    ids = [f"j{i}" for i in range(8)]
    for i, j in enumerate(ids):
        eng.submit(j, A, Priority.STANDARD, i / 100)
    [run] = runs(eng.step(0.1))
    assert len(run.job_ids) == 8
    out = eng.batch_failed(run.batch_id, "out_of_memory", "CUDA out of memory", 1.0)
    assert [d.job_id for d in out] == ids and all(not d.counted and d.not_before == 1.0 for d in out)
    [half] = runs(eng.step(1.0))
    assert half.job_ids == tuple(ids[:4])
    out = eng.batch_failed(half.batch_id, "out_of_memory", "OOM", 2.0)
    [quarter] = runs(eng.step(2.0))
    assert len(quarter.job_ids) == 2
    eng.batch_finished(quarter.batch_id, 3.0)
    # New work of the same shape on this worker starts at the remembered size.
    for i in range(8):
        eng.submit(f"n{i}", A, Priority.STANDARD, 3.0)
    assert len(runs(eng.step(3.0))[0].job_ids) == 2


def test_oom_with_a_single_job_is_a_failed_attempt():
    eng = make(workers=1, max_batch=8)
    eng.submit("j", A, Priority.STANDARD, 0.0)
    [run] = runs(eng.step(0.0))
    [retry] = eng.batch_failed(run.batch_id, "out_of_memory", "OOM", 1.0)
    assert retry.counted and retry.attempts == 1


def test_fallback_model_after_two_failed_attempts_then_max_attempts():
    eng = make(retry=RetryPolicy(max_attempts=3, backoff=Backoff(jitter=0, base_s=1.0), fallbacks={"a": "b"}))
    eng.submit("j", A, Priority.STANDARD, 0.0)
    [r1] = runs(eng.step(0.0))
    assert eng.batch_failed(r1.batch_id, "model_load_failed", "bad weights", 1.0)[0].model == "a"
    [r2] = runs(eng.step(1.0))
    [retry] = eng.batch_failed(r2.batch_id, "model_load_failed", "bad weights", 2.0)
    assert retry.model == "b" and retry.not_before == 3.0
    [r3] = runs(eng.step(3.0))
    assert r3.key == B and r3.job_ids == ("j",)  # the fallback model serves it, with the same shape
    assert of(FailJob, eng.batch_failed(r3.batch_id, "model_load_failed", "also bad", 4.0))[0].code == "model_load_failed"


def test_canceled_job_in_a_failed_batch_ends_canceled():
    eng = make()
    eng.submit("j", A, Priority.STANDARD, 0.0)
    eng.submit("k", A, Priority.STANDARD, 0.0)
    [run] = runs(eng.step(0.0))
    eng.cancel("j", 0.5)
    out = eng.worker_down("w0", 1.0)
    assert JobDequeued("j", "canceled") in out and of(RetryJob, out)[0].job_id == "k"


def test_job_that_finished_before_its_worker_died_is_not_run_again():
    eng = make()
    eng.submit("j", A, Priority.STANDARD, 0.0)
    eng.submit("k", A, Priority.STANDARD, 0.0)
    runs(eng.step(0.0))
    eng.job_ended("j", 0.9)  # its output was written
    assert [d.job_id for d in eng.worker_down("w0", 1.0)] == ["k"]
    assert not eng.is_queued("j")


def test_queued_job_past_its_deadline_fails_with_timeout_without_running():
    eng = make(workers=0)
    eng.submit("j", A, Priority.STANDARD, 0.0, deadline=5.0)
    assert eng.next_deadline(0.0) == 5.0
    assert eng.step(4.9) == []
    assert eng.step(5.0) == [FailJob("j", "timeout", "deadline passed before the job could run")]
    eng.worker_up("w0", 6.0)
    assert eng.step(6.0) == []


def test_retry_that_would_start_after_the_deadline_is_not_made():
    eng = make(retry=RetryPolicy(backoff=Backoff(first_s=10.0, jitter=0)))
    eng.submit("j", A, Priority.STANDARD, 0.0, deadline=5.0)
    [run] = runs(eng.step(0.0))
    assert of(FailJob, eng.batch_failed(run.batch_id, "worker_crashed", "x", 1.0))[0].code == "worker_crashed"


def test_running_job_past_deadline_is_stopped_and_a_stuck_worker_is_killed_after_grace():
    eng = make(liveness=Liveness(hang_timeout_s=100.0, heartbeat_timeout_s=None, stop_grace_s=2.0))
    eng.submit("j", A, Priority.STANDARD, 0.0, deadline=3.0)
    eng.submit("k", A, Priority.STANDARD, 0.0)
    [run] = runs(eng.step(0.0))
    eng.batch_progress(run.batch_id, 1.0)
    assert eng.next_deadline(1.0) == 3.0
    out = eng.step(3.0)
    assert out == [FailJob("j", "timeout", "deadline passed while running"), CancelRunning("w0", run.batch_id, ("j",))]
    assert eng.next_deadline(3.0) == 5.0  # the grace period
    assert eng.step(4.9) == []
    [kill] = eng.step(5.0)
    assert kill == KillWorker("w0", "timeout", "worker did not stop within 2s (stuck inside a step)")
    assert eng.step(5.5) == []  # asked once
    # The kill lands: the other job of the batch has a failed attempt (timeout) and is retried.
    assert eng.worker_down("w0", 6.0) == [RetryJob("k", "timeout", kill.message, 1, 6.0, "a")]


def test_stop_honoured_at_a_step_boundary_means_no_kill():
    eng = make(liveness=Liveness(hang_timeout_s=100.0, heartbeat_timeout_s=None, stop_grace_s=2.0))
    eng.submit("j", A, Priority.STANDARD, 0.0)
    [run] = runs(eng.step(0.0))
    eng.cancel("j", 1.0)
    eng.batch_progress(run.batch_id, 1.5)  # the next step boundary came
    assert eng.step(3.5) == []


def test_hung_batch_kills_its_worker_with_timeout():
    eng = make(liveness=Liveness(hang_timeout_s=10.0, heartbeat_timeout_s=None, stop_grace_s=2.0))
    eng.submit("j", A, Priority.STANDARD, 0.0)
    [run] = runs(eng.step(0.0))
    eng.batch_progress(run.batch_id, 4.0)
    assert eng.next_deadline(4.0) == 14.0
    assert of(KillWorker, eng.step(14.0)) == [KillWorker("w0", "timeout", "no progress for 10s (worker hung)")]
    assert of(RetryJob, eng.worker_down("w0", 14.5))[0].code == "timeout"


def test_silent_worker_is_killed_and_heartbeats_keep_an_idle_one_alive():
    eng = make(workers=2, liveness=Liveness(hang_timeout_s=None, heartbeat_timeout_s=5.0, stop_grace_s=None))
    for t in (2.0, 4.0, 6.0, 8.0):
        eng.worker_seen("w0", t)
    assert eng.next_deadline(4.0) == 5.0  # w1, last heard of at 0
    out = eng.step(10.0)
    assert out == [KillWorker("w1", "worker_crashed", "no heartbeat for 5s")]
    # A worker being killed gets no new work.
    eng.submit("j", A, Priority.STANDARD, 10.0)
    assert runs(eng.step(10.0))[0].worker == "w0"


def test_restart_policy_backs_off_then_quarantines():
    policy = RestartPolicy(backoff=Backoff(first_s=0.5, base_s=1.0, factor=2.0, jitter=0), quarantine_after=3,
                           window_s=60.0)
    assert policy.after_exit([10.0], 10.0) == 0.5
    assert policy.after_exit([10.0, 11.0], 11.0) == 1.0
    assert policy.after_exit([10.0, 11.0, 13.0], 13.0) is None  # quarantined
    assert policy.after_exit([10.0, 11.0, 200.0], 200.0) == 0.5  # old crashes are forgiven


@pytest.mark.parametrize("code, split", [("out_of_memory", 4), ("worker_crashed", None)])
def test_split_only_for_oom(code, split):
    assert RetryPolicy.split(8, code) == split and RetryPolicy.split(1, "out_of_memory") is None


# ---- a job whose input breaks the pipeline fails alone ---------------------------------------------


def test_a_batch_that_fails_on_one_jobs_input_is_split_and_only_that_job_fails():
    eng = make(max_batch=8)
    for i, j in enumerate(("j1", "bad", "j3", "j4")):
        eng.submit(j, A, Priority.STANDARD, i / 10)
    [run] = runs(eng.step(0.5))
    assert run.job_ids == ("j1", "bad", "j3", "j4")
    out = eng.batch_failed(run.batch_id, "internal", "TypeError: bad input", 1.0)
    # Everyone runs again, alone, and no attempt is used up (it may be anyone's input).
    assert [(d.job_id, d.counted, d.attempts) for d in of(RetryJob, out)] == [
        ("j1", False, 0), ("bad", False, 0), ("j3", False, 0), ("j4", False, 0)]
    assert not of(FailJob, out)
    # A newcomer of the same shape still batches, but never with the jobs that run alone.
    eng.submit("new1", A, Priority.STANDARD, 1.0)
    eng.submit("new2", A, Priority.STANDARD, 1.0)
    sizes, failed, t = [], [], 1.0
    while eng.queue_depth("a"):
        [r] = runs(eng.step(t))
        sizes.append(r.job_ids)
        if "bad" in r.job_ids:
            assert r.job_ids == ("bad",)
            failed += of(FailJob, eng.batch_failed(r.batch_id, "internal", "TypeError: bad input", t + 0.5))
        else:
            eng.batch_finished(r.batch_id, t + 0.5)
        t += 1.0
    assert sizes == [("j1",), ("bad",), ("j3",), ("j4",), ("new1", "new2")]
    assert failed == [FailJob("bad", "internal", "TypeError: bad input (attempt 1 of 3)")]


def test_a_single_job_with_an_internal_error_fails_at_once_and_retryable_errors_are_not_split():
    eng = make(max_batch=8)
    eng.submit("j", A, Priority.STANDARD, 0.0)
    [run] = runs(eng.step(0.0))
    assert eng.batch_failed(run.batch_id, "internal", "bug", 1.0) == [FailJob("j", "internal", "bug (attempt 1 of 3)")]
    for j in ("x", "y"):
        eng.submit(j, A, Priority.STANDARD, 2.0)
    [run] = runs(eng.step(2.0))
    out = eng.batch_failed(run.batch_id, "storage_error", "disk full", 3.0)
    assert [d.counted for d in of(RetryJob, out)] == [True, True]  # the machine's fault: a counted attempt
    [again] = runs(eng.step(3.0))
    assert again.job_ids == ("x", "y")  # and still batched together


def test_a_job_canceled_while_its_batch_failed_is_not_run_again():
    eng = make(max_batch=8)
    for j in ("a1", "a2"):
        eng.submit(j, A, Priority.STANDARD, 0.0)
    [run] = runs(eng.step(0.0))
    eng.cancel("a1", 0.5)
    out = eng.batch_failed(run.batch_id, "internal", "bug", 1.0)
    assert of(JobDequeued, out) == [JobDequeued("a1", "canceled")]
    assert [d.job_id for d in of(RetryJob, out)] == ["a2"]
    [r] = runs(eng.step(1.0))
    assert r.job_ids == ("a2",)
