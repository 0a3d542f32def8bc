"""Adapter-aware placement at fleet scale, on the production engine with a virtual clock.

Not the full simulator (sim/ does not model adapters yet): this drives ``genserve.engine.Engine``
itself — the same dispatch, placement and adapter residency the server runs — through a small
event loop. 8 workers, each with the base model resident, ``lora_memory`` for ``--fit`` adapters;
500 adapters with Zipf(1.1) popularity; Poisson arrivals at ``--load`` x the fleet's capacity; a
batch costs ``base + per_job x n`` seconds plus ``--load-s`` per adapter it had to load (a miss).
Compared: warm-first with adapter affinity (the default) against the same policy blind to
adapters. Reported: the cold-adapter rate (misses / adapter uses), throughput and latency.

    python benchmarks/lora_sim.py [--jobs 20000] [--workers 8] [--adapters 500] [--fit 40]
"""
from __future__ import annotations

import argparse
import heapq
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from genserve.engine import BatchKey, Engine, ModelLimits, Priority, RunBatch  # noqa: E402
from genserve.engine.policies.placement import PLACEMENT, WarmFirst  # noqa: E402

KEY = BatchKey("base", 1024, 1024, 0, 30, 5.0)
ADAPTER_BYTES = 64 << 20


class Blind(WarmFirst):
    """Warm-first without adapter affinity: what placement did before adapters were resident objects."""

    name = "warm-first-blind"

    def choose(self, *args, **kw):
        kw["affinity"] = lambda w: 0
        return super().choose(*args, **kw)


PLACEMENT[Blind.name] = Blind


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def simulate(placement: str, a) -> dict:
    rng = random.Random(a.seed)
    eng = Engine({"base": ModelLimits(max_batch_size=a.batch, memory_bytes=1 << 30, idle_unload_s=None)},
                 placement=placement, lora_memory=a.fit * ADAPTER_BYTES)
    for i in range(a.workers):  # the base model resident everywhere: only adapters differ
        eng.worker_up(f"w{i}", 0.0, 80 << 30)
        eng.request_load("base", 0.0, f"w{i}")
        eng.model_loaded(f"w{i}", "base", 1 << 30, 0.0)
    weights = [1 / (k + 1) ** 1.1 for k in range(a.adapters)]
    ids = [f"lora{k}" for k in range(a.adapters)]
    capacity = a.workers * a.batch / (a.base_s + a.per_job_s * a.batch)
    rate = capacity * a.load
    events: list = []  # (time, seq, kind, payload)
    seq = 0
    t = 0.0
    for j in range(a.jobs):
        t += rng.expovariate(rate)
        heapq.heappush(events, (t, seq, "arrive", (f"j{j}", rng.choices(ids, weights)[0])))
        seq += 1
    arrived: dict[str, float] = {}
    lat: list[float] = []
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            job_id, lora = payload
            arrived[job_id] = now
            eng.submit(job_id, KEY, Priority.STANDARD, now, loras={lora: ADAPTER_BYTES})
        elif kind == "done":
            batch_id, worker, jobs = payload
            for job_id in jobs:
                lat.append(now - arrived[job_id])
                eng.job_ended(job_id, now)
            eng.batch_finished(batch_id, now)
        for d in eng.step(now):
            if isinstance(d, RunBatch):
                before = eng.adapters.misses
                # the engine's own accounting says how many adapters this batch had to load
                misses = before - getattr(eng, "_bench_misses", 0)
                eng._bench_misses = before  # type: ignore[attr-defined]
                dur = a.base_s + a.per_job_s * len(d.job_ids) + a.load_s * misses
                heapq.heappush(events, (now + dur, seq, "done", (d.batch_id, d.worker, d.job_ids)))
                seq += 1
            elif type(d).__name__ == "LoadModel":
                eng.model_loaded(d.worker, d.model, 1 << 30, now)
    uses = eng.adapters.hits + eng.adapters.misses
    return {"placement": placement, "jobs": len(lat), "cold_adapter_rate": eng.adapters.misses / uses,
            "throughput": len(lat) / max(now, 1e-9), "p50": pct(lat, 50), "p99": pct(lat, 99)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--adapters", type=int, default=500)
    p.add_argument("--fit", type=int, default=40, help="adapters per worker's lora_memory")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--base-s", type=float, default=0.5, help="a batch's fixed seconds")
    p.add_argument("--per-job-s", type=float, default=0.25)
    p.add_argument("--load-s", type=float, default=0.3, help="seconds to load one adapter (a miss)")
    p.add_argument("--load", type=float, default=0.7, help="x the fleet's capacity")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for placement in ("warm-first", Blind.name):
        print(simulate(placement, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
