"""Accept rate of the control plane as its queue grows (issue 22 item 11).

A real ``genserve serve`` over HTTP on 127.0.0.1 with no workers (``--workers 0``): nothing is ever
dispatched, so every accepted job stays queued and the queue only grows. At each depth (the queue
is first filled to it, unmeasured) we time ``--step`` submits from ``--concurrency`` threads
(submits/s and latency P50/P99), then ``--polls`` sequential reads of a queued job's status
(``GET /v1/jobs/{id}``, which computes its ``queue_position``), median.

Usage: PYTHONPATH=src python benchmarks/accept_rate.py [--depths 0,10000,50000] [--step 2000]
       [--concurrency 16] [--polls 200] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from genserve.bench.live import LiveServer

CONFIG = """
[models.demo-image]
kind = "image"
source = "{source}"
max_batch_size = 8
max_wait_ms = 0
max_queue = {max_queue}
sizes = ["64x64"]
default_size = "64x64"
default_steps = 2
"""


def submit_all(url: str, n: int, concurrency: int, priorities: bool) -> list[float]:
    """``n`` submits from ``concurrency`` threads, each on its own keep-alive connection; every one
    must be accepted (202). Returns each submit's latency (s)."""
    lat: list[float] = []
    lock = threading.Lock()
    counter = iter(range(n))
    errors: list[str] = []
    prios = ("high", "standard", "low")

    def run() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None or errors:
                    return
                body = {"model": "demo-image", "prompt": f"p{i}"}
                if priorities:
                    body["priority"] = prios[i % 3]  # three classes: the index keeps them apart
                t = time.perf_counter()
                r = c.post("/v1/jobs", json=body)
                dt = time.perf_counter() - t
                if r.status_code != 202:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    return
                with lock:
                    lat.append(dt)

    threads = [threading.Thread(target=run) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"a submit was refused: {errors[0]}")
    return lat


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="0,10000,50000")
    ap.add_argument("--step", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--polls", type=int, default=200)
    ap.add_argument("--out")
    a = ap.parse_args()
    depths = [int(d) for d in a.depths.split(",")]
    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "genserve.backends.demo", "image", str(tmp / "demo-image")],
                   check=True, capture_output=True)
    config = CONFIG.format(source=tmp / "demo-image", max_queue=max(depths) + 2 * a.step + 10)
    rows = []
    with LiveServer(tmp / "srv", config, workers=0) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        queued = 0
        for depth in depths:
            if depth > queued:
                t = time.perf_counter()
                submit_all(srv.url, depth - queued, a.concurrency, priorities=True)
                print(f"filled {queued} -> {depth} in {time.perf_counter() - t:.0f} s", flush=True)
                queued = depth
            t = time.perf_counter()
            lat = submit_all(srv.url, a.step, a.concurrency, priorities=True)
            wall = time.perf_counter() - t
            queued += a.step
            # a queued job in the middle of the line (its position is computed on every read)
            job = c.get("/v1/jobs", params={"limit": 1, "status": "queued"}).json()["data"][0]["id"]
            polls = []
            for _ in range(a.polls):
                t = time.perf_counter()
                r = c.get(f"/v1/jobs/{job}")
                polls.append(time.perf_counter() - t)
                assert r.status_code == 200 and r.json()["status"] == "queued", r.text[:200]
            pos = r.json()["queue_position"]
            row = {"depth": depth, "submits": a.step, "submits_per_s": a.step / wall,
                   "p50_ms": pct(lat, 0.5) * 1000, "p99_ms": pct(lat, 0.99) * 1000,
                   "poll_median_ms": statistics.median(polls) * 1000, "poll_p99_ms": pct(polls, 0.99) * 1000,
                   "polled_position": pos}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = rows[0]["submits_per_s"]
    for r in rows:
        r["rate_vs_empty"] = r["submits_per_s"] / base
    print("\n| queued before | submits/s | vs empty | P50 (ms) | P99 (ms) | poll median (ms) | poll P99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['depth']:,} | {r['submits_per_s']:.0f} | {r['rate_vs_empty']:.2f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['poll_median_ms']:.2f} | {r['poll_p99_ms']:.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
