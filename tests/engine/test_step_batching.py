"""Step-level batching in the pure engine: waiting jobs join a running set of their shape at the
next step instead of waiting for the whole batch; priority orders who joins; no head-of-line
blocking across shapes; joins that miss the set are requeued, never lost."""
from genserve.engine import BatchKey, Engine, Liveness, ModelLimits, Priority, RetryJob, RunBatch
from genserve.engine.types import JoinBatch

MB = 1 << 20


def key(steps=8, guidance=5.0, size=64):
    return BatchKey("img", size, size, 0, steps, guidance)


def make(max_batch=4, workers=1, step=True, capacity=None, **kw):
    eng = Engine({"img": ModelLimits(max_batch, 0.0, 100, step_batching=step)}, liveness=Liveness.OFF, **kw)
    for i in range(workers):
        eng.worker_up(f"w{i}", 0.0, capacity)
    return eng


def warm(eng, *workers, at=0.0):
    for w in workers:
        eng.request_load("img", at, w)
        eng.model_loaded(w, "img", 10 * MB, at)


def of(decisions, kind):
    return [d for d in decisions if isinstance(d, kind)]


def test_later_arrivals_join_the_running_set_whatever_their_steps_and_guidance():
    eng = make()
    eng.submit("a", key(steps=40), Priority.STANDARD, 0.0)
    [run] = of(eng.step(0.0), RunBatch)
    assert run.job_ids == ("a",)  # no batching window: it starts at once
    eng.submit("b", key(steps=8, guidance=1.0), Priority.STANDARD, 1.0)
    eng.submit("c", key(steps=20, guidance=7.5), Priority.STANDARD, 1.1)
    [join] = of(eng.step(1.1), JoinBatch)
    assert join.batch_id == run.batch_id and join.worker == "w0" and join.job_ids == ("b", "c")
    assert eng.running_batch(run.batch_id).job_ids == ("a", "b", "c")


def test_request_level_models_never_join():
    eng = make(step=False)
    eng.submit("a", key(), Priority.STANDARD, 0.0)
    of(eng.step(0.0), RunBatch)
    eng.submit("b", key(), Priority.STANDARD, 1.0)
    assert eng.step(1.0) == []


def test_the_set_never_exceeds_max_batch_size_and_high_priority_joins_first():
    eng = make(max_batch=3)
    eng.submit("a", key(), Priority.STANDARD, 0.0)
    [run] = of(eng.step(0.0), RunBatch)
    eng.submit("low1", key(), Priority.LOW, 1.0)
    eng.submit("low2", key(), Priority.LOW, 1.0)
    eng.submit("hi", key(), Priority.HIGH, 1.5)
    [join] = of(eng.step(1.5), JoinBatch)
    assert join.job_ids == ("hi", "low1")  # two slots left; the high-priority job takes one first
    assert eng.step(1.6) == []  # full
    eng.job_ended("a", 2.0)  # a finished its last step and left
    [join2] = of(eng.step(2.0), JoinBatch)
    assert join2.job_ids == ("low2",)


def test_no_head_of_line_blocking_across_shapes():
    eng = make(workers=2)
    warm(eng, "w0", "w1")
    eng.submit("big", key(size=128), Priority.STANDARD, 0.0)
    eng.submit("small", key(size=64), Priority.STANDARD, 0.0)
    runs = of(eng.step(0.0), RunBatch)
    assert {r.job_ids for r in runs} == {("big",), ("small",)}
    by_job = {r.job_ids[0]: r for r in runs}
    # a job of another shape waits for a set of its own; jobs of a running shape join theirs
    eng.submit("small2", key(size=64), Priority.STANDARD, 1.0)
    eng.submit("mid", key(size=96), Priority.STANDARD, 1.0)
    [join] = of(eng.step(1.0), JoinBatch)
    assert join.job_ids == ("small2",) and join.batch_id == by_job["small"].batch_id


def test_an_idle_warm_worker_gets_a_set_of_its_own_instead_of_a_join():
    eng = make(workers=2)
    eng.submit("a", key(), Priority.STANDARD, 0.0)
    eng.submit("b", key(), Priority.STANDARD, 0.0)
    # both workers load the model and run
    first = of(eng.step(0.0), RunBatch)
    assert len(first) == 1 and first[0].job_ids == ("a", "b")
    eng.model_loaded(first[0].worker, "img", 10 * MB, 1.0)
    other = "w1" if first[0].worker == "w0" else "w0"
    eng.request_load("img", 1.0, other)
    eng.model_loaded(other, "img", 10 * MB, 2.0)
    eng.submit("c", key(), Priority.STANDARD, 3.0)
    [run] = of(eng.step(3.0), RunBatch)
    assert run.worker == other and run.job_ids == ("c",)


def test_a_join_that_misses_the_set_is_requeued_without_using_an_attempt():
    eng = make()
    eng.submit("a", key(), Priority.STANDARD, 0.0)
    [run] = of(eng.step(0.0), RunBatch)
    eng.submit("b", key(), Priority.STANDARD, 1.0)
    [join] = of(eng.step(1.0), JoinBatch)
    eng.job_ended("a", 2.0)  # the set ended before the join reached the worker
    [retry] = eng.batch_finished(run.batch_id, 2.0)
    assert isinstance(retry, RetryJob) and retry.job_id == "b" and not retry.counted
    [rerun] = of(eng.step(2.0), RunBatch)
    assert rerun.job_ids == ("b",)


def test_joins_stop_when_the_working_memory_of_a_bigger_set_does_not_fit():
    eng = make(capacity=100 * MB, max_batch=8)
    eng.submit("a", key(), Priority.STANDARD, 0.0)
    [run] = of(eng.step(0.0), RunBatch)
    eng.model_loaded("w0", "img", 40 * MB, 1.0)
    eng.job_ended("a", 2.0)
    eng.batch_finished(run.batch_id, 2.0, peak_bytes=20 * MB)  # measured: 20 MB per request
    eng.submit("b", key(), Priority.STANDARD, 3.0)
    [run2] = of(eng.step(3.0), RunBatch)
    for j in ("c", "d", "e", "f"):
        eng.submit(j, key(), Priority.STANDARD, 4.0)
    joins = of(eng.step(4.0), JoinBatch)
    total = 1 + sum(len(j.job_ids) for j in joins)
    assert 1 < total <= 3  # 40 MB weights + 20 MB per request in 100 MB: at most 3 at once
    assert eng.running_batch(run2.batch_id).most_at_once == total
