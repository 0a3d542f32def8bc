"""LoRA adapters as resident objects of the engine (policies/adapters.py through the engine's
events): LRU eviction within lora_memory, batches sized to what fits, and placement that prefers a
worker holding the base model and the job's adapters, then one holding the base model."""
from genserve.engine import BatchKey, Engine, LoadModel, ModelLimits, Priority, RunBatch
from genserve.engine.policies.adapters import AdapterResidency

MB = 1 << 20
KEY = BatchKey("A", 64, 64, 0, 4, 1.0)


def engine(workers=1, lora_memory=100, **limits):
    eng = Engine({"A": ModelLimits(**{"max_batch_size": 4, "memory_bytes": 4 * MB, **limits})},
                 lora_memory=lora_memory)
    for i in range(workers):
        eng.worker_up(f"w{i}", 0.0, 64 * MB)
    return eng


def run(eng, t, *jobs, report=False):
    """Submit ``jobs`` ((id, {adapter: bytes}) each) together, step, finish what ran. The RunBatch."""
    for job_id, loras in jobs:
        eng.submit(job_id, KEY, Priority.STANDARD, t, loras=loras)
    out = eng.step(t)
    for d in out:
        if isinstance(d, LoadModel):
            eng.model_loaded(d.worker, d.model, 4 * MB, t)
    runs = [d for d in out if isinstance(d, RunBatch)]
    for d in runs:
        if report:  # what the worker says it holds, as the engine planned it
            eng.loras_reported(d.worker, eng.resident_loras(d.worker), t + 0.5)
        eng.batch_finished(d.batch_id, t + 0.5)
    return runs


def test_lru_eviction_within_lora_memory():
    eng = engine(lora_memory=100)  # two 40-byte adapters fit, three do not
    assert run(eng, 0.0, ("j1", {"a": 40}))[0].lora_evict == ()
    assert run(eng, 1.0, ("j2", {"b": 40}))[0].lora_evict == ()
    assert run(eng, 2.0, ("j3", {"c": 40}))[0].lora_evict == ("a",)  # a: least recently used
    assert run(eng, 3.0, ("j4", {"b": 40}))[0].lora_evict == ()  # a hit: b is now the most recent
    assert run(eng, 4.0, ("j5", {"d": 40}))[0].lora_evict == ("c",)
    assert list(eng.resident_loras("w0")) == ["b", "d"]
    assert sum(eng.resident_loras("w0").values()) <= 100
    assert (eng.adapters.hits, eng.adapters.misses) == (1, 4)


def test_a_batch_holds_only_the_adapters_that_fit_together():
    eng = engine(lora_memory=100)
    [b] = run(eng, 0.0, ("j1", {"a": 60}), ("j2", {"b": 60}), ("j3", {}))
    assert b.job_ids == ("j1",)  # j2's adapter does not fit beside a's; j3 waits its turn behind it
    [b2] = run(eng, 1.0)
    assert b2.job_ids == ("j2", "j3") and b2.lora_evict == ("a",)


def test_reported_bytes_replace_the_hints():
    eng = engine(lora_memory=100)
    run(eng, 0.0, ("j1", {"a": 10}))
    eng.loras_reported("w0", {"a": 70}, 1.0)  # measured on the worker
    assert run(eng, 2.0, ("j2", {"b": 40}))[0].lora_evict == ("a",)


def test_placement_prefers_base_model_and_adapters_then_base_model():
    eng = engine(workers=3)
    run(eng, 0.0, ("warm0", {}), ("warm1", {}))  # A loads on w0...
    eng.request_load("A", 0.5, "w1")
    eng.model_loaded("w1", "A", 4 * MB, 0.6)  # ... and on w1; w2 holds nothing
    eng.loras_reported("w0", {"x": 40}, 0.7)
    eng.loras_reported("w2", {"y": 40}, 0.7)
    [b] = run(eng, 1.0, ("jx", {"x": 40}))
    assert b.worker == "w0" and not b.needs_load  # the model and the adapter win over the less loaded w1
    [b] = run(eng, 2.0, ("jn", {}))
    assert b.worker == "w1"  # without adapters: the least loaded warm worker (w0 ran two batches)
    [b] = run(eng, 5.0, ("jy", {"y": 40}))
    assert b.worker in ("w0", "w1") and not b.needs_load  # the model beats the adapter alone (w2)


def test_worker_loss_forgets_its_adapters():
    eng = engine()
    run(eng, 0.0, ("j1", {"a": 40}))
    eng.worker_down("w0", 1.0)
    assert eng.resident_loras("w0") == {}


def test_evictions_never_name_what_the_batch_needs():
    r = AdapterResidency(100)
    r.use("w", ["a", "b"], [])
    assert r.evictions("w", ["b", "c", "d"]) == ["a"]  # over budget even so: b stays, a goes
    assert AdapterResidency(None).evictions("w", ["a"]) == []
