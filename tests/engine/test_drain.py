"""Draining (server shutdown) on a fake timeline: no new batches, running ones finish or are
interrupted and requeued without using up an attempt; stale deadline entries do not pile up."""
from genserve.engine import BatchKey, CancelRunning, Engine, JobDequeued, Liveness, ModelLimits, Priority, RetryJob, RunBatch

IMG = BatchKey("img", 64, 64, 0, 8, 1.0)


def make(workers=2, wait_s=0.0):
    eng = Engine({"img": ModelLimits(2, wait_s, 100)}, liveness=Liveness.OFF)
    for i in range(workers):
        eng.worker_up(f"w{i}", 0.0)
    return eng


def test_draining_dispatches_nothing_new_and_running_batches_finish():
    eng = make(workers=2)
    for j in ("a", "b"):
        eng.submit(j, IMG, Priority.STANDARD, 1.0)
    [run] = [d for d in eng.step(1.0) if isinstance(d, RunBatch)]
    eng.drain(2.0)
    eng.submit("c", IMG, Priority.STANDARD, 2.0)  # accepted (durable), but not started while draining
    assert eng.step(2.0) == [] and eng.is_queued("c")
    assert eng.has_running()
    eng.batch_finished(run.batch_id, 3.0)
    assert not eng.has_running()
    assert eng.step(3.0) == [] and eng.is_queued("c")


def test_draining_with_a_ready_queue_does_not_spin_the_timer():
    eng = make(workers=1, wait_s=0.5)
    eng.drain(0.0)
    eng.submit("a", IMG, Priority.STANDARD, 0.0)
    # Its batching window passes at 0.5, but nothing would be dispatched: no wake-up for it.
    assert eng.next_deadline(10.0) is None


def test_interrupt_running_requeues_without_counting_an_attempt_and_keeps_cancels():
    eng = make(workers=1)
    for j in ("a", "b"):
        eng.submit(j, IMG, Priority.STANDARD, 1.0)
    [run] = [d for d in eng.step(1.0) if isinstance(d, RunBatch)]
    assert [type(d) for d in eng.cancel("b", 1.5)] == [CancelRunning]  # on its way to the worker
    eng.drain(2.0)
    out = eng.interrupt_running(5.0)
    assert not eng.has_running()
    retry = [d for d in out if isinstance(d, RetryJob)]
    assert [(d.job_id, d.code, d.attempts, d.counted) for d in retry] == [("a", "interrupted", 0, False)]
    assert [d.job_id for d in out if isinstance(d, JobDequeued)] == ["b"]
    assert eng.is_queued("a") and not eng.is_queued("b")
    # The worker is free again in the engine's books; nothing starts while draining.
    assert eng.step(5.0) == []


def test_stale_deadlines_are_compacted_to_the_live_jobs():
    eng = make(workers=1)
    for i in range(500):
        eng.submit(f"j{i}", IMG, Priority.STANDARD, float(i), deadline=float(i) + 10_000)
        for d in eng.step(float(i)):
            if isinstance(d, RunBatch):
                for j in d.job_ids:
                    eng.job_ended(j, float(i))
                eng.batch_finished(d.batch_id, float(i))
        eng.next_deadline(float(i))
    # Every job finished long before its deadline: the heap holds about the live ones, not 500.
    assert len(eng.waiting._deadlines) <= 130
