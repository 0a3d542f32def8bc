"""Step-level vs request-level batching in one process, on any device (the GPU check of issue 13).

The live benchmark (step_batching.py) measures the whole server on this 2-core VM, where the CPU is
compute-bound: a batch of B costs about B batches of 1, so neither mode gains from batching. On a
GPU a batch of 8 costs far less than 8 batches of 1; this script measures what step-level sets do
there, with the worker's own step loop (``backends.stepping.RunningSet``) against the pipeline's own
batched call, on a random-weight SD-shaped model (benchmarks/gpu_check.py ``build_large``):

1. the per-step cost of a running set of B (c(B)) and each job's fixed cost (set-up, decode);
2. overload: ``--jobs`` jobs queued at once, half ``short`` and half ``long`` steps: request level runs
   batches of up to ``--cap`` jobs of one step count (oldest first), step level keeps a set of up to
   ``--cap`` and refills it at step boundaries; throughput = jobs / wall time;
3. Poisson arrivals at ``--load`` × the request-level overload throughput, in real time: time from
   arrival to the job's first denoising step (request level: its batch's pipeline call starts; step
   level: the first step after it was set up) and end to end, P50 / P99.

No server, engine or worker process is involved: this isolates the batching mechanism.

    python benchmarks/step_inprocess.py [--device cuda:0] [--width 320] [--size 512] [--cap 8]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check import build_large  # noqa: E402

from genserve.backends.families import adapter_for  # noqa: E402
from genserve.backends.stepping import RunningSet, StepJob  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Bench:
    def __init__(self, pipe, device: str, size: int, cap: int) -> None:
        self.pipe, self.device, self.size, self.cap = pipe, device, size, cap
        self.family = adapter_for(pipe, {"kind": "image"}).step_driver(pipe)
        self.shape = {"width": size, "height": size}
        self.n = 0

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def job(self, steps: int) -> StepJob:
        self.n += 1
        return StepJob(f"j{self.n}", f"a photo number {self.n}", self.n, steps, 1.0)

    def call(self, jobs: list[StepJob]) -> None:
        """One request-level batch: the pipeline's own call (same steps for all)."""
        with torch.inference_mode():
            self.pipe(prompt=[j.prompt for j in jobs], num_inference_steps=jobs[0].steps, guidance_scale=1.0,
                      generator=[torch.Generator("cpu").manual_seed(j.seed) for j in jobs],
                      width=self.size, height=self.size, output_type="pil")
        self.sync()

    def curve(self, sizes: list[int]) -> tuple[dict[int, float], float, float]:
        rs = RunningSet(self.pipe, self.family, self.shape, max(sizes))
        self.sync()
        t0 = time.perf_counter()
        for _ in range(max(sizes)):
            rs.admit(self.job(10_000))
        self.sync()
        setup = (time.perf_counter() - t0) / max(sizes)
        out = {}
        for b in sizes:
            while len(rs) > b:
                rs.drop(next(iter(rs.slots)))
            rs.step()  # warm-up at this size
            self.sync()
            t0 = time.perf_counter()
            for _ in range(5):
                rs.step()
            self.sync()
            out[b] = (time.perf_counter() - t0) / 5
        one = list(rs.slots.values())[:1]
        t0 = time.perf_counter()
        rs.decode(one)
        self.sync()
        return out, setup, time.perf_counter() - t0

    def intake(self, arrivals: list[tuple[float, int]], i: int, now: float, queue: deque, arrive: dict) -> int:
        """Queue the jobs that have arrived by ``now`` (from index i); returns the next index."""
        while i < len(arrivals) and arrivals[i][0] <= now:
            j = self.job(arrivals[i][1])
            arrive[j.id] = arrivals[i][0]
            queue.append(j)
            i += 1
        return i

    def request_level(self, arrivals: list[tuple[float, int]]) -> dict:
        """arrivals: (seconds after start, steps). Runs in real time; returns the summary."""
        queue: deque[StepJob] = deque()
        first, done, arrive = {}, {}, {}
        i, t0 = 0, time.perf_counter()
        while len(done) < len(arrivals):
            now = time.perf_counter() - t0
            i = self.intake(arrivals, i, now, queue, arrive)
            if not queue:
                time.sleep(max(0.0, arrivals[i][0] - now))
                continue
            batch = [j for j in queue if j.steps == queue[0].steps][:self.cap]  # the oldest job's step count
            for j in batch:
                queue.remove(j)
            start = time.perf_counter() - t0
            self.call(batch)
            end = time.perf_counter() - t0
            for j in batch:
                first[j.id], done[j.id] = start, end
        return summary(arrive, first, done)

    def step_level(self, arrivals: list[tuple[float, int]]) -> dict:
        rs = RunningSet(self.pipe, self.family, self.shape, self.cap)
        queue: deque[StepJob] = deque()
        first, done, arrive = {}, {}, {}
        i, t0 = 0, time.perf_counter()
        while len(done) < len(arrivals):
            now = time.perf_counter() - t0
            i = self.intake(arrivals, i, now, queue, arrive)
            room = rs.max_size - len(rs)
            rs.admit_many([queue.popleft() for _ in range(min(room, len(queue)))])  # as the worker: one encoding
            if not rs.slots:
                time.sleep(max(0.0, arrivals[i][0] - now))
                continue
            start = time.perf_counter() - t0
            for jid in rs.slots:
                first.setdefault(jid, start)
            finished = rs.step()
            if finished:
                rs.decode(finished)
            self.sync()
            end = time.perf_counter() - t0
            for s in finished:
                done[s.job.id] = end
        return summary(arrive, first, done)


def summary(arrive: dict, first: dict, done: dict) -> dict:
    ttfs = [first[j] - arrive[j] for j in arrive]
    e2e = [done[j] - arrive[j] for j in arrive]
    span = max(done.values()) - min(arrive.values())
    return {"jobs": len(arrive), "ttfs_p50": pct(ttfs, 50), "ttfs_p99": pct(ttfs, 99), "e2e_p50": pct(e2e, 50),
            "e2e_p99": pct(e2e, 99), "throughput": len(arrive) / span}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=320, help="the model's top channel width (SD 1.5: 320)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--cap", type=int, default=8, help="max batch size = running-set cap, both modes")
    ap.add_argument("--jobs", type=int, default=48)
    ap.add_argument("--steps", default="8,40", help="short,long step counts (half the jobs each)")
    ap.add_argument("--load", type=float, default=0.7)
    ap.add_argument("--reps", type=int, default=2, help="overload runs per mode (alternated; best kept)")
    ap.add_argument("--work", default="/tmp/genserve-step-inprocess")
    a = ap.parse_args()
    short, long_ = (int(x) for x in a.steps.split(","))
    cuda = a.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    from diffusers import DiffusionPipeline

    t0 = time.perf_counter()
    path = build_large(Path(a.work) / f"large-{a.width}", a.width)
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype).to(a.device)
    pipe.set_progress_bar_config(disable=True)
    b = Bench(pipe, a.device, a.size, a.cap)
    name = torch.cuda.get_device_name(a.device) if cuda else "CPU"
    print(f"## Step vs request level in-process — {name}, {dtype}, SD-shaped width {a.width}, {a.size}x{a.size}, "
          f"cap {a.cap}, steps {short}/{long_} (model ready in {time.perf_counter() - t0:.1f} s)\n")
    b.call([b.job(2)])  # warm-up
    sizes = sorted({1, 2, 4, a.cap} | ({8} if a.cap >= 8 else set()))
    c, setup, dec = b.curve(sizes)
    print("| set size B | s per step | f(B) = c(B)/c(1) | per job-step |\n|---|---|---|---|")
    for k, v in c.items():
        print(f"| {k} | {v * 1000:.1f} ms | {v / c[1]:.2f} | {v / k * 1000:.1f} ms |")
    print(f"\nPer job, fixed: set-up (prompt encoding, latents, scheduler) {setup * 1000:.1f} ms, "
          f"decode {dec * 1000:.1f} ms\n")

    rng = random.Random(0)
    burst = [(0.0, short if k % 2 == 0 else long_) for k in range(a.jobs)]
    over: dict[str, list[dict]] = {"request": [], "step": []}
    for _ in range(a.reps):
        over["request"].append(b.request_level(burst))
        over["step"].append(b.step_level(burst))
    best = {m: max(rs, key=lambda r: r["throughput"]) for m, rs in over.items()}
    rate = a.load * best["request"]["throughput"]
    t, trace = 0.0, []
    for _ in range(a.jobs):
        t += rng.expovariate(rate)
        trace.append((t, short if rng.random() < 0.5 else long_))
    pois = {"request": b.request_level(trace), "step": b.step_level(trace)}
    print("| phase | mode | jobs | first step P50 / P99 (s) | end to end P50 / P99 (s) | throughput (jobs/s) |\n"
          "|---|---|---|---|---|---|")
    for phase, res in (("overload", best), (f"Poisson {rate:.2f}/s", pois)):
        for m, r in res.items():
            print(f"| {phase} | {m} | {r['jobs']} | {r['ttfs_p50']:.3f} / {r['ttfs_p99']:.3f} | "
                  f"{r['e2e_p50']:.3f} / {r['e2e_p99']:.3f} | {r['throughput']:.2f} |")
    print(f"\nOverload throughput step/request: {best['step']['throughput'] / best['request']['throughput']:.3f} "
          f"(runs: { {m: [round(r['throughput'], 2) for r in rs] for m, rs in over.items()} }); "
          f"P99 first step step/request at {a.load:.0%}: {pois['step']['ttfs_p99'] / pois['request']['ttfs_p99']:.3f}; "
          f"P50 end to end step/request: {pois['step']['e2e_p50'] / pois['request']['e2e_p50']:.3f}; "
          f"median per-step cost of a set of {a.cap}: {statistics.median([c[a.cap]]) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
