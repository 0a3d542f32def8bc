"""Engine behaviour on a fake timeline: events and times in, decisions out. No torch, no event loop."""
from genserve.engine import (
    BatchKey, CancelRunning, Engine, FailJob, JobDequeued, Liveness, LoadModel, ModelLimits, Priority, RetryJob,
    RunBatch,
)

IMG = BatchKey("img", 64, 64, 0, 8, 1.0)
IMG_BIG = BatchKey("img", 128, 128, 0, 8, 1.0)
VID = BatchKey("vid", 64, 64, 9, 8, 1.0)


def make(max_batch=4, wait_s=0.5, max_queue=100, workers=1, aging_s=30.0, **kw):
    eng = Engine({"img": ModelLimits(max_batch, wait_s, max_queue), "vid": ModelLimits(2, 0.0, max_queue)},
                 aging_s=aging_s, **{"liveness": Liveness.OFF, **kw})
    for i in range(workers):
        eng.worker_up(f"w{i}", 0.0)
    return eng


def runs(decisions):
    return [d for d in decisions if isinstance(d, RunBatch)]


def test_window_zero_dispatches_immediately():
    eng = make(wait_s=0.0)
    eng.submit("a", IMG, Priority.STANDARD, 10.0)
    [run] = runs(eng.step(10.0))
    assert run.job_ids == ("a",) and run.worker == "w0"


def test_batch_waits_for_window_then_dispatches_at_deadline():
    eng = make(max_batch=4, wait_s=0.5)
    eng.submit("a", IMG, Priority.STANDARD, 10.0)
    eng.submit("b", IMG, Priority.STANDARD, 10.2)
    assert eng.step(10.3) == []
    assert eng.next_deadline(10.3) == 10.5  # the oldest job's window, not the newest's
    assert eng.step(10.49) == []
    [run] = runs(eng.step(10.5))
    assert run.job_ids == ("a", "b")


def test_full_batch_dispatches_before_window():
    eng = make(max_batch=3, wait_s=5.0)
    for i, t in enumerate((1.0, 1.1, 1.2)):
        eng.submit(f"j{i}", IMG, Priority.STANDARD, t)
    [run] = runs(eng.step(1.2))
    assert run.job_ids == ("j0", "j1", "j2")


def test_batch_never_exceeds_max_and_rest_waits_for_next_worker():
    eng = make(max_batch=2, wait_s=0.0)
    for i in range(5):
        eng.submit(f"j{i}", IMG, Priority.STANDARD, float(i) / 10)
    [first] = runs(eng.step(1.0))
    assert first.job_ids == ("j0", "j1")
    assert eng.step(1.0) == []  # the only worker is busy
    assert eng.next_deadline(1.0) is None  # nothing to wake for until the batch finishes
    eng.batch_finished(first.batch_id, 2.0)
    [second] = runs(eng.step(2.0))
    assert second.job_ids == ("j2", "j3")


def warm_all(eng, *models):
    for w in eng.workers:
        for m in models:
            eng.request_load(m, 0.0, w)
            eng.model_loaded(w, m, 0, 0.0)


def test_different_shapes_never_share_a_batch():
    eng = make(max_batch=8, wait_s=0.0, workers=3)
    warm_all(eng, "img", "vid")
    submitted = {"small1": IMG, "big": IMG_BIG, "small2": IMG, "video": VID}
    for job_id, key in submitted.items():
        eng.submit(job_id, key, Priority.STANDARD, 0.0)
    batches = runs(eng.step(0.0))
    assert len(batches) == 3
    for b in batches:
        assert {submitted[j] for j in b.job_ids} == {b.key}  # every job in a batch has the batch's key
    by_key = {b.key: set(b.job_ids) for b in batches}
    assert by_key == {IMG: {"small1", "small2"}, IMG_BIG: {"big"}, VID: {"video"}}


def test_steps_and_guidance_are_part_of_the_key():
    eng = make(max_batch=8, wait_s=0.0, workers=2)
    warm_all(eng, "img")
    eng.submit("a", IMG, Priority.STANDARD, 0.0)
    eng.submit("b", BatchKey("img", 64, 64, 0, 20, 1.0), Priority.STANDARD, 0.0)
    assert sorted(len(r.job_ids) for r in runs(eng.step(0.0))) == [1, 1]


def test_priority_classes_served_in_order():
    eng = make(max_batch=1, wait_s=0.0)
    eng.worker_down("w0", 0.0)
    eng.submit("low", IMG, Priority.LOW, 0.0)
    eng.submit("std", IMG, Priority.STANDARD, 0.1)
    eng.submit("high", IMG, Priority.HIGH, 0.2)
    eng.worker_up("w0", 1.0)
    order = []
    for t in (1.0, 2.0, 3.0):
        [run] = runs(eng.step(t))
        order.append(run.job_ids[0])
        eng.batch_finished(run.batch_id, t + 0.5)
    assert order == ["high", "std", "low"]


def test_priority_orders_jobs_inside_one_batch_key():
    eng = make(max_batch=2, wait_s=0.0)
    eng.worker_down("w0", 0.0)
    eng.submit("low", IMG, Priority.LOW, 0.0)
    eng.submit("std", IMG, Priority.STANDARD, 0.1)
    eng.submit("high", IMG, Priority.HIGH, 0.2)
    eng.worker_up("w0", 1.0)
    [run] = runs(eng.step(1.0))
    assert run.job_ids == ("high", "std")


def test_aging_lets_low_priority_overtake_fresh_high_priority():
    eng = make(max_batch=1, wait_s=0.0, aging_s=10.0)
    eng.worker_down("w0", 0.0)
    eng.submit("old-low", IMG, Priority.LOW, 0.0)
    eng.submit("new-high", IMG, Priority.HIGH, 19.0)
    eng.worker_up("w0", 19.5)
    # At 19.5 s the low job is promoted once (standard): the high job still goes first.
    assert runs(eng.step(19.5))[0].job_ids == ("new-high",)
    eng.worker_down("w0", 19.6)  # the batch is lost and requeued; it keeps its queue time
    eng.worker_up("w0", 20.0)
    # At 20 s (2 × aging) the low job competes as high and is older: it wins.
    assert runs(eng.step(20.0))[0].job_ids == ("old-low",)


def test_low_priority_does_not_starve_under_a_stream_of_high():
    eng = make(max_batch=1, wait_s=0.0, aging_s=5.0)
    eng.worker_down("w0", 0.0)
    eng.submit("low", IMG, Priority.LOW, 0.0)
    eng.worker_up("w0", 0.0)
    served_at = None
    t = 0.0
    for i in range(100):
        eng.submit(f"h{i}", IMG, Priority.HIGH, t)
        [run] = runs(eng.step(t))
        if run.job_ids == ("low",):
            served_at = t
            break
        t += 1.0
        eng.batch_finished(run.batch_id, t)
    assert served_at is not None and served_at <= 10.0


def test_queue_limit_is_per_model_and_reports_retry_after():
    eng = make(max_queue=2, wait_s=10.0)
    assert eng.submit("a", IMG, Priority.STANDARD, 0.0).accepted
    assert eng.submit("b", IMG_BIG, Priority.STANDARD, 0.0).accepted
    adm = eng.submit("c", IMG, Priority.STANDARD, 0.0)
    assert not adm.accepted and adm.reason == "queue_full" and adm.retry_after_s >= 1
    assert eng.submit("v", VID, Priority.STANDARD, 0.0).accepted  # other models are unaffected
    assert eng.admit("nope").reason == "unknown_model"
    # Jobs re-entered after a restart were already accepted: they are never turned away.
    assert eng.submit("c", IMG, Priority.STANDARD, 0.0, force=True).accepted
    assert eng.queue_depth("img") == 3


def test_placement_prefers_worker_with_model_loaded_and_loads_otherwise():
    eng = make(max_batch=1, wait_s=0.0, workers=2)
    eng.request_load("img", 0.0, "w1")
    eng.model_loaded("w1", "img", 1000, 0.0)
    eng.submit("a", IMG, Priority.STANDARD, 0.0)
    decisions = eng.step(0.0)
    assert decisions == [RunBatch(decisions[0].batch_id, "w1", IMG, ("a",), False)]
    eng.submit("v", VID, Priority.STANDARD, 0.1)
    load, run = eng.step(0.1)
    assert load == LoadModel("w0", "vid", "batch") and run.worker == "w0" and run.needs_load
    eng.batch_finished(run.batch_id, 1.0)
    eng.submit("v2", VID, Priority.STANDARD, 1.0)
    [again] = eng.step(1.0)
    assert isinstance(again, RunBatch) and again.worker == "w0" and not again.needs_load


def test_cancel_queued_and_running():
    eng = make(max_batch=2, wait_s=0.0)
    eng.submit("a", IMG, Priority.STANDARD, 0.0)
    [run] = runs(eng.step(0.0))
    eng.submit("b", IMG, Priority.STANDARD, 0.1)
    assert eng.cancel("b", 0.2) == [JobDequeued("b", "canceled")]
    assert not eng.is_queued("b")
    assert eng.cancel("a", 0.3) == [CancelRunning("w0", run.batch_id, ("a",))]
    assert eng.cancel("a", 0.4) == []  # idempotent
    assert eng.cancel("unknown", 0.5) == []


def test_worker_loss_requeues_then_fails_after_max_attempts():
    eng = make(max_batch=1, wait_s=0.0, max_attempts=2)
    eng.submit("a", IMG, Priority.STANDARD, 0.0)
    runs(eng.step(0.0))
    # The first retry is immediate: straight back into the queue.
    assert eng.worker_down("w0", 1.0) == [RetryJob("a", "worker_crashed", "worker process died", 1, 1.0, "img")]
    assert eng.is_queued("a")
    eng.worker_up("w0", 2.0)
    runs(eng.step(2.0))
    assert eng.worker_down("w0", 3.0) == [FailJob("a", "worker_crashed", "worker process died (attempt 2 of 2)")]


def test_next_deadline_none_without_queued_jobs_and_idle_worker_count():
    eng = make(wait_s=0.25)
    assert eng.next_deadline(0.0) is None
    eng.submit("a", IMG, Priority.STANDARD, 1.0)
    assert eng.next_deadline(1.0) == 1.25
    eng.step(1.25)
    assert eng.next_deadline(1.25) is None  # dispatched: nothing left to wake for


def test_queue_position_follows_service_order():
    eng = make(wait_s=60.0)
    eng.submit("a", IMG, Priority.LOW, 0.0)
    eng.submit("b", IMG, Priority.HIGH, 1.0)
    eng.submit("c", VID, Priority.STANDARD, 1.0)
    assert eng.queue_position("b", 2.0) == 0
    assert eng.queue_position("a", 2.0) == 1
    assert eng.queue_position("c", 2.0) == 0
    assert eng.queue_position("zzz", 2.0) is None
