"""Residency on a fake timeline: memory fit, LRU eviction, idle unload, warm pools, preloading."""
import pytest

from genserve.engine import BatchKey, Engine, FailJob, LoadModel, ModelLimits, Priority, RunBatch, UnloadModel

MB = 1 << 20


def key(model, w=64, h=64):
    return BatchKey(model, w, h, 0, 4, 1.0)


def engine(models=("A", "B", "C"), capacity=10 * MB, workers=1, size=4 * MB, preload=False, **limits):
    lim = {"max_batch_size": 4, "max_wait_s": 0.0, "memory_bytes": size, **limits}
    eng = Engine({m: ModelLimits(**lim) for m in models}, preload=preload)
    for i in range(workers):
        eng.worker_up(f"w{i}", 0.0, capacity)
    return eng


def run_one(eng, model, t, job=None, done_after=1.0, peak=0, load_s=0.0):
    """Submit one job, step, confirm any loads, finish the batch. Returns the decisions."""
    job = job or f"{model}@{t}"
    eng.submit(job, key(model), Priority.STANDARD, t)
    decisions = eng.step(t)
    for d in decisions:
        if isinstance(d, LoadModel):
            eng.model_loaded(d.worker, d.model, eng.residency.memory.weights(d.model), t + load_s)
    for d in decisions:
        if isinstance(d, RunBatch):
            eng.batch_finished(d.batch_id, t + done_after, peak)
    return decisions


def resident(eng, w="w0"):
    return sorted(eng.workers[w].resident)


def test_lru_evicts_least_recently_used_first():
    eng = engine(capacity=9 * MB)  # two 4 MB models fit, three do not
    run_one(eng, "A", 0.0)
    run_one(eng, "B", 2.0)
    run_one(eng, "A", 4.0)  # A is now more recent than B
    decisions = run_one(eng, "C", 6.0)
    assert UnloadModel("w0", "B", "lru") in decisions
    assert resident(eng) == ["A", "C"]
    decisions = run_one(eng, "B", 8.0)
    assert UnloadModel("w0", "A", "lru") in decisions  # A (used at 4–5) is older than C (6–7)


def test_fit_uses_measured_bytes_not_hints():
    eng = engine(capacity=9 * MB, size=1 * MB)  # hints say three fit
    for i, m in enumerate("AB"):
        eng.submit(m, key(m), Priority.STANDARD, float(i))
        [load, run] = eng.step(float(i))
        eng.model_loaded("w0", m, (4 + i) * MB, float(i))  # the worker measured 4 and 5 MB
        eng.batch_finished(run.batch_id, i + 0.5)
    assert eng.workers["w0"].used == 9 * MB
    decisions = run_one(eng, "C", 5.0)
    assert UnloadModel("w0", "A", "lru") in decisions  # even C's 1 MB hint no longer fits


def test_batch_shrinks_to_fit_working_memory_and_rest_waits():
    eng = engine(models=("A",), capacity=10 * MB, size=4 * MB)
    # Teach the engine: a batch of 1 at 64x64 needs 1.5 MB of working memory.
    run_one(eng, "A", 0.0, peak=int(1.5 * MB))
    for i in range(4):
        eng.submit(f"j{i}", key("A"), Priority.STANDARD, 10.0)
    [run] = eng.step(10.0)
    assert isinstance(run, RunBatch) and len(run.job_ids) == 4  # 4 MB + 4×1.5 MB = 10 MB fits
    eng.batch_finished(run.batch_id, 11.0, peak_bytes=int(2.5 * MB) * 4)  # it really took 2.5 MB per job
    for i in range(4):
        eng.submit(f"k{i}", key("A"), Priority.STANDARD, 12.0)
    [run] = eng.step(12.0)
    assert len(run.job_ids) == 2  # 4 MB + 2×2.5 MB fits in 10; 3×2.5 would not
    assert eng.queue_depth("A") == 2


def test_never_evicts_a_model_with_queued_work():
    eng = engine(capacity=5 * MB, workers=1, max_wait_s=30.0)  # one model at a time; batches wait 30 s
    eng.request_load("A", 0.0)
    eng.model_loaded("w0", "A", 4 * MB, 1.0)
    eng.submit("a2", key("A"), Priority.STANDARD, 2.0)
    eng.submit("b1", key("B"), Priority.HIGH, 2.0)
    # Both ready at 32 s. B is higher priority, but fitting it would evict A, which has queued work:
    # B waits and A's batch runs on the warm worker.
    [run] = eng.step(40.0)
    assert isinstance(run, RunBatch) and run.job_ids == ("a2",)
    eng.batch_finished(run.batch_id, 41.0)
    # A has no queued work left: now it may go.
    decisions = eng.step(41.0)
    assert decisions[0] == UnloadModel("w0", "A", "lru") and decisions[-1].job_ids == ("b1",)


def test_idle_unload_exactly_after_ttl():
    eng = engine(idle_unload_s=120.0)
    run_one(eng, "A", 0.0, done_after=1.0)  # last used at t=1
    assert eng.next_deadline(1.0) == 121.0
    assert eng.step(120.999) == []
    assert eng.step(121.0) == [UnloadModel("w0", "A", "idle")]
    assert resident(eng) == [] and eng.workers["w0"].used == 0


def test_keep_warm_extends_residency_while_requests_arrive():
    eng = engine(idle_unload_s=10.0, keep_warm_s=60.0)
    run_one(eng, "A", 0.0)
    assert eng.step(30.0) == []  # idle for 29 s, but a request arrived within 60 s
    assert eng.step(60.0) == [UnloadModel("w0", "A", "idle")]


def test_warm_pool_loaded_at_start_and_never_unloaded_or_evicted():
    eng = Engine({"A": ModelLimits(4, 0.0, memory_bytes=4 * MB, min_warm=2, idle_unload_s=5.0),
                  "B": ModelLimits(4, 0.0, memory_bytes=4 * MB)})
    for w in ("w0", "w1", "w2"):
        eng.worker_up(w, 0.0, 5 * MB)
    loads = eng.step(0.0)
    assert sorted((d.worker, d.reason) for d in loads) == [("w0", "warm_pool"), ("w1", "warm_pool")]
    for d in loads:
        eng.model_loaded(d.worker, d.model, 4 * MB, 0.5)
    assert eng.step(10_000.0) == []  # far past idle_unload_s: still loaded
    # B must go to w2; the pinned A copies are never evicted for it, even with w2 busy.
    eng.submit("b1", key("B"), Priority.STANDARD, 10_001.0)
    [load_b, run_b] = eng.step(10_001.0)
    assert run_b.worker == "w2"
    eng.submit("b2", key("B"), Priority.STANDARD, 10_001.5)
    for _ in range(3):
        assert not any(isinstance(d, UnloadModel) for d in eng.step(10_002.0))


def test_warm_workers_are_waited_for_until_saturated():
    eng = engine(models=("A",), workers=2, capacity=None, max_batch_size=1, est_job_seconds=5.0)
    run_one(eng, "A", 0.0, done_after=0.0, load_s=30.0)  # A is warm on one worker; loading took 30 s
    warm = "w0" if "A" in eng.workers["w0"].resident else "w1"
    cold = "w1" if warm == "w0" else "w0"
    eng.submit("x", key("A"), Priority.STANDARD, 1.0)
    [run] = eng.step(1.0)
    assert run.worker == warm
    eng.submit("y", key("A"), Priority.STANDARD, 1.1)
    assert eng.step(1.1) == []  # the warm worker is busy but not saturated: wait, no cold start
    assert eng.next_deadline(1.1) == 1.1 + 1.0  # look again as its utilization rises
    # After 55 of the last 60 s busy, the warm worker is saturated: load on the other one.
    decisions = eng.step(56.0)
    assert [type(d) for d in decisions] == [LoadModel, RunBatch] and decisions[1].worker == cold


def test_backlog_beyond_warm_capacity_counts_as_saturated():
    eng = engine(models=("A",), workers=2, capacity=None, max_batch_size=1)
    run_one(eng, "A", 0.0, done_after=0.0)
    eng.submit("x", key("A"), Priority.STANDARD, 1.0)
    eng.step(1.0)
    for j in ("y", "z"):  # two full batches wait for one busy warm worker: its queue is full
        eng.submit(j, key("A"), Priority.STANDARD, 1.1)
    decisions = eng.step(1.1)
    assert [type(d) for d in decisions] == [LoadModel, RunBatch]


def test_job_that_cannot_fit_any_worker_fails_with_out_of_memory():
    eng = engine(models=("A",), capacity=3 * MB, size=4 * MB)
    eng.submit("big", key("A"), Priority.STANDARD, 0.0)
    [fail] = eng.step(0.0)
    assert isinstance(fail, FailJob) and fail.code == "out_of_memory"


def test_operator_load_and_unload():
    eng = engine(workers=2)
    [load] = eng.request_load("B", 0.0)
    assert isinstance(load, LoadModel) and load.reason == "operator"
    eng.model_loaded(load.worker, "B", 4 * MB, 1.0)
    assert eng.request_unload("B", 2.0) == [UnloadModel(load.worker, "B", "operator")]
    assert eng.request_unload("B", 2.0) == []


def test_preloading_learns_that_a_is_followed_by_b():
    eng = engine(models=("A", "B", "C"), workers=2, capacity=5 * MB, preload=True, idle_unload_s=None)
    # 20 rounds of "A then B" (80 %) or "A then C" (20 %), each job run to completion.
    t = 0.0
    for i in range(20):
        run_one(eng, "A", t)
        t += 2
        run_one(eng, "C" if i % 5 == 4 else "B", t)
        t += 2
    probs = eng.residency.predictor.next_probabilities(t)
    assert probs["A"] > 0.9  # after B or C comes A
    # Now an A request arrives: the idle worker preloads B, the likeliest follower.
    eng.submit("a-last", key("A"), Priority.STANDARD, t)
    decisions = eng.step(t)
    run = next(d for d in decisions if isinstance(d, RunBatch))
    loads = [d for d in decisions if isinstance(d, LoadModel) and d.reason == "preload"]
    assert [d.model for d in loads] == ["B"] and loads[0].worker != run.worker


def test_preloading_never_evicts_a_hotter_model():
    eng = engine(models=("A", "B"), workers=1, capacity=5 * MB, preload=True, idle_unload_s=None)
    for i in range(10):
        run_one(eng, "A", float(i))  # only A: P(next = A) = 1
    assert resident(eng) == ["A"]
    assert eng.step(100.0) == []  # B is never predicted, and A is hotter anyway


def test_evictions_follow_lru_across_workers():
    eng = engine(models=("A", "B", "C"), workers=2, capacity=5 * MB)  # one model per worker
    evicted = []
    for i, m in enumerate("ABCABCA"):
        decisions = run_one(eng, m, float(i * 10))
        evicted += [d.model for d in decisions if isinstance(d, UnloadModel)]
    assert evicted == list("ABCAB")  # always the least recently used model in the whole fleet


def test_unmeasured_model_is_planned_like_the_largest_seen_but_never_failed_on_a_guess():
    eng = Engine({"A": ModelLimits(4, 0.0), "B": ModelLimits(4, 0.0)})
    eng.worker_up("w0", 0.0, 10 * MB)
    run_one(eng, "A", 0.0)
    eng.model_loaded("w0", "A", 6 * MB, 0.5)
    # B has no hint and was never loaded: planned as 6 MB, so A must make room.
    decisions = run_one(eng, "B", 5.0)
    assert UnloadModel("w0", "A", "lru") in decisions
    # A guess that exceeds every worker never fails a job, nor blocks it: it is capped.
    eng2 = Engine({"A": ModelLimits(4, 0.0), "B": ModelLimits(4, 0.0)})
    eng2.worker_up("w0", 0.0, 10 * MB)
    eng2.residency.memory.observe_weights("A", 50 * MB)
    eng2.submit("b", key("B"), Priority.STANDARD, 0.0)
    decisions = eng2.step(0.0)
    assert not any(isinstance(d, FailJob) for d in decisions)
    assert any(isinstance(d, RunBatch) and d.job_ids == ("b",) for d in decisions)


def test_full_worker_whose_models_all_have_queued_work_does_not_deadlock():
    eng = engine(models=("A", "B"), capacity=8 * MB, size=4 * MB, max_wait_s=0.0)
    for m in "AB":  # both loaded before any working memory was known: the worker is full
        eng.request_load(m, 0.0, "w0")
        eng.model_loaded("w0", m, 4 * MB, 0.0)
    eng.residency.memory.observe_batch(key("A"), 1, 1 * MB)
    eng.submit("a", key("A"), Priority.STANDARD, 1.0)
    eng.submit("b", key("B"), Priority.STANDARD, 1.0)
    # Each model protects itself (queued work); with the worker idle and nothing in flight, the
    # best batch may evict the other rather than wait forever.
    decisions = eng.step(1.0)
    assert [type(d) for d in decisions] == [UnloadModel, RunBatch]


def test_memory_and_time_are_learned_even_when_jobs_report_before_the_batch_ends():
    # The server reports each job's output (job_ended) before the batch's end: the batch still
    # counts with its dispatched size.
    eng = engine(models=("A",))
    eng.submit("a1", key("A"), Priority.STANDARD, 0.0)
    eng.submit("a2", key("A"), Priority.STANDARD, 0.0)
    [load, run] = eng.step(0.0)
    eng.model_loaded("w0", "A", 4 * MB, 1.0)
    for j in run.job_ids:
        eng.job_ended(j, 2.0)
    eng.batch_finished(run.batch_id, 3.0, peak_bytes=2 * MB)
    assert eng.residency.memory.working(key("A"), 2) == 2 * MB and eng.residency.memory.working(key("A"), 1) == 1 * MB
    assert eng.job_work(key("A")) == pytest.approx(3.0 / 2)


def test_a_copy_due_for_idle_unload_is_not_skipped_when_the_scan_happens_mid_step():
    eng = Engine({"A": ModelLimits(idle_unload_s=10.0)})
    for w in ("w0", "w1"):
        eng.worker_up(w, 0.0, None)
        eng.request_load("A", 0.0, w)
        eng.model_loaded(w, "A", 1, 0.0)
    eng.submit("j", key("A"), Priority.STANDARD, 20.0)
    [run] = eng.step(20.0)  # one copy runs it; the other has been idle since 0 (due at 10)
    t = eng.next_deadline(20.0)
    assert t == 20.0
    other = "w1" if run.worker == "w0" else "w0"
    assert eng.step(t) == [UnloadModel(other, "A", "idle")]


def test_a_warm_pool_load_that_fails_is_retried_with_backoff_not_in_a_loop():
    eng = Engine({"A": ModelLimits(min_warm=1)})
    eng.worker_up("w0", 0.0, None)
    [load] = eng.step(0.0)
    assert load.reason == "warm_pool"
    eng.model_load_failed("w0", "A", 0.1)
    assert eng.step(0.2) == [] and eng.step(4.0) == []  # backing off
    assert eng.next_deadline(0.2) == pytest.approx(5.1)
    [again] = eng.step(5.1)
    assert again == load
    eng.model_load_failed("w0", "A", 5.2)
    assert eng.step(14.0) == [] and len(eng.step(15.2)) == 1  # 10 s the second time


# ---- estimates are hints, measurements decide (issue 12, item 4) -------------------------------------


def _finish_one(eng, model, t, **finished):
    eng.submit(f"{model}@{t}", key(model), Priority.STANDARD, t)
    decisions = eng.step(t)
    for d in decisions:
        if isinstance(d, LoadModel):
            eng.model_loaded(d.worker, d.model, 4 * MB, t)
    [run] = [d for d in decisions if isinstance(d, RunBatch)]
    eng.batch_finished(run.batch_id, t + 1.0, **finished)


def test_an_estimate_never_fails_a_job_that_was_never_tried():
    eng = engine(models=("A",), capacity=10 * MB)
    # A CPU worker ran A and could only *estimate* its working memory: far more than any worker has.
    _finish_one(eng, "A", 0.0, estimated_bytes=100 * MB)
    assert not eng.residency.memory.working_is_known(key("A"), 1)
    eng.submit("next", key("A"), Priority.STANDARD, 5.0)
    decisions = eng.step(5.0)
    assert not [d for d in decisions if isinstance(d, FailJob)]
    assert [tuple(d.job_ids) for d in decisions if isinstance(d, RunBatch)] == [("next",)]


def test_an_estimate_may_shrink_a_batch():
    eng = engine(models=("A",), capacity=10 * MB)
    _finish_one(eng, "A", 0.0, estimated_bytes=2 * MB)  # 2 MB per job, guessed: 4 MB weights + 3 jobs fit
    for i in range(4):
        eng.submit(f"j{i}", key("A"), Priority.STANDARD, 5.0)
    runs = [d for d in eng.step(5.0) if isinstance(d, RunBatch)]
    assert [len(r.job_ids) for r in runs] == [3]


def test_a_measured_peak_too_large_for_every_worker_fails_the_shape():
    eng = engine(models=("A",), capacity=10 * MB)
    _finish_one(eng, "A", 0.0, peak_bytes=100 * MB)  # a CUDA worker measured it
    eng.submit("next", key("A"), Priority.STANDARD, 5.0)
    fails = [d for d in eng.step(5.0) if isinstance(d, FailJob)]
    assert [(f.job_id, f.code) for f in fails] == [("next", "out_of_memory")]
