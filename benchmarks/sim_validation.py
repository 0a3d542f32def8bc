"""Validate the simulator against the live server on this machine.

1. Calibrate the demo image model's cost model through a live server: the device time of batches of
   1, 2 and 4 (t1 and f(B)) and the model load time, from the job records; at a second, short step
   count too, which splits it into a per-step curve and a per-job fixed cost (the two-part model,
   ``job_overhead_s``; step sets pay the fixed cost once per job, not at every step).
2. Replay a Poisson trace open-loop against a live server with one CPU worker, warmed up first (the
   worker process started and the model loaded: the sim's load time is then 0); export it with
   ``genserve trace export`` (less the warm-up job).
3. Simulate the same trace with a scenario built from the calibrated numbers.
4. Print P50, P99 and throughput for both, and the relative error (markdown, for RESULTS.md).

    .venv/bin/python benchmarks/sim_validation.py [--requests 200] [--utilization 0.65] [--steps 20]

The batch cost is measured as the device time of a batch: dispatch → finished (the worker runs the
pipeline, encodes and writes the outputs, then reports), which is what keeps the device busy. The
inference span alone (inference_start → inference_end) is printed too, to show the per-batch overhead.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from genserve.bench.live import LiveServer, post_concurrently, wait_for
from genserve.sim.driver import simulate
from genserve.sim.report import percentile, summarize
from genserve.sim.scenario import parse_scenario

MODEL = "demo-image"
# One torch thread per worker: on a shared 2-core VM, OpenMP threads spin against the neighbours' load
# and batch times swing by 10× (0.27 s vs 5.9 s for the same batch in two runs a few minutes apart).
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SIZE = 64


def server_config(models: Path, max_batch: int, wait_ms: int, steps: int, batching: str = "request") -> str:
    return f"""
[models.{MODEL}]
kind = "image"
batching = "{batching}"
source = "{models / MODEL}"
max_batch_size = {max_batch}
max_wait_ms = {wait_ms}
max_queue = 10000
sizes = ["{SIZE}x{SIZE}"]
default_steps = {steps}
max_steps = 100
default_guidance = 1.0
"""


def body(i: int, steps: int) -> dict:
    return {"model": MODEL, "prompt": f"validation {i}", "seed": i, "steps": steps, "width": SIZE, "height": SIZE}


def calibrate(models: Path, tmp: Path, steps: int, short: int, wait_ms: int, reps: int,
              batching: str = "request") -> dict:
    """Batches of 1, 2, 4 on an idle worker, each submitted at once so it fills in one window (step
    level: one running set, the first job starting it and the others joining at the next step), at
    ``steps`` and (if ``short``) at ``short`` steps, on a server in the mode being validated (a step
    set's costs are the step loop's, not a pipeline call's). Two step counts split each batch's
    device time T(B, S) = fixed(B) + S · c(B) into a per-step curve c(B) and a per-job fixed cost
    fixed(1) (prompt encoding, latent set-up, decode, PNG, write): the simulator's ``job_overhead_s``."""
    counts = (steps, short) if short else (steps,)
    with LiveServer(tmp / "calib", server_config(models, 4, wait_ms, steps, batching), workers=1, env=ENV) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as c:
        first = wait_for(c, c.post("/v1/jobs", json=body(0, steps)).json()["id"])
        ts = first["timestamps"]
        load_s = ts["load_end"] - ts["load_start"]
        for i in range(3):  # warm the pipeline up (first calls are slower)
            wait_for(c, c.post("/v1/jobs", json=body(100_000 + i, steps)).json()["id"])
        device_s: dict[tuple[int, int], list[float]] = {(b, n): [] for b in (1, 2, 4) for n in counts}
        infer_s: dict[int, list[float]] = {1: [], 2: [], 4: []}
        i = 1
        for _ in range(reps):
            for n in counts:  # alternated, so a slow spell of the machine hits both alike
                for b in (1, 2, 4):
                    rs = post_concurrently(srv.url, [body(i + k, n) for k in range(b)])
                    i += b
                    jobs = [wait_for(c, r.json()["id"]) for r in rs]
                    together = ({j["batch"]["size"] for j in jobs} == {b} if batching == "request"
                                else len({j["batch"]["id"] for j in jobs}) == 1)
                    if not together:  # the window split them (or they ran in two sets): skip this sample
                        continue
                    t = jobs[0]["timestamps"]
                    device_s[(b, n)].append(max(j["timestamps"]["finished"] for j in jobs)
                                            - min(j["timestamps"]["dispatched"] for j in jobs))
                    if n == steps:
                        infer_s[b].append(t["inference_end"] - t["inference_start"])
    med = {k: statistics.median(v) for k, v in device_s.items() if v}
    out = {"load_s": load_s, "t1_s": med[(1, steps)], "f": {b: med[(b, steps)] / med[(1, steps)] for b in (1, 2, 4)
                                                           if (b, steps) in med},
           "job_overhead_s": 0.0, "device_s": {f"{b}x{n}": v for (b, n), v in device_s.items()},
           "inference_s": {b: statistics.median(v) for b, v in infer_s.items() if v},
           "samples": {f"{b}x{n}": len(v) for (b, n), v in device_s.items()}}
    if short:
        per_step = {b: (med[(b, steps)] - med[(b, short)]) / (steps - short) for b in (1, 2, 4)
                    if (b, steps) in med and (b, short) in med}
        fixed = {b: med[(b, steps)] - steps * per_step[b] for b in per_step}
        out["two_part"] = {"t1_s": med[(1, steps)], "job_overhead_s": max(0.0, fixed[1]),
                           "f": {b: per_step[b] / per_step[1] for b in per_step},
                           "fixed_per_job": {b: fixed[b] / b for b in fixed}, "step_s": per_step}
    return out


def calibrate_from_run(jobs: list[dict], fallback: dict) -> dict:
    """t1 and f(B) from the batches of the trace run itself (median device time per batch size);
    sizes the run never formed keep the separate calibration's f(B)."""
    batches: dict[str, tuple[int, float]] = {}
    for j in jobs:
        b = j["batch"]
        t = j["timestamps"]
        size, took = batches.get(b["id"], (b["size"], 0.0))
        batches[b["id"]] = (size, max(took, t["finished"] - t["dispatched"]))
    by: dict[int, list[float]] = {}
    for size, took in batches.values():
        by.setdefault(size, []).append(took)
    med = {b: statistics.median(v) for b, v in by.items()}
    t1 = med.get(1, fallback["t1_s"])
    f = {b: fallback["f"][b] for b in fallback["f"]} | {b: v / t1 for b, v in med.items()}
    ones = sorted(by.get(1, [t1]))
    spread = {f"p{q}": round(percentile(ones, q), 3) for q in (10, 50, 90, 99)} | {"max": round(ones[-1], 3)}
    return {"t1_s": t1, "f": f, "samples": {b: len(v) for b, v in sorted(by.items())}, "t1_spread": spread}


def live_stages(jobs: list[dict]) -> dict[str, list[float]]:
    """Each job's time in each stage of the live run, from its record."""
    out: dict[str, list[float]] = {k: [] for k in ("waiting (received → dispatched)", "dispatched → inference start",
                                                    "inference", "inference end → finished", "end to end")}
    for j in jobs:
        t = j["timestamps"]
        for k, v in zip(out, (t["dispatched"] - t["received"], t["inference_start"] - t["dispatched"],
                              t["inference_end"] - t["inference_start"], t["finished"] - t["inference_end"],
                              t["finished"] - t["received"])):
            out[k].append(v)
    return {k: sorted(v) for k, v in out.items()}


def sim_stages(result) -> dict[str, list[float]]:
    """The same stages in a simulation: it has no separate output stage (the batch cost covers
    dispatch to finished), so its inference is dispatch → finished."""
    out: dict[str, list[float]] = {"waiting (received → dispatched)": [], "dispatched → inference start": [],
                                   "inference": [], "end to end": []}
    for j in result.jobs:
        if j.failed or j.finished != j.finished:  # nan: never finished
            continue
        out["waiting (received → dispatched)"].append(j.dispatched - j.arrival)
        out["dispatched → inference start"].append(j.infer_start - j.dispatched)
        out["inference"].append(j.finished - j.infer_start)
        out["end to end"].append(j.finished - j.arrival)
    return {k: sorted(v) for k, v in out.items()}


async def replay(url: str, trace: list[float], steps: int) -> list[dict]:
    """Open loop: submit each request at its trace time, then wait for them all."""
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        ids: list[str] = []

        async def submit(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            r = await c.post("/v1/jobs", json=body(10_000 + i, steps))
            r.raise_for_status()
            ids.append(r.json()["id"])

        await asyncio.gather(*(submit(i, at) for i, at in enumerate(trace)))
        jobs = []
        for jid in ids:
            while True:
                j = (await c.get(f"/v1/jobs/{jid}")).json()
                if j["status"] in ("succeeded", "failed", "canceled"):
                    jobs.append(j)
                    break
                await asyncio.sleep(0.2)
    return jobs


def scenario_raw(cal: dict, trace_path: Path, max_batch: int, wait_ms: int, steps: int,
                 batching: str = "request") -> dict:
    t1 = cal["t1_s"]
    curve = {str(b): f for b, f in cal["f"].items()}
    return {
        "sim": {"name": "sim validation", "seed": 1, "duration_s": 1e9, "slo_s": 10},
        "fleet": {"device_type": "cpu", "initial": 1, "provisioning_s": 0, "memory_gb": 1000, "price_per_hour": 0.1},
        "models": {MODEL: {"kind": "image", "weights_gb": 0.1, "working_gb": 0.01, "t1_s": t1, "batch_curve": curve,
                           "job_overhead_s": cal.get("job_overhead_s", 0.0),
                           "load_disk_s": 0, "load_host_s": 0, "max_batch_size": max_batch,
                           "max_wait_ms": wait_ms, "ref_width": SIZE, "ref_height": SIZE, "ref_steps": steps,
                           "idle_unload_s": "never", "batching": batching}},
        "workload": {"kind": "trace", "trace": str(trace_path)},
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--utilization", type=float, default=0.65, help="arrival rate × t1 (batch-of-1 device time)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--wait-ms", type=int, default=100)
    ap.add_argument("--short-steps", type=int, default=2,
                    help="second step count for the two-part cost model (0: one-part only)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batching", choices=("request", "step"), default="request",
                    help="the live server's, the calibration server's and the simulation's batching")
    ap.add_argument("--keep", help="copy the trace and scenario here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        models = tmp / "models"
        subprocess.run([sys.executable, "-m", "genserve.backends.demo", "image", str(models / MODEL)],
                       check=True, capture_output=True)
        cal = calibrate(models, tmp, a.steps, a.short_steps, a.wait_ms, a.reps, a.batching)
        print(f"# calibration: load {cal['load_s']:.3f} s, t1 {cal['t1_s']:.3f} s, "
              f"f = {', '.join(f'f({b})={f:.2f}' for b, f in cal['f'].items())}, "
              f"inference-only medians {cal['inference_s']}, samples {cal['samples']}", file=sys.stderr)
        if "two_part" in cal:
            print(f"# two-part: {json.dumps(cal['two_part'])}", file=sys.stderr)

        rate = a.utilization / cal["t1_s"]
        rng = random.Random(a.seed)
        t, trace = 0.0, []
        for _ in range(a.requests):
            trace.append(t)
            t += rng.expovariate(rate)
        srv = LiveServer(tmp / "live", server_config(models, a.max_batch, a.wait_ms, a.steps, a.batching), workers=1,
                         env=ENV)
        with srv:
            with httpx.Client(base_url=srv.url, timeout=300) as c:  # warm-up: worker start + model load
                wait_for(c, c.post("/v1/jobs", json=body(9_999, a.steps)).json()["id"], timeout=300)
            t0 = time.perf_counter()
            jobs = asyncio.run(replay(srv.url, trace, a.steps))
            wall = time.perf_counter() - t0
        trace_path = tmp / "trace.jsonl"
        subprocess.run([sys.executable, "-m", "genserve.cli", "trace", "export", "--data-dir", str(tmp / "live"),
                        "-o", str(trace_path)], check=True, capture_output=True)
        # Drop the warm-up job (the first one received); the model is resident when the trace starts.
        trace_path.write_text("".join(trace_path.read_text().splitlines(keepends=True)[1:]))
        ok = [j for j in jobs if j["status"] == "succeeded"]
        lat = [j["timestamps"]["finished"] - j["timestamps"]["received"] for j in ok]
        first = min(j["timestamps"]["received"] for j in jobs)
        last = max(j["timestamps"]["finished"] for j in ok)
        lat.sort()
        live = {"P50 latency (s)": percentile(lat, 50), "P99 latency (s)": percentile(lat, 99),
                "throughput (req/s)": len(ok) / (last - first),
                "mean batch size": statistics.mean(j["batch"]["size"] for j in ok)}
        print(f"# live: {len(ok)}/{len(jobs)} succeeded in {wall:.1f} s wall", file=sys.stderr)

        in_run = calibrate_from_run(ok, cal)
        print(f"# in-run calibration: t1 {in_run['t1_s']:.3f} s, f = {in_run['f']}, batches {in_run['samples']}",
              file=sys.stderr)
        sims, stages = {}, {"live": live_stages(ok)}
        cals = {"sim (separate calibration)": cal, "sim (in-run calibration)": in_run}
        if "two_part" in cal:
            cals["sim (two-part calibration)"] = cal["two_part"]
        for name, c in cals.items():
            result = simulate(parse_scenario(scenario_raw(c, trace_path, a.max_batch, a.wait_ms, a.steps,
                                                          batching=a.batching)))
            stages[name] = sim_stages(result)
            x = summarize(result)
            sims[name] = {"P50 latency (s)": x["overall"]["latency_s"]["p50"],
                          "P99 latency (s)": x["overall"]["latency_s"]["p99"],
                          "throughput (req/s)": x["throughput_per_s"], "mean batch size": x["overall"]["mean_batch_size"]}
        if a.keep:
            keep = Path(a.keep)
            keep.mkdir(parents=True, exist_ok=True)
            (keep / "trace.jsonl").write_text(trace_path.read_text())
            (keep / "calibration.json").write_text(json.dumps(cal, indent=2))
    print(f"Machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}; "
          f"{a.requests} requests, Poisson at {rate:.2f} req/s (ρ = {a.utilization} of t1), "
          f"{SIZE}x{SIZE}, {a.steps} steps, max batch {a.max_batch}, window {a.wait_ms} ms, {a.batching}-level batching, "
          "1 CPU worker.\n")
    for name, c in (("separate", cal), ("in-run", in_run)):
        print(f"Calibration ({name}): t1 {c['t1_s']:.3f} s (dispatch → finished); "
              + ", ".join(f"f({b}) = {f:.2f}" for b, f in sorted(c["f"].items())) + f"; samples {c['samples']}")
    if "two_part" in cal:
        tp = cal["two_part"]
        print(f"Calibration (two-part, {a.steps} and {a.short_steps} steps): t1 {tp['t1_s']:.3f} s, of which "
              f"{tp['job_overhead_s']:.3f} s per job fixed; per-step " + ", ".join(
                  f"c({b}) = {v * 1000:.1f} ms" for b, v in sorted(tp["step_s"].items()))
              + "; fixed cost per job in a batch of B: " + ", ".join(
                  f"{b}: {v:.3f} s" for b, v in sorted(tp["fixed_per_job"].items())))
    print(f"Load time (separate server): {cal['load_s']:.3f} s. Batch-of-1 device time in the live run: "
          f"{in_run['t1_spread']}\n")
    print("Where the time goes, per job (P50 / P99, s):\n")
    names = list(stages)
    print("| stage | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for stage in stages["live"]:
        print(f"| {stage} | " + " | ".join(
            f"{percentile(stages[n][stage], 50):.3f} / {percentile(stages[n][stage], 99):.3f}"
            if stages[n].get(stage) else "–" for n in names) + " |")
    print()
    print("| metric | live server | " + " | ".join(f"{n} | error" for n in sims) + " |")
    print("|---|---|" + "---|---|" * len(sims))
    for k in live:
        lv = live[k]
        print(f"| {k} | {lv:.3f} | " + " | ".join(f"{s[k]:.3f} | {100 * (s[k] - lv) / lv:+.1f}%" for s in sims.values())
              + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
