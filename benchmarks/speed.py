"""The speed levers of issue 24, measured in one process with the worker's own runner
(``backends.runner.PipelineRunner``, as a worker calls it) on the demo models:

1. prompt-embedding cache: the text-encoding time of a request with a miss vs a hit (the
   embedder's own work, from prompts to the embeddings handed to the pipeline), and jobs with the
   cache off (every prompt encoded) against plain (the cache on: repeated prompts hit);
2. per lever (step caches; ``--compile``: torch.compile full and regional), seconds per job at
   batch 1 and at the largest batch, the speedup over plain, and the output's difference from plain
   (max / mean absolute in levels of 8 bits, PSNR). Random weights: quality figures are indicative
   only (a trained model's features change more smoothly between steps than random ones).

Timings are per job: CPU seconds of the process (with ``--threads 1`` the work done, robust to
other load on a shared machine; the speedups quoted use them) and wall seconds. Each is the best of ``--reps`` runs after a warm-up run, the variants' runs alternating
(the machine's load falls on all of them alike). Use ``--threads 1`` on a shared machine: OpenMP
threads that spin-wait for each other under contention make every run many times slower. Compile time is reported separately (first start; with ``--compile-cache`` set to
a directory used before, the cached start).

    python benchmarks/speed.py [--steps 20] [--reps 3] [--threads 2] [--compile] [--compile-cache DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from genserve.backends.demo import ensure_demo_model
from genserve.backends.runner import PipelineRunner
from genserve.storage import LocalResultStore

MODELS = {
    "image": {"params": {"width": 64, "height": 64, "num_frames": 0, "guidance": 5.0, "fps": 8}, "max_batch": 8,
              "caches": [{"method": "deep", "interval": 3}, {"method": "deep", "interval": 2}]},
    "video": {"params": {"width": 32, "height": 32, "num_frames": 9, "guidance": 5.0, "fps": 8}, "max_batch": 4,
              "caches": [{"method": "first_block", "threshold": 0.1}, {"method": "taylorseer", "interval": 3}]},
}


def raw(kind, output, fps, **_):
    return (np.asarray(output, dtype=np.float32) * (1.0 if kind == "image" else 255.0)).tobytes()


def run_batch(r: PipelineRunner, model: str, n: int, steps: int, cache) -> tuple[tuple[float, float], dict]:
    """(wall seconds, CPU seconds of this process) of one batch, and its outputs."""
    kind = model.split("-")[0]
    params = {**MODELS[kind]["params"], "steps": steps}
    jobs = [{"id": f"{model}-{i}", "prompt": f"a prompt {i}", "negative_prompt": None, "seed": i, "cache": cache}
            for i in range(n)]
    events: list[dict] = []
    t0, c0 = time.perf_counter(), time.process_time()
    r.run({"batch_id": "b", "model": model, "kind": kind, "params": params, "jobs": jobs}, events.append, set())
    took = (time.perf_counter() - t0, time.process_time() - c0)
    done = [e for e in events if e["ev"] == "job_done"]
    outs = {e["job_id"].rsplit("-", 1)[1]: np.frombuffer(r.store.read(e["result"]["key"]), dtype=np.float32)
            for e in done}
    outs["_reused"] = done[0]["execution"]["steps_reused"]  # the first job's (not an output)
    return took, outs


def interleaved(r, variants, n, steps, reps) -> list[tuple[tuple[float, float], dict]]:
    """Best (wall, CPU) seconds per job and the outputs of each variant. Runs alternate between the
    variants (one round of each per repetition, after a warm-up round) so that the load of a shared
    machine falls on all of them alike. With one torch thread, CPU seconds measure the work done,
    whatever else the machine runs; wall seconds include waiting for a core."""
    for _, model, cache in variants:  # warm-up (and the prompt cache's misses)
        run_batch(r, model, n, steps, cache)
    times: list[list[tuple[float, float]]] = [[] for _ in variants]
    outs: list[dict] = [{} for _ in variants]
    for _ in range(reps):
        for i, (_, model, cache) in enumerate(variants):
            t, outs[i] = run_batch(r, model, n, steps, cache)
            times[i].append((t[0] / n, t[1] / n))
    return [((min(w for w, _ in t), min(c for _, c in t)), o) for t, o in zip(times, outs)]


def diff(a: dict, b: dict) -> dict:
    d = np.concatenate([np.abs(a[k].astype(np.float64) - b[k]) for k in a if k != "_reused"])
    mse = float(np.mean(d ** 2))
    return {"max_abs": round(float(d.max()), 2), "mean_abs": round(float(d.mean()), 3),
            "psnr_db": round(10 * np.log10(255.0 ** 2 / mse), 1) if mse else None}  # None: identical


def text_encoding(r: PipelineRunner, model: str, reps: int) -> dict:
    emb, pipe = r.embedders[model], r.pipes[model]
    jobs = [{"prompt": f"an uncached prompt {i}", "negative_prompt": None} for i in range(reps)]
    cfg = emb.path.cfg(pipe, 5.0)
    miss, hit = [], []
    for j in jobs:
        t0 = time.perf_counter()
        emb.job_rows(pipe, [j], cfg, "cpu")
        miss.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        emb.job_rows(pipe, [j], cfg, "cpu")
        hit.append(time.perf_counter() - t0)
    m, h = float(np.median(miss)), float(np.median(hit))
    return {"miss_ms": round(m * 1e3, 3), "hit_ms": round(h * 1e3, 3), "removed": round(1 - h / m, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="image,video")
    p.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile on a CPU)")
    p.add_argument("--compile-modes", default="full,regional")
    p.add_argument("--compile-cache", default=None, help="Inductor cache directory (default: a fresh one)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    root = Path(tempfile.mkdtemp(prefix="genserve-speed-"))
    cache_dir = a.compile_cache or str(root / "compile-cache")
    r = PipelineRunner("cpu", LocalResultStore(root / "results"), encode=raw)
    results: dict = {"steps": a.steps, "threads": a.threads, "torch": torch.__version__, "rows": [], "text": {}}
    for kind in a.models.split(","):
        m = MODELS[kind]
        spec = {"path": str(ensure_demo_model(kind, root / f"demo-{kind}")), "kind": kind, "dtype": "float32"}
        r.load(kind, spec)
        results["text"][kind] = text_encoding(r, kind, 20)
        print(kind, "text encoding", results["text"][kind], flush=True)
        # plain: the prompt cache on (its default), so the timed runs are hits (the warm-up round
        # encoded the prompts); "prompt cache off" encodes every prompt, as before the cache
        r.load(f"{kind}-nopc", {**spec, "prompt_cache_bytes": 0})
        variants = [("plain", kind, None), ("prompt cache off", f"{kind}-nopc", None)]
        variants += [(json.dumps(c), kind, c) for c in m["caches"]]
        if a.compile:
            for mode in a.compile_modes.split(","):
                name = f"{kind}-{mode}"
                p0 = m["params"]
                warm = {"width": p0["width"], "height": p0["height"], "num_frames": p0["num_frames"],
                        "guidance": p0["guidance"], "batch_sizes": [1, m["max_batch"]]}
                info = r.load(name, {**spec, "compile": mode, "compile_cache_dir": cache_dir, "warmup": warm})
                results.setdefault("compile", {})[name] = {k: info[k] for k in ("compile_s", "compiles")}
                print(name, "compiled", results["compile"][name], flush=True)
                variants.append((f"compile={mode}", name, None))
        for n in (1, m["max_batch"]):
            measured = interleaved(r, variants, n, a.steps, a.reps)
            base_t, base_out = measured[0]
            for (label, _, _), (sec, outs) in zip(variants, measured):
                row = {"model": f"demo-{kind}", "lever": label, "batch": n, "steps_reused": outs["_reused"],
                       "cpu_s_per_job": round(sec[1], 4), "speedup_cpu": round(base_t[1] / sec[1], 2),
                       "wall_s_per_job": round(sec[0], 4), "speedup_wall": round(base_t[0] / sec[0], 2),
                       **diff(outs, base_out)}
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
