"""KeyedQueues and priority aging (engine/queues.py). Pure data structures: no clock, no engine."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genserve.engine.queues import KeyedQueues, effective_rank, order_key
from genserve.engine.types import BatchKey, Priority, QueuedJob

A = BatchKey("a", 64, 64, 0, 4, 1.0)
A_BIG = BatchKey("a", 128, 128, 0, 4, 1.0)
B = BatchKey("b", 64, 64, 9, 4, 1.0)


def job(id, key=A, priority=Priority.STANDARD, t=0.0):
    return QueuedJob(id, key, priority, t)


def filled(*jobs):
    q = KeyedQueues()
    for j in jobs:
        q.add(j)
    return q


def ids(jobs):
    return [j.id for j in jobs]


# ---- bookkeeping ---------------------------------------------------------------------------------


def test_empty():
    q = KeyedQueues()
    assert len(q) == 0 and not q
    assert "x" not in q
    assert q.keys() == [] and q.depth("a") == 0 and q.size(A) == 0
    assert list(q.jobs(A)) == [] and q.ordered(A, 0.0, 10.0) == [] and q.all_ordered(0.0, 10.0) == []


def test_add_counts_per_model_and_per_key():
    q = filled(job("1", A), job("2", A_BIG), job("3", A), job("4", B))
    assert len(q) == 4
    assert all(j in q for j in ("1", "2", "3", "4")) and "5" not in q
    assert q.depth("a") == 3 and q.depth("b") == 1 and q.depth("zzz") == 0  # depth is per model...
    assert q.size(A) == 2 and q.size(A_BIG) == 1 and q.size(B) == 1  # ...size per batch key
    assert set(q.keys()) == {A, A_BIG, B}
    assert set(ids(q.jobs(A))) == {"1", "3"}


def test_remove_returns_the_job_and_updates_every_count():
    j2 = job("2", A_BIG)
    q = filled(job("1", A), j2, job("3", A))
    assert q.remove("2") is j2
    assert "2" not in q and len(q) == 2
    assert q.depth("a") == 2 and q.size(A_BIG) == 0
    assert A_BIG not in q.keys()  # an emptied key disappears
    q.remove("1")
    q.remove("3")
    assert len(q) == 0 and q.depth("a") == 0 and q.keys() == []


def test_remove_unknown_raises_and_changes_nothing():
    q = filled(job("1"))
    with pytest.raises(KeyError):
        q.remove("nope")
    assert len(q) == 1 and q.depth("a") == 1


def test_a_removed_job_can_be_added_again():
    q = filled(job("1", t=1.0), job("2", t=2.0))
    j = q.remove("1")
    q.add(j)  # a retry keeps its original enqueue time
    assert len(q) == 2 and q.depth("a") == 2 and q.oldest_enqueued(A) == 1.0
    assert ids(q.ordered(A, 5.0, 0.0)) == ["1", "2"]


# ---- the oldest-enqueued cache -------------------------------------------------------------------


def test_oldest_enqueued_is_recomputed_after_the_oldest_leaves():
    q = filled(job("old", t=1.0), job("mid", t=2.0), job("new", t=3.0))
    assert q.oldest_enqueued(A) == 1.0
    q.remove("old")
    assert q.oldest_enqueued(A) == 2.0
    q.remove("new")  # not the oldest: the cache stays right
    assert q.oldest_enqueued(A) == 2.0
    q.remove("mid")
    q.add(job("later", t=7.0))
    assert q.oldest_enqueued(A) == 7.0  # a key emptied and refilled does not remember its past


def test_oldest_enqueued_follows_an_older_job_added_after_the_cache_was_filled():
    q = filled(job("1", t=5.0))
    assert q.oldest_enqueued(A) == 5.0
    q.add(job("retry", t=2.0))  # a retried job rejoins with its original (earlier) time
    assert q.oldest_enqueued(A) == 2.0
    q.add(job("2", t=9.0))
    assert q.oldest_enqueued(A) == 2.0
    q.remove("retry")
    assert q.oldest_enqueued(A) == 5.0


def test_oldest_enqueued_with_two_jobs_of_the_same_time():
    q = filled(job("1", t=3.0), job("2", t=3.0), job("3", t=4.0))
    assert q.oldest_enqueued(A) == 3.0
    q.remove("1")
    assert q.oldest_enqueued(A) == 3.0
    q.remove("2")
    assert q.oldest_enqueued(A) == 4.0


def test_oldest_enqueued_is_per_key():
    q = filled(job("a", A, t=1.0), job("big", A_BIG, t=2.0), job("b", B, t=0.5))
    assert (q.oldest_enqueued(A), q.oldest_enqueued(A_BIG), q.oldest_enqueued(B)) == (1.0, 2.0, 0.5)
    q.remove("b")
    assert q.oldest_enqueued(A) == 1.0


# ---- service order ----------------------------------------------------------------------------------


def test_ordered_by_priority_then_time_then_id():
    q = filled(
        job("low-early", priority=Priority.LOW, t=0.0),
        job("std-late", priority=Priority.STANDARD, t=2.0),
        job("std-early-b", priority=Priority.STANDARD, t=1.0),
        job("std-early-a", priority=Priority.STANDARD, t=1.0),
        job("high", priority=Priority.HIGH, t=3.0),
    )
    assert ids(q.ordered(A, 3.0, 0.0)) == ["high", "std-early-a", "std-early-b", "std-late", "low-early"]


def test_ordered_only_returns_the_keys_jobs():
    q = filled(job("1", A), job("2", A_BIG), job("3", B, Priority.HIGH))
    assert ids(q.ordered(A, 0.0, 0.0)) == ["1"]
    assert q.ordered(BatchKey("zzz", 1, 1), 0.0, 0.0) == []


def test_all_ordered_merges_every_key():
    q = filled(
        job("a-std", A, Priority.STANDARD, 1.0),
        job("big-high", A_BIG, Priority.HIGH, 2.0),
        job("b-std", B, Priority.STANDARD, 0.5),
        job("b-low", B, Priority.LOW, 0.0),
    )
    assert ids(q.all_ordered(2.0, 0.0)) == ["big-high", "b-std", "a-std", "b-low"]


def test_aging_changes_the_order_over_time():
    q = filled(job("low", priority=Priority.LOW, t=0.0), job("high", priority=Priority.HIGH, t=15.0))
    assert ids(q.ordered(A, 15.0, 10.0)) == ["high", "low"]  # low promoted once: standard
    assert ids(q.ordered(A, 20.0, 10.0)) == ["low", "high"]  # twice: competes as high, and is older
    assert ids(q.all_ordered(20.0, 10.0)) == ["low", "high"]
    assert ids(q.ordered(A, 1000.0, 0.0)) == ["high", "low"]  # aging off: never promoted


def test_order_key_shape():
    j = job("x", priority=Priority.LOW, t=4.0)
    assert order_key(j, 4.0, 10.0) == (2, 4.0, "x")
    assert order_key(j, 14.0, 10.0) == (1, 4.0, "x")


# ---- aging ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("waited, rank", [(0.0, 2), (9.999, 2), (10.0, 1), (19.99, 1), (20.0, 0), (25.0, 0),
                                          (1e6, 0)])
def test_effective_rank_one_class_per_aging_period_never_below_high(waited, rank):
    assert effective_rank(job("x", priority=Priority.LOW, t=100.0), 100.0 + waited, 10.0) == rank


def test_effective_rank_of_each_class():
    for p in Priority:
        j = job("x", priority=p, t=0.0)
        assert effective_rank(j, 0.0, 10.0) == int(p)
        assert effective_rank(j, 10.0, 10.0) == max(0, int(p) - 1)


@pytest.mark.parametrize("aging_s", [0.0, -1.0, -30.0])
def test_aging_zero_or_negative_disables_promotion(aging_s):
    j = job("x", priority=Priority.LOW, t=0.0)
    assert effective_rank(j, 1e9, aging_s) == int(Priority.LOW)


def test_clock_before_enqueue_time_does_not_demote_or_promote():
    j = job("x", priority=Priority.STANDARD, t=50.0)
    assert effective_rank(j, 10.0, 5.0) == int(Priority.STANDARD)


@settings(max_examples=200, deadline=None)
@given(priority=st.sampled_from(list(Priority)), waited=st.floats(0, 1e4, allow_nan=False),
       aging_s=st.floats(0.01, 1e3, allow_nan=False))
def test_effective_rank_is_monotone_in_waiting_time(priority, waited, aging_s):
    j = job("x", priority=priority, t=0.0)
    r = effective_rank(j, waited, aging_s)
    assert 0 <= r <= int(priority)
    assert effective_rank(j, waited + aging_s, aging_s) <= r
    assert effective_rank(j, waited, aging_s) == max(0, int(priority) - int(waited // aging_s))


# ---- against a reference model -------------------------------------------------------------------

KEYS = [A, A_BIG, B]
_op = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(KEYS), st.sampled_from(list(Priority)),
              st.integers(0, 20).map(float)),  # few distinct times: ties happen
    st.tuples(st.just("remove"), st.integers(0, 1000)),
    st.tuples(st.just("oldest"), st.sampled_from(KEYS)),
)


@settings(max_examples=250, deadline=None)
@given(ops=st.lists(_op, max_size=60), now=st.floats(0, 100), aging_s=st.sampled_from([0.0, 5.0, 30.0]))
def test_matches_a_plain_dict_under_any_add_remove_sequence(ops, now, aging_s):
    """Counts, membership, keys, the oldest-enqueued cache and both orders agree with a plain
    dict of jobs recomputed from scratch, whatever the sequence (the cache is read mid-way so
    stale values would be caught)."""
    q = KeyedQueues()
    ref: dict[str, QueuedJob] = {}
    seq = 0
    for op in ops:
        if op[0] == "add":
            _, key, prio, t = op
            seq += 1
            j = QueuedJob(f"j{seq:03d}", key, prio, t)
            q.add(j)
            ref[j.id] = j
        elif op[0] == "remove":
            if not ref:
                continue
            victim = sorted(ref)[op[1] % len(ref)]
            assert q.remove(victim) is ref.pop(victim)
        else:
            key = op[1]
            if q.size(key):
                assert q.oldest_enqueued(key) == min(j.enqueued_at for j in ref.values() if j.key == key)
        assert len(q) == len(ref)
        assert set(q.keys()) == {j.key for j in ref.values()}
        for m in ("a", "b"):
            assert q.depth(m) == sum(1 for j in ref.values() if j.key.model == m)
        for key in q.keys():
            mine = [j for j in ref.values() if j.key == key]
            assert q.size(key) == len(mine)
            assert q.oldest_enqueued(key) == min(j.enqueued_at for j in mine)
    for jid in ref:
        assert jid in q
    expected = sorted(ref.values(), key=lambda j: (effective_rank(j, now, aging_s), j.enqueued_at, j.id))
    assert ids(q.all_ordered(now, aging_s)) == ids(expected)
    for key in KEYS:
        assert ids(q.ordered(key, now, aging_s)) == [j.id for j in expected if j.key == key]


# ---- the order index: positions and orders against a brute-force reference ----------------------


def _reference_order(jobs, now, aging_s):
    """Every job's wide order key, from scratch: in a key holding a tenant's job each priority class
    ages by its oldest job and orders by (tag, time, id); elsewhere each job ages by its own wait."""
    keyed = []
    for j in jobs:
        same_key = [o for o in jobs if o.key == j.key]
        if any(o.tenant is not None for o in same_key):
            oldest = min(o.enqueued_at for o in same_key if o.priority == j.priority)
            rank = max(0, int(j.priority) - int(max(0.0, now - oldest) // aging_s)) if aging_s > 0 else int(j.priority)
            keyed.append(((rank, j.vstart, j.enqueued_at, j.id), j))
        else:
            keyed.append(((effective_rank(j, now, aging_s), 0.0, j.enqueued_at, j.id), j))
    return sorted(keyed, key=lambda kj: kj[0])


_wop = st.one_of(
    st.tuples(st.just("enter"), st.sampled_from(KEYS), st.sampled_from(list(Priority)),
              st.sampled_from([None, "t1", "t2", "t3"]), st.sampled_from([0.5, 1.0, 3.0])),
    st.tuples(st.just("serve"), st.integers(0, 1000)),
    st.tuples(st.just("cancel"), st.integers(0, 1000)),
    st.tuples(st.just("retry"), st.integers(0, 1000)),
    st.tuples(st.just("tick"), st.integers(1, 20).map(float)),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(_wop, max_size=80), aging_s=st.sampled_from([0.0, 5.0, 30.0]), later=st.floats(0, 200))
def test_positions_and_orders_match_a_full_sort(ops, aging_s, later):
    """Whatever jobs enter (with and without tenants, in every class, keys that switch between
    plain and fair), are served (the virtual clock moves), canceled or retried (back with their
    tag and queue time), every job's ``queue_position`` and every key's order, head and oldest job
    equal what sorting all queued jobs from scratch gives, at the time of the events and later
    (aging moves jobs and classes)."""
    from genserve.engine.policies.batching import BATCHING
    from genserve.engine.types import ModelLimits
    from genserve.engine.waiting import Waiting

    w = Waiting({"a": ModelLimits(4, 0.0, 10_000), "b": ModelLimits(4, 0.0, 10_000)}, BATCHING["greedy"](), aging_s)
    now, seq, live = 0.0, 0, {}

    def check(t):
        for model in ("a", "b"):
            ref = [j for _, j in _reference_order([j for j in live.values() if j.key.model == model], t, aging_s)]
            assert [w.position(j.id, t) for j in ref] == list(range(len(ref)))
        full = _reference_order(list(live.values()), t, aging_s)
        for key in KEYS:
            mine = [(k, j) for k, j in full if j.key == key]
            assert ids(w.ordered(key, t)) == [j.id for _, j in mine]
            if mine:
                assert w.head_order(key, t) == mine[0][0] and w.first(key, t).id == mine[0][1].id
                assert w.queues.oldest_enqueued(key) == min(j.enqueued_at for _, j in mine)

    for op in ops:
        if op[0] == "enter":
            _, key, prio, tenant, weight = op
            seq += 1
            j = QueuedJob(f"j{seq:03d}", key, prio, now, tenant=tenant, weight=weight)
            w.enter(j)
            live[j.id] = j
        elif op[0] == "tick":
            now += op[1]
        elif live:
            victim = sorted(live)[op[1] % len(live)]
            if op[0] == "retry":  # a failed attempt: out, then back in line (same tag, same time)
                w.requeue(w.take(victim), now, now)
            else:
                w.take(victim, served=op[0] == "serve")
                del live[victim]
        check(now)
    check(now + later)
    assert w.position("nope", now) is None
