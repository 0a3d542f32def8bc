"""Step-level batching in the pure engine: waiting jobs join a running set of their shape at the
next step instead of waiting for the whole batch; priority orders who joins; no head-of-line
blocking across shapes; joins that miss the set are requeued, never lost."""
import random

from genserve.engine import (
    BatchKey, CancelRunning, Engine, JobDequeued, JoinBatch, Liveness, ModelLimits, PauseRunning, Priority, RetryJob,
    RunBatch,
)

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


def test_jobs_with_image_inputs_run_request_level_batches_on_a_step_model():
    """A key with a variant (img2img, inpaint, a conditioning image) keeps its steps and guidance
    in its queue key and never joins a running set: the step loop drives text jobs only."""
    eng = make()
    img2img = key(steps=8)._replace(variant="img2img:s0.8")
    eng.submit("a", img2img, Priority.STANDARD, 0.0)
    [run] = of(eng.step(0.0), RunBatch)
    assert run.key == img2img  # steps and guidance kept: the worker runs it as one pipeline call
    eng.submit("b", img2img, Priority.STANDARD, 1.0)
    assert not of(eng.step(1.0), JoinBatch)  # same key, room in the batch: still no join
    assert eng.running_batch(run.batch_id).job_ids == ("a",)
    text = make()
    text.submit("t", key(steps=8), Priority.STANDARD, 0.0)
    [run] = of(text.step(0.0), RunBatch)
    assert run.key == key(steps=0, guidance=0.0)  # a text job's set: each job brings its own


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


def test_a_set_whose_model_failed_to_load_takes_no_join():
    # found by a property test: a join looked up the model's residency on the worker after the
    # load had failed (KeyError in the engine's step, between load_failed and batch_failed)
    eng = make()
    eng.submit("a", key(), Priority.STANDARD, 0.0)
    [run] = of(eng.step(0.0), RunBatch)
    assert run.needs_load
    eng.model_load_failed("w0", "img", 1.0)
    eng.submit("b", key(), Priority.STANDARD, 1.0)
    assert of(eng.step(1.0), JoinBatch) == []
    eng.batch_failed(run.batch_id, "model_load_failed", "no such model", 2.0)
    assert eng.is_queued("b")


# ---- priority at step boundaries: a high job pauses a low one ------------------------------------


def full_set(eng, priorities):
    eng.submit("j0", key(), priorities[0], 0.0)
    [run] = of(eng.step(0.0), RunBatch)
    for i, p in enumerate(priorities[1:], 1):
        eng.submit(f"j{i}", key(), p, 0.5)
    of(eng.step(0.5), JoinBatch)
    return run


def test_a_high_job_pauses_the_last_joined_low_job_of_a_full_set_and_takes_its_slot():
    eng = make(max_batch=3)
    run = full_set(eng, [Priority.LOW, Priority.STANDARD, Priority.LOW])
    eng.submit("hi", key(), Priority.HIGH, 1.0)
    out = eng.step(1.0)
    [pause] = of(out, PauseRunning)
    [join] = of(out, JoinBatch)
    assert pause.job_ids == ("j2",) and pause.batch_id == run.batch_id and join.job_ids == ("hi",)
    [retry] = eng.job_paused("j2", 1.1)
    assert isinstance(retry, RetryJob) and retry.code == "preempted" and not retry.counted
    assert eng.is_queued("j2")
    eng.job_ended("hi", 2.0)  # the high job leaves: the paused one comes back
    [back] = of(eng.step(2.0), JoinBatch)
    assert back.job_ids == ("j2",)


def test_standard_jobs_never_pause_anyone():
    eng = make(max_batch=2)
    full_set(eng, [Priority.LOW, Priority.LOW])
    eng.submit("std", key(), Priority.STANDARD, 1.0)
    assert eng.step(1.0) == []


def test_a_job_being_paused_is_never_lost():
    # canceled while its pause is in flight: it ends canceled when the pause lands
    eng = make(max_batch=1)
    full_set(eng, [Priority.LOW])
    eng.submit("hi", key(), Priority.HIGH, 1.0)
    of(eng.step(1.0), PauseRunning)
    [cancel] = eng.cancel("j0", 1.1)
    assert cancel.job_ids == ("j0",)
    [gone] = eng.job_paused("j0", 1.2)
    assert isinstance(gone, JobDequeued) and not eng.is_queued("j0")
    # its worker dies before the pause lands: back in line, no attempt used
    eng2 = make(max_batch=1)
    full_set(eng2, [Priority.LOW])
    eng2.submit("hi", key(), Priority.HIGH, 1.0)
    of(eng2.step(1.0), PauseRunning)
    out = eng2.worker_down("w0", 1.5)
    assert {d.job_id for d in of(out, RetryJob) if not d.counted and d.code == "preempted"} == {"j0"}
    assert eng2.is_queued("j0")
    # it finished its last step before the pause landed: done, not requeued
    eng3 = make(max_batch=1)
    full_set(eng3, [Priority.LOW])
    eng3.submit("hi", key(), Priority.HIGH, 1.0)
    of(eng3.step(1.0), PauseRunning)
    eng3.job_ended("j0", 1.1)
    assert eng3.job_paused("j0", 1.2) == [] and not eng3.is_queued("j0")


def test_random_join_leave_cancel_pause_sequences_finish_every_job_exactly_once():
    """A model of the worker's running sets (joins enter at the next boundary, pauses and cancels
    apply there, each job counts its own steps, a paused job resumes with its progress on the same
    worker) driven by the engine's decisions over random arrivals and cancels."""
    kinds: dict[str, int] = {}
    for seed in range(20):
        rng = random.Random(seed)
        eng = make(max_batch=3, workers=2)
        sets: dict[str, dict] = {}  # batch id -> {"worker", "members": {job: steps left}, "pending": [], "pause": set(), "cancel": set()}
        parked: dict[str, tuple[str, int]] = {}  # job -> (worker, steps left)
        steps_of, done_steps, outcome = {}, {}, {}
        n_jobs, now = 30, 0.0

        def carry(decisions):
            for d in decisions:
                kinds[type(d).__name__] = kinds.get(type(d).__name__, 0) + 1
                if isinstance(d, RunBatch):
                    sets[d.batch_id] = {"worker": d.worker, "members": {}, "pending": list(d.job_ids), "pause": set(),
                                        "cancel": set()}
                elif isinstance(d, JoinBatch):
                    sets[d.batch_id]["pending"] += d.job_ids
                elif isinstance(d, PauseRunning):
                    sets[d.batch_id]["pause"].update(d.job_ids)
                elif isinstance(d, CancelRunning):
                    sets[d.batch_id]["cancel"].update(d.job_ids)
                elif isinstance(d, JobDequeued):
                    assert d.job_id not in outcome
                    outcome[d.job_id] = "canceled"

        for i in range(n_jobs):
            steps_of[f"j{i}"] = rng.choice([1, 2, 3, 5])
        arrivals = {rng.randrange(0, 40): [] for _ in range(n_jobs)}
        for i in range(n_jobs):
            arrivals.setdefault(rng.randrange(0, 40), []).append(f"j{i}")
        for tick in range(400):
            now = float(tick)
            for jid in arrivals.get(tick, []):
                prio = rng.choice([Priority.LOW, Priority.STANDARD, Priority.HIGH])
                eng.submit(jid, key(steps=steps_of[jid]), prio, now)
            if rng.random() < 0.08:
                live = [f"j{i}" for i in range(n_jobs) if f"j{i}" in steps_of and f"j{i}" not in outcome]
                if live:
                    carry(eng.cancel(rng.choice(live), now))
            carry(eng.step(now))
            for bid, st in list(sets.items()):  # one step boundary on every running set
                for jid in st["pending"]:
                    w_left = parked.pop(jid, None)
                    st["members"][jid] = w_left[1] if w_left and w_left[0] == st["worker"] else steps_of[jid]
                st["pending"] = []
                for jid in [j for j in st["members"] if j in st["cancel"]]:
                    del st["members"][jid]
                    eng.job_ended(jid, now)
                    assert jid not in outcome
                    outcome[jid] = "canceled"
                for jid in [j for j in st["members"] if j in st["pause"]]:
                    parked[jid] = (st["worker"], st["members"].pop(jid))
                    carry(eng.job_paused(jid, now))
                st["pause"].clear()
                for jid in list(st["members"]):
                    st["members"][jid] -= 1
                    done_steps[jid] = done_steps.get(jid, 0) + 1
                    if st["members"][jid] == 0:
                        del st["members"][jid]
                        eng.job_ended(jid, now)
                        assert jid not in outcome, f"{jid} finished twice"
                        outcome[jid] = "done"
                if not st["members"]:
                    del sets[bid]
                    carry(eng.batch_finished(bid, now))
            if len(outcome) == n_jobs:
                break
        assert len(outcome) == n_jobs, f"seed {seed}: {n_jobs - len(outcome)} jobs never ended"
        assert not eng.has_pending()
        for jid, how in outcome.items():
            if how == "done":
                assert done_steps[jid] >= steps_of[jid]  # a job resumed elsewhere starts over
    # the sequences exercised what they are about
    assert kinds.get("JoinBatch", 0) > 20 and kinds.get("PauseRunning", 0) > 5 and kinds.get("CancelRunning", 0) > 5, kinds


def test_a_job_isolated_after_a_failed_set_neither_joins_nor_takes_joiners():
    eng = make(max_batch=4)
    eng.submit("a", key(), Priority.STANDARD, 0.0)
    [run] = of(eng.step(0.0), RunBatch)
    eng.submit("b", key(), Priority.STANDARD, 0.5)
    of(eng.step(0.5), JoinBatch)
    out = eng.batch_failed(run.batch_id, "internal", "TypeError: bad input", 1.0)  # the set failed as a whole
    assert {d.job_id for d in of(out, RetryJob)} == {"a", "b"}
    first = of(eng.step(1.0), RunBatch)
    assert [r.job_ids for r in first] == [("a",)]  # each runs alone
    eng.submit("c", key(), Priority.STANDARD, 1.5)
    assert of(eng.step(1.5), JoinBatch) == []  # nobody joins a set that isolates a job
