"""Fair share across tenants inside a model's queue (engine/queues.py), driven through the engine."""
from hypothesis import given
from hypothesis import strategies as st

from genserve.engine import BatchKey, Engine, ErrorCode, Liveness, ModelLimits, Priority, RetryJob, RunBatch
from genserve.engine.queues import KeyedQueues
from genserve.engine.types import QueuedJob

IMG = BatchKey("img", 64, 64, 0, 8, 1.0)
IMG_BIG = BatchKey("img", 128, 128, 0, 8, 1.0)


def make(max_batch=1, aging_s=30.0, **kw):
    eng = Engine({"img": ModelLimits(max_batch, 0.0, 10_000)}, aging_s=aging_s, liveness=Liveness.OFF, **kw)
    eng.worker_up("w0", 0.0)
    return eng


def served(eng, now, n):
    """Run ``n`` batches one after the other (the model stays resident): the job ids in order."""
    order = []
    for _ in range(n):
        [run] = [d for d in eng.step(now) if isinstance(d, RunBatch)]
        order += run.job_ids
        if run.needs_load:
            eng.model_loaded(run.worker, "img", 1, now)
        now += 1.0
        eng.batch_finished(run.batch_id, now)
    return order


def test_a_burst_does_not_starve_a_trickle():
    eng = make()
    for i in range(100):
        eng.submit(f"burst{i}", IMG, Priority.STANDARD, 0.0, tenant="big")
    for i in range(3):
        eng.submit(f"trickle{i}", IMG, Priority.STANDARD, 0.5 + i, tenant="small")
    order = served(eng, 5.0, 8)
    # The trickle's three jobs alternate with the burst instead of waiting behind 100 jobs.
    assert order[:6] == ["burst0", "trickle0", "burst1", "trickle1", "burst2", "trickle2"]


def test_fair_share_off_is_fifo():
    eng = make(fair_share=False)
    for i in range(10):
        eng.submit(f"burst{i}", IMG, Priority.STANDARD, 0.0, tenant="big")
    eng.submit("trickle0", IMG, Priority.STANDARD, 0.5, tenant="small")
    assert served(eng, 5.0, 11)[-1] == "trickle0"


def test_weights_split_service():
    eng = make()
    for i in range(60):
        eng.submit(f"a{i}", IMG, Priority.STANDARD, 0.0, tenant="a", weight=2.0)
        eng.submit(f"b{i}", IMG, Priority.STANDARD, 0.0, tenant="b", weight=1.0)
    order = served(eng, 1.0, 30)
    assert sum(j.startswith("a") for j in order) == 20  # 2 : 1


def test_priority_classes_still_come_first():
    eng = make()
    for i in range(5):
        eng.submit(f"std{i}", IMG, Priority.STANDARD, 0.0, tenant="a")
    eng.submit("hi", IMG, Priority.HIGH, 1.0, tenant="a")  # same tenant, far behind in tags
    assert served(eng, 2.0, 1) == ["hi"]


def test_aging_promotes_a_class_together_so_the_share_survives():
    eng = make(aging_s=10.0)
    for i in range(50):
        eng.submit(f"burst{i}", IMG, Priority.STANDARD, 0.0, tenant="big")
    eng.submit("hi", IMG, Priority.HIGH, 25.0, tenant="other")
    eng.submit("trickle", IMG, Priority.STANDARD, 25.0, tenant="small")
    # At t=25 the standard class has waited 2 x aging: it competes as high, as a whole; inside
    # it the trickle's fresh job (tag 0) goes before the burst's later jobs.
    order = served(eng, 25.0, 4)
    assert order.index("trickle") < 3 and "burst10" not in order


def test_a_batch_mixes_tenants_by_share():
    eng = make(max_batch=4)
    for i in range(8):
        eng.submit(f"a{i}", IMG, Priority.STANDARD, 0.0, tenant="a")
    eng.submit("b0", IMG, Priority.STANDARD, 0.1, tenant="b")
    assert set(served(eng, 1.0, 1)) == {"a0", "a1", "b0", "a2"}


def test_jobs_without_tenants_keep_the_fifo_order_exactly():
    eng = make(max_batch=2)
    for i in range(6):
        eng.submit(f"j{i}", IMG if i % 2 else IMG_BIG, Priority.STANDARD, float(i))
    assert served(eng, 10.0, 3) == ["j0", "j2", "j1", "j3", "j4"]


def test_retried_jobs_keep_their_tag():
    q = KeyedQueues()
    j = QueuedJob("x", IMG, Priority.STANDARD, 0.0, tenant="a", vstart=3.0)
    q.add(j)
    q.remove("x")
    q.add(j)
    assert q.ordered(IMG, 1.0, 30.0)[0].vstart == 3.0


@given(st.lists(st.sampled_from("abc"), min_size=1, max_size=60))
def test_every_job_is_served_once_and_equal_weights_alternate(tenants):
    eng = make()
    for i, tenant in enumerate(tenants):
        eng.submit(f"{tenant}{i}", IMG, Priority.STANDARD, 0.0, tenant=tenant)
    order = served(eng, 1.0, len(tenants))
    assert sorted(order) == sorted(f"{t}{i}" for i, t in enumerate(tenants))
    seq = [j[0] for j in order]
    # Between two jobs of one tenant, no other tenant is served twice (SFQ with equal weights), and
    # each tenant's own jobs keep their order.
    for t in set(seq):
        mine = [k for k, x in enumerate(seq) if x == t]
        for a, b in zip(mine, mine[1:]):
            between = seq[a + 1:b]
            assert all(between.count(o) <= 1 for o in set(between))
        assert [j for j in order if j[0] == t] == [f"{t}{i}" for i, x in enumerate(tenants) if x == t]


def test_a_flood_cannot_lock_another_tenant_out_of_a_models_queue():
    """Issue 22: a tenant flooding a model (50 submits/s against a worker that serves 2 jobs/s)
    filled its queue and another tenant then got ``queue_full``. Now the flood fills the queue
    while alone, is refused beyond its share once the trickle (1/s) waits, and the trickle is
    never refused; nothing accepted is dropped and the queue stays under twice its limit."""
    q = 100
    eng = Engine({"img": ModelLimits(1, 0.0, q)}, aging_s=30.0, liveness=Liveness.OFF)
    eng.worker_up("w0", 0.0)
    queued: dict[str, set[str]] = {"flood": set(), "trickle": set()}
    refused = {"flood": 0, "trickle": 0}
    sent = {"flood": 0, "trickle": 0}
    over_share, ran = [], []
    running = None  # (batch id, ends at)
    for tick in range(1200):  # 120 s in steps of 0.1 s
        now = tick / 10
        if running is not None and now >= running[1]:
            eng.batch_finished(running[0], now)
            running = None
        wave = [("flood", 5)] + ([("trickle", 1)] if tick >= 50 and tick % 10 == 0 else [])
        for tenant, k in wave:
            for _ in range(k):
                sent[tenant] += 1
                jid = f"{tenant}{sent[tenant]}"
                adm = eng.submit(jid, IMG, Priority.STANDARD, now, tenant=tenant)
                if not adm.accepted:
                    assert adm.reason == "queue_full" and adm.retry_after_s > 0
                    refused[tenant] += 1
                    continue
                queued[tenant].add(jid)
                if tenant == "flood" and queued["trickle"] and len(queued["flood"]) > q // 2:
                    over_share.append((now, len(queued["flood"])))
        for d in eng.step(now):
            if isinstance(d, RunBatch):
                if d.needs_load:
                    eng.model_loaded(d.worker, "img", 1, now)
                running = (d.batch_id, now + 0.5)
                for jid in d.job_ids:
                    queued["flood" if jid.startswith("flood") else "trickle"].discard(jid)
                    ran.append(jid)
        assert len(queued["flood"]) + len(queued["trickle"]) <= 2 * q
    assert sent["trickle"] == 115 and refused["trickle"] == 0  # the trickle: never queue_full
    assert refused["flood"] > 0 and not over_share  # the flood: its share, no more, while others wait
    assert sum(j.startswith("trickle") for j in ran) >= 110  # and the trickle's jobs are served
    assert len(ran) + sum(map(len, queued.values())) == sent["flood"] + sent["trickle"] - sum(refused.values())


def test_a_tenant_joining_or_returning_after_service_began_starts_at_the_virtual_clock():
    """A tenant that arrives (or comes back) once service is under way gets tags from the virtual
    clock — the tag of the last job served — not from 0: it takes its turn with the others instead
    of having all its jobs served first (which a clock that never advanced would do)."""
    eng = make()
    for i in range(12):
        eng.submit(f"a{i}", IMG, Priority.STANDARD, 0.0, tenant="a")
    assert served(eng, 1.0, 6) == [f"a{i}" for i in range(6)]  # the clock is at a5's tag, 5
    for i in range(3):  # b joins: tags 5, 6, 7 — interleaved with a's 6, 7, 8, ...
        eng.submit(f"b{i}", IMG, Priority.STANDARD, 10.0 + i, tenant="b")
    assert served(eng, 20.0, 6) == ["b0", "a6", "b1", "a7", "b2", "a8"]
    # b has left (nothing queued) and returns: its tag is max(clock 8, its own finish 8), so again
    # one for one with a, not ahead of a's remaining jobs.
    for i in range(3, 5):
        eng.submit(f"b{i}", IMG, Priority.STANDARD, 40.0, tenant="b")
    assert served(eng, 50.0, 5) == ["b3", "a9", "b4", "a10", "a11"]


def test_a_retried_job_keeps_its_place_in_line_through_the_engines_retry_path():
    """A job whose attempt failed goes back to its queue with the tag it had (its place in line):
    driven through a real failure and the retry policy, not by setting a tag by hand."""
    eng = make()
    for t in ("a", "b"):
        for i in range(4):
            eng.submit(f"{t}{i}", IMG, Priority.STANDARD, 0.0, tenant=t)
    [run] = [d for d in eng.step(1.0) if isinstance(d, RunBatch)]
    assert run.job_ids == ("a0",)
    eng.model_loaded(run.worker, "img", 1, 1.0)
    retried = [d for d in eng.batch_failed(run.batch_id, ErrorCode.WORKER_CRASHED, "boom", 2.0)
               if isinstance(d, RetryJob)]
    assert [r.job_id for r in retried] == ["a0"] and retried[0].not_before == 2.0  # back in line at once
    # a0 keeps tag 0 (ties with b0 by id); re-tagged it would go behind a3 (tag 4).
    assert served(eng, 3.0, 8) == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]
