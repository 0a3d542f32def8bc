"""Batching benchmark: a burst of N same-size image requests against the live server, with
batching off and on. Prints a markdown table (paste into benchmarks/RESULTS.md).

    .venv/bin/python benchmarks/batching.py [--requests 32] [--steps 20] [--workers 1]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from genserve.bench.live import LiveServer

VARIANTS = [("off", 1, 0), ("on, max 4", 4, 50), ("on, max 8", 8, 50)]


def config(models: Path, max_batch: int, wait_ms: int) -> str:
    return f"""
[models.demo-image]
kind = "image"
source = "{models / 'demo-image'}"
max_batch_size = {max_batch}
max_wait_ms = {wait_ms}
max_queue = 1000
sizes = ["64x64"]
default_steps = 20
max_steps = 100
default_guidance = 1.0
"""


async def one(client: httpx.AsyncClient, i: int, steps: int) -> dict:
    t0 = time.perf_counter()
    r = await client.post("/v1/jobs", json={"model": "demo-image", "prompt": f"bench {i}", "seed": i, "steps": steps})
    r.raise_for_status()
    job_id = r.json()["id"]
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as s:
        async for line in s.aiter_lines():
            if line.startswith("event:") and line[6:].strip() in ("succeeded", "failed", "canceled"):
                break
    t1 = time.perf_counter()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "succeeded", job
    return {"latency": t1 - t0, "start": t0, "end": t1, "batch": job["batch"]["id"], "size": job["batch"]["size"]}


async def burst(url: str, n: int, steps: int) -> dict:
    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one(client, 10_000, steps)  # warm-up: the model load is not part of the measurement
        res = await asyncio.gather(*(one(client, i, steps) for i in range(n)))
    lat = sorted(r["latency"] for r in res)
    wall = max(r["end"] for r in res) - min(r["start"] for r in res)
    batches = {r["batch"]: r["size"] for r in res}
    return {
        "throughput": n / wall, "p50": statistics.median(lat), "p99": lat[min(n - 1, int(round(0.99 * (n - 1))))],
        "mean_batch": n / len(batches), "batches": len(batches), "wall": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        subprocess.run([sys.executable, "-m", "genserve.backends.demo", "image", str(models / "demo-image")],
                       check=True, capture_output=True)
        rows = []
        for name, mb, wait in VARIANTS:
            srv = LiveServer(Path(tmp) / f"srv-{mb}", config(models, mb, wait), workers=a.workers).start()
            try:
                r = asyncio.run(burst(srv.url, a.requests, a.steps))
            finally:
                srv.stop()
            r.update(variant=name, max_batch=mb, wait_ms=wait)
            rows.append(r)
            print(f"# {name}: {r}", file=sys.stderr, flush=True)
    base = rows[0]["throughput"]
    print(f"{a.requests} requests, 64x64, {a.steps} steps, {a.workers} CPU worker(s); "
          f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores\n")
    print("| batching | max_batch_size | max_wait_ms | throughput (img/s) | vs off | P50 (s) | P99 (s) | mean batch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['max_batch']} | {r['wait_ms']} | {r['throughput']:.2f} | "
              f"{r['throughput'] / base:.2f}× | {r['p50']:.2f} | {r['p99']:.2f} | {r['mean_batch']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
