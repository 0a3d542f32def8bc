"""Randomized runs of the engine against a fake fleet: every job finishes, memory is never overcommitted.

The fake driver executes decisions the way the server does — loads and batches complete after a
delay, in order per worker — and only advances time to the next event or ``next_deadline()``.
"""
import heapq
import random

import pytest

from genserve.engine import BatchKey, Engine, FailJob, JobDequeued, LoadModel, ModelLimits, Priority, RunBatch, UnloadModel

MB = 1 << 20
MODELS = ("m-a", "m-b", "m-c", "m-d")


def drive(seed: int, *, preload: bool, warm: bool, workers: int, capacity: int, jobs: int = 150):
    rng = random.Random(seed)
    limits = {m: ModelLimits(rng.choice([1, 2, 4]), rng.choice([0.0, 0.2]), 10_000,
                             min_warm=1 if warm and m == "m-a" else 0, keep_warm_s=rng.choice([0.0, 3.0]),
                             idle_unload_s=rng.choice([None, 2.0, 10.0])) for m in MODELS}
    eng = Engine(limits, preload=preload, aging_s=5.0)
    sizes = {m: (3 + i) * MB for i, m in enumerate(MODELS)}
    events: list = []  # (time, seq, kind, payload)
    seq = 0

    def push(t, kind, payload):
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    t = 0.0
    for i in range(workers):
        eng.worker_up(f"w{i}", 0.0, capacity)
    for i in range(jobs):
        t += rng.expovariate(2.0)
        m = rng.choices(MODELS, weights=[5, 3, 2, 1])[0]
        push(t, "submit", (f"j{i}", BatchKey(m, 64, rng.choice([64, 128]), 0, 4, 1.0), Priority(rng.randrange(3))))
    busy_until = {f"w{i}": 0.0 for i in range(workers)}
    done, failed = set(), set()
    now = 0.0

    def execute(decisions, now):
        for d in decisions:
            if isinstance(d, LoadModel):
                busy_until[d.worker] = max(busy_until[d.worker], now) + 0.5
                push(busy_until[d.worker], "loaded", (d.worker, d.model))
            elif isinstance(d, RunBatch):
                busy_until[d.worker] = max(busy_until[d.worker], now) + 0.3 * len(d.job_ids)
                push(busy_until[d.worker], "finished", d)
            elif isinstance(d, FailJob):
                failed.add(d.job_id)
            elif isinstance(d, (UnloadModel, JobDequeued)):
                pass
        for w in eng.workers.values():
            assert w.used <= w.capacity, (w.id, w.used, w.capacity)

    execute(eng.step(0.0), 0.0)
    while events or eng.queued():
        deadline = eng.next_deadline(now)
        if events and (deadline is None or events[0][0] <= deadline):
            now, _, kind, p = heapq.heappop(events)
            if kind == "submit":
                assert eng.submit(p[0], p[1], p[2], now).accepted
            elif kind == "loaded":
                if p[1] in eng.workers[p[0]].resident:
                    eng.model_loaded(p[0], p[1], sizes[p[1]], now)
            elif kind == "finished":
                eng.batch_finished(p.batch_id, now, int(1.5 * MB) * len(p.job_ids))
                done.update(p.job_ids)
        elif deadline is not None:
            assert deadline >= now
            now = deadline
        else:
            pytest.fail(f"stuck at t={now:.2f}: {eng.queued()} queued, nothing will wake the engine")
        execute(eng.step(now), now)
        assert now < 10_000, "no progress"
    assert done | failed == {f"j{i}" for i in range(jobs)} and not failed
    return eng


@pytest.mark.parametrize("seed", [*range(12), 41])  # 41 once deadlocked: a full worker, all models wanted
def test_every_job_finishes_and_memory_is_never_overcommitted(seed):
    rng = random.Random(1000 + seed)
    drive(seed, preload=rng.random() < 0.6, warm=rng.random() < 0.5, workers=rng.choice([1, 2, 3]),
          capacity=rng.choice([12, 16, 40]) * MB)
