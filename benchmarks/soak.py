"""Soak benchmark: many small jobs against a real server; the server process's RSS sampled every
N jobs. With per-job state released once a job is terminal, RSS stays flat after warm-up.

Each job is submitted with POST /v1/jobs and followed over SSE to its terminal event (the path
that keeps per-job event histories and subscribers), closed loop with ``--concurrency`` in flight.
The workers are child processes and are not counted: the server process is what must not grow.

    .venv/bin/python benchmarks/soak.py [--jobs 20000] [--every 1000] [--concurrency 32]
                                        [--pythonpath OTHER/src]   # e.g. to measure another tree
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from genserve.bench.live import LiveServer


def config(models: Path, retention: bool) -> str:
    text = f"""
[models.demo-image]
kind = "image"
source = "{models / 'demo-image'}"
max_batch_size = 16
max_wait_ms = 20
max_queue = 10000
sizes = ["64x64"]
default_steps = 1
max_steps = 4
default_guidance = 1.0
"""
    if retention:  # results deleted as they come: the data dir stays small during a long soak
        text += "\n[retention]\nmax_data_bytes = 10000000\nsweep_interval_s = 5\n"
    return text


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# A pooled keep-alive connection that the server closes (idle timeout) just as the client reuses it
# ends a request without a response. That is the client's race, not the server's failure: the job is
# submitted again under the same client id (never a duplicate) and its stream read again (replayed).
RETRYABLE = (httpx.RemoteProtocolError, httpx.ConnectError, httpx.ReadError, httpx.WriteError)


async def one(client: httpx.AsyncClient, i: int, retried: list[int]) -> str:
    for attempt in range(4):
        try:
            return await _one(client, i)
        except RETRYABLE:
            retried[0] += 1
            if attempt == 3:
                raise
    raise AssertionError("unreachable")


async def _one(client: httpx.AsyncClient, i: int) -> str:
    r = await client.post("/v1/jobs", json={"model": "demo-image", "prompt": f"soak {i}", "seed": i,
                                            "id": f"soak-{i}"})
    r.raise_for_status()
    job_id = r.json()["id"]
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as s:
        event = None
        async for line in s.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
                if event in ("succeeded", "failed", "canceled"):
                    return event
    return event or "none"


async def soak(url: str, pid: int, jobs: int, every: int, concurrency: int) -> list[dict]:
    samples = [{"jobs": 0, "rss_kib": rss_kib(pid), "t": 0.0, "failed": 0, "retried": 0}]
    done = failed = 0
    retried = [0]
    next_i = 0
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=300)) as client:
        async def lane() -> None:
            nonlocal done, failed, next_i
            while next_i < jobs:
                i = next_i
                next_i += 1
                outcome = await one(client, i, retried)
                done += 1
                failed += outcome != "succeeded"
                if done % every == 0:
                    samples.append({"jobs": done, "rss_kib": rss_kib(pid), "t": round(time.monotonic() - t0, 1),
                                    "failed": failed, "retried": retried[0]})
                    print(json.dumps(samples[-1]), file=sys.stderr, flush=True)

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--every", type=int, default=1000, help="sample the server's RSS every N finished jobs")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--retention", action="store_true", help="also run the retention sweep (size cap)")
    ap.add_argument("--pythonpath", help="run the server from another source tree")
    ap.add_argument("--out", help="write the samples as JSON")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        subprocess.run([sys.executable, "-m", "genserve.backends.demo", "image", str(models / "demo-image")],
                       check=True, capture_output=True)
        env = {"PYTHONPATH": a.pythonpath} if a.pythonpath else None
        srv = LiveServer(Path(tmp) / "data", config(models, a.retention), workers=a.workers, env=env).start()
        try:
            samples = asyncio.run(soak(srv.url, srv.proc.pid, a.jobs, a.every, a.concurrency))
        except BaseException:
            print(f"soak failed; server exit code {srv.proc.poll()}; its log ends:\n{srv.log()[-3000:]}",
                  file=sys.stderr)
            raise
        finally:
            srv.stop()
    base = samples[1]["rss_kib"] if len(samples) > 1 else samples[0]["rss_kib"]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}")
    print("| jobs | RSS MiB | Δ since first sample MiB | elapsed s | not succeeded | requests retried |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s in samples:
        print(f"| {s['jobs']} | {s['rss_kib'] / 1024:.1f} | {(s['rss_kib'] - base) / 1024:+.1f} | {s['t']} "
              f"| {s['failed']} | {s['retried']} |")
    if a.out:
        Path(a.out).write_text(json.dumps(samples, indent=1))


if __name__ == "__main__":
    main()
