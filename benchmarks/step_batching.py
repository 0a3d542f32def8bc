"""Step-level vs request-level batching on one worker, live: the real server, one real worker
process, the demo image (and video) model. For each mode:

- capacity: a burst of jobs at once (overload); throughput = jobs / (last finish - first arrival);
- load: Poisson arrivals at ``--load`` × the request-level capacity, a 50/50 mix of short and long
  step counts (``--steps``; issue 13 names 8 and 40): P50/P99 time from arrival to the job's first denoising step (its
  ``t_inference_start``) and end to end;
- low load: jobs one at a time (each alone): end-to-end latency vs request-level's lone batch of 1,
  with its 50 ms window and without one (a third entry, ``nowindow``).

Both modes run on the same server (two model entries over the same weights, ``batching =
"request"`` and ``"step"``, max 4 jobs at once by default (``--max-batch``); request-level with a 50 ms window), so the ratios are
measured back to back on one machine.

    .venv/bin/python benchmarks/step_batching.py [--kind image|video] [--jobs 80] [--steps 8,40] [--max-batch 8]
        [--size 64x64] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from genserve.bench.live import LiveServer

SHAPES = {"image": {"size": "32x32", "steps": (4, 20), "extra": ""},
          "video": {"size": "32x32", "steps": (4, 20), "extra": "default_frames = 5\nmax_frames = 9\nframe_stride = 4\n"}}


def config(models: Path, kind: str, size: str | None = None, max_batch: int = 4) -> str:
    sh = dict(SHAPES[kind], **({"size": size} if size else {}))
    out = "[server]\nidle_unload_s = \"never\"\n"
    for name, mode, wait in (("request", "request", 50), ("nowindow", "request", 0), ("step", "step", 0)):
        out += (f'\n[models.{name}]\nkind = "{kind}"\nsource = "{models / f"demo-{kind}"}"\nbatching = "{mode}"\n'
                f'max_batch_size = {max_batch}\nmax_wait_ms = {wait}\nsizes = ["{sh["size"]}"]\ndefault_steps = 8\n'
                f'max_steps = 100\ndefault_guidance = 1.0\nmin_warm = 1\n{sh["extra"]}')
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def submit(c: httpx.Client, model: str, steps: int, i: int) -> str:
    r = c.post("/v1/jobs", json={"model": model, "prompt": f"bench {i}", "steps": steps, "seed": i})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_all(c: httpx.Client, ids: list[str], timeout: float = 900) -> list[dict]:
    """Wait for the jobs, polling one job at a time (the oldest unfinished; they finish roughly in
    order): a client polling every job, or listing them all, would take CPU from the worker it
    measures, on the same cores."""
    deadline = time.time() + timeout
    out: dict[str, dict] = {}
    for jid in ids:
        while True:
            assert time.time() < deadline, "jobs did not finish"
            job = c.get(f"/v1/jobs/{jid}").json()
            if job["status"] in ("succeeded", "failed", "canceled"):
                assert job["status"] == "succeeded", job
                out[jid] = job
                break
            time.sleep(0.05)
    return [out[j] for j in ids]


def summary(jobs: list[dict]) -> dict:
    ts = [j["timestamps"] for j in jobs]
    first = [t["inference_start"] - t["received"] for t in ts]
    e2e = [t["finished"] - t["received"] for t in ts]
    span = max(t["finished"] for t in ts) - min(t["received"] for t in ts)
    return {"jobs": len(jobs), "ttfs_p50": pct(first, 50), "ttfs_p99": pct(first, 99), "e2e_p50": pct(e2e, 50),
            "e2e_p99": pct(e2e, 99), "throughput": len(jobs) / span}


def burst(c: httpx.Client, model: str, steps: tuple[int, int], n: int) -> dict:
    ids = [submit(c, model, steps[i % 2], i) for i in range(n)]
    return summary(wait_all(c, ids))


def poisson(c: httpx.Client, model: str, steps: tuple[int, int], n: int, rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    ids, t = [], time.perf_counter()
    for i in range(n):
        t += rng.expovariate(rate)
        time.sleep(max(0.0, t - time.perf_counter()))
        ids.append(submit(c, model, steps[rng.random() < 0.5], i))
    return summary(wait_all(c, ids))


def lone(c: httpx.Client, model: str, steps: int, n: int) -> dict:
    jobs = [wait_all(c, [submit(c, model, steps, 1000 + i)])[0] for i in range(n)]
    return summary(jobs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=list(SHAPES), default="image")
    p.add_argument("--jobs", type=int, default=80, help="jobs in the Poisson phase (and 3/4 of that in the burst)")
    p.add_argument("--load", type=float, default=0.7, help="Poisson rate as a share of request-level capacity")
    p.add_argument("--size", help="WxH (default: 32x32, where per-job overheads weigh most)")
    p.add_argument("--reps", type=int, default=3, help="overload bursts per mode (alternated; the median is reported)")
    p.add_argument("--max-batch", type=int, default=4, help="max_batch_size of every entry (the running set's cap)")
    p.add_argument("--steps", help="short,long step counts, half the jobs each (default 4,20)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    steps = tuple(int(x) for x in a.steps.split(",")) if a.steps else SHAPES[a.kind]["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        subprocess.run([sys.executable, "-m", "genserve.backends.demo", a.kind, str(models / f"demo-{a.kind}")], check=True)
        srv = LiveServer(Path(tmp) / "data", config(models, a.kind, a.size, a.max_batch), workers=1)
        with srv, httpx.Client(base_url=srv.url, timeout=120) as c:
            for mode in ("request", "nowindow", "step"):  # warm up every entry
                wait_all(c, [submit(c, mode, 2, 999_999)])
            res: dict[str, dict] = {}
            nb = max(8, a.jobs * 3 // 4)
            bursts: dict[str, list[dict]] = {"request": [], "step": []}
            for _ in range(a.reps):  # alternated, so drift in the machine's load hits both alike
                for mode in ("request", "step"):
                    bursts[mode].append(burst(c, mode, steps, nb))
            for mode, runs in bursts.items():  # the run with the median throughput
                res[f"{mode}/overload"] = sorted(runs, key=lambda r: r["throughput"])[len(runs) // 2]
                res[f"{mode}/overload"]["throughputs"] = [round(r["throughput"], 3) for r in runs]
            rate = a.load * res["request/overload"]["throughput"]
            for mode in ("request", "step"):
                res[f"{mode}/poisson"] = poisson(c, mode, steps, a.jobs, rate, seed=3)
            for mode in ("request", "nowindow", "step"):
                res[f"{mode}/lone"] = lone(c, mode, steps[0], 8)
    res["rate_per_s"] = {"value": rate}
    print(f"# {a.kind} at {a.size or SHAPES[a.kind]['size']}, max batch {a.max_batch}: Poisson at {rate:.2f} jobs/s ({a.load:.0%} of request-level capacity), steps {steps[0]}/{steps[1]}")
    print("| phase | mode | jobs | time to first step P50 / P99 (s) | end to end P50 / P99 (s) | throughput (jobs/s) |")
    print("|---|---|---|---|---|---|")
    for phase in ("overload", "poisson", "lone"):
        for mode in ("request", "nowindow", "step"):
            if f"{mode}/{phase}" not in res:
                continue
            r = res[f"{mode}/{phase}"]
            print(f"| {phase} | {mode} | {r['jobs']} | {r['ttfs_p50']:.3f} / {r['ttfs_p99']:.3f} | "
                  f"{r['e2e_p50']:.3f} / {r['e2e_p99']:.3f} | {r['throughput']:.2f} |")
    q, s = res["request/poisson"], res["step/poisson"]
    print(f"\nP99 time to first step, step/request: {s['ttfs_p99'] / q['ttfs_p99']:.3f}; "
          f"overload throughput step/request: {res['step/overload']['throughput'] / res['request/overload']['throughput']:.3f}; "
          f"lone E2E P50 step/request: {res['step/lone']['e2e_p50'] / res['request/lone']['e2e_p50']:.3f}, "
          f"step/request without a window: {res['step/lone']['e2e_p50'] / res['nowindow/lone']['e2e_p50']:.3f}; "
          f"overload throughputs per rep: { {m: [round(r['throughput'], 3) for r in rs] for m, rs in bursts.items()} }")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
