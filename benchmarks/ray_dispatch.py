"""Ray worker pool vs local process pool, on one machine (figures: benchmarks/RESULTS.md, "Cluster").

1. Dispatch overhead per batch: the time from the pool's ``send(run)`` to the worker's ``started``
   message (its own clock, same machine), for a local worker process (pipe) and a Ray actor on a
   simulated node; median and P99 over N one-step batches of a tiny demo model. Also each batch's
   run time on the worker (``started`` -> ``batch_done``, worker clock): the same job on both pools,
   so a difference there is the worker's threads, not the transport (``--steps``; ``--local-threads``
   adds local runs with ``[server] worker_threads`` set).
2. Throughput: one trace of jobs through a real server with the local pool (2 workers) and with
   the Ray pool (2 actors on 2 simulated nodes); jobs per second and the ratio.
3. Node loss: a node removed while its batch runs; the time until that batch runs again elsewhere.

``--transports`` picks how the Ray actor's messages come back in (1): ``stream`` (the streaming
actor call used when the server is a cluster driver), ``poll`` (the long-poll transport, over the
same direct connection) and ``client`` (long polls through a Ray Client server on the head, as
with ``address = "ray://HOST:PORT"``).

Needs the cluster extra (ray, boto3, moto). Everything stays on 127.0.0.1.
    python benchmarks/ray_dispatch.py [--batches 200] [--jobs 24] [--transports stream,poll,client]
        [--dispatch-only] [--steps 1] [--local-threads 1,2]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on loopback only (read at import)

import httpx  # noqa: E402

from genserve.bench.live import LiveServer, free_port, s3_server, wait_for, wait_until  # noqa: E402
from genserve.workers import protocol as P  # noqa: E402

DEVICE = "genserve_device"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def dispatch_latency(pool_factory, model_dir: Path, n: int,
                           steps: int = 1) -> tuple[list[float], list[float], list[float], dict]:
    """(dispatch -> worker start, worker's ``started`` -> its arrival on the event loop, the batch's
    run time on the worker), in ms, and the worker's ``ready`` message (its thread settings)."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    pool = pool_factory(lambda wid, msg: inbox.put_nowait(msg), lambda wid, code: inbox.put_nowait({"ev": "exit"}))
    pool.start()

    async def wait(ev: str) -> dict:
        while True:
            msg = await inbox.get()
            if msg["ev"] == ev:
                return msg
            if msg["ev"] in ("exit", "batch_failed", "load_failed"):
                raise RuntimeError(msg)

    ready = await wait("ready")
    wid = next(iter(pool.workers))
    pool.send(wid, {"op": P.LOAD, "model": "m", "spec": {"path": str(model_dir), "kind": "image", "dtype": "auto"},
                    "reason": "bench"})
    await wait("loaded")
    out, back, run = [], [], []
    for i in range(n + 3):
        job = {"id": f"j{i}", "prompt": "x", "negative_prompt": None, "seed": i}
        t0 = time.time()
        pool.send(wid, {"op": P.RUN, "batch_id": f"b{i}", "model": "m", "kind": "image",
                        "params": {"width": 64, "height": 64, "num_frames": 0, "steps": steps, "guidance": 1.0,
                                   "fps": 8},
                        "jobs": [job]})
        started = await wait("started")
        seen = time.time()
        done = await wait("batch_done")
        if i >= 3:  # warm-up batches excluded
            out.append((started["t"] - t0) * 1000)
            back.append((seen - started["t"]) * 1000)
            run.append((done["t"] - started["t"]) * 1000)
    await pool.close()
    del loop
    return out, back, run, ready


def server_toml(models: Path, s3: str | None, ray_address: str | None, name: str, extra: str = "") -> str:
    cluster = f"""
[cluster]
provider = "ray"
address = "{ray_address}"
device_resource = "{DEVICE}"
workers = 2
name = "{name}"
""" if ray_address else ""
    results = f"""
[results]
store = "s3"
bucket = "bench"
prefix = "{name}/"
endpoint_url = "{s3}"
region = "us-east-1"
""" if s3 else ""
    return f"""
[server]
workers = 2
{cluster}{results}{extra}
[models.demo-image]
kind = "image"
source = "{models / 'demo-image'}"
max_batch_size = 2
max_wait_ms = 0
sizes = ["64x64"]
default_steps = 8
max_steps = 400
default_guidance = 1.0
"""


def throughput(srv: LiveServer, jobs: int) -> float:
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        wait_until(lambda: sum(w["state"] in ("idle", "busy", "loading") for w in c.get("/v1/workers").json()["data"]) == 2,
                   180, "two workers")
        for w in ("w0", "w1"):  # both warm before timing
            c.post("/v1/models/demo-image/load", json={"worker": w})
        wait_until(lambda: all(r for w in c.get("/v1/workers").json()["data"] for r in w["resident_models"]
                               if not r["loading"]) and all(w["resident_models"] for w in c.get("/v1/workers").json()["data"]),
                   180, "models loaded")
        t0 = time.time()
        ids = [c.post("/v1/jobs", json={"model": "demo-image", "prompt": f"t{i}", "seed": i}).json()["id"]
               for i in range(jobs)]
        done = [wait_for(c, j, 600) for j in ids]
        assert all(j["status"] == "succeeded" for j in done)
        return jobs / (time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-dispatch", action="store_true")
    ap.add_argument("--dispatch-only", action="store_true", help="skip the throughput and node-loss parts")
    ap.add_argument("--transports", default="stream", help="comma-separated: stream, poll, client")
    ap.add_argument("--steps", type=int, default=1, help="denoising steps per dispatch-part batch")
    ap.add_argument("--local-threads", default="", help="comma-separated worker_threads for extra local runs")
    args = ap.parse_args()
    from ray.cluster_utils import Cluster

    from genserve.workers.pool import LocalPool
    from genserve.workers.ray_pool import RayPool, RaySettings

    tmp = Path(tempfile.mkdtemp(prefix="genserve-ray-bench-"))
    models = tmp / "models"
    subprocess.run([sys.executable, "-m", "genserve.backends.demo", "image", str(models / "demo-image")], check=True,
                   capture_output=True)
    with s3_server("bench") as s3:
        client_port = free_port()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "ray_client_server_port": client_port, "include_dashboard": False, "_system_config": {
                "health_check_period_ms": 300, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}})
        nodes = [cluster.add_node(num_cpus=1, resources={DEVICE: 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        res = {"store": "local", "root": str(tmp / "results")}
        print("machine:", os.uname().machine, os.cpu_count(), "cores")

        if not args.skip_dispatch:
            local = asyncio.run(dispatch_latency(
                lambda m, e: LocalPool(["cpu"], res, m, e, cpu_memory_bytes=4 << 30), models / "demo-image",
                args.batches, args.steps))
            import ray

            results = {"local pipe": local}
            for t in filter(None, args.local_threads.split(",")):
                results[f"local pipe, worker_threads={t}"] = asyncio.run(dispatch_latency(
                    lambda m, e, t=t: LocalPool(["cpu"], res, m, e, cpu_memory_bytes=4 << 30, threads=int(t)),
                    models / "demo-image", args.batches, args.steps))
            for transport in args.transports.split(","):
                address = f"ray://127.0.0.1:{client_port}" if transport == "client" else cluster.address
                ray.init(address=address, namespace="bench", log_to_driver=False)
                results[f"ray actor ({transport})"] = asyncio.run(dispatch_latency(
                    lambda m, e: RayPool(1, res, m, e, RaySettings(
                        address, "bench", f"lat-{transport}", DEVICE, 1.0, memory_budget=4 << 30,
                        transport="stream" if transport == "stream" else "poll")),
                    models / "demo-image", args.batches, args.steps))
                ray.shutdown()
            for name, (xs, ys, rs, ready) in results.items():
                print(f"dispatch->start {name}: median {statistics.median(xs):.2f} ms, p99 {pct(xs, 0.99):.2f} ms; "
                      f"started->server median {statistics.median(ys):.2f} ms, p99 {pct(ys, 0.99):.2f} ms "
                      f"(n={len(xs)})")
                print(f"  run on the worker ({args.steps} steps): median {statistics.median(rs):.1f} ms, "
                      f"p99 {pct(rs, 0.99):.1f} ms; threads {ready.get('threads')}, interop "
                      f"{ready.get('interop_threads')}, OMP_NUM_THREADS {(ready.get('thread_env') or {}).get('OMP_NUM_THREADS')}")
            for name, (xs, ys, _, _) in results.items():
                if name.startswith("ray"):
                    print(f"added by {name}: dispatch median {statistics.median(xs) - statistics.median(local[0]):.2f} ms,"
                          f" back median {statistics.median(ys) - statistics.median(local[1]):.2f} ms")
        if args.dispatch_only:
            cluster.shutdown()
            return

        # Both servers up at once, measured alternately (the machine is shared: its load drifts).
        with LiveServer(tmp / "local", server_toml(models, None, None, "l"), workers=2) as loc, \
                LiveServer(tmp / "ray", server_toml(models, s3, cluster.address, "r"), workers=2) as ray_srv:
            rounds = []
            for _ in range(args.rounds):
                tp_local, tp_ray = throughput(loc, args.jobs), throughput(ray_srv, args.jobs)
                rounds.append(tp_ray / tp_local)
                print(f"throughput: local {tp_local:.2f} jobs/s, ray {tp_ray:.2f} jobs/s, ratio {tp_ray / tp_local:.2f}")
            print(f"throughput ratio ray/local: median {statistics.median(rounds):.2f} over {len(rounds)} rounds")

        with LiveServer(tmp / "loss", server_toml(models, s3, cluster.address, "n"), workers=2) as srv, \
                httpx.Client(base_url=srv.url, timeout=60) as c:
            wait_until(lambda: sum(w["state"] in ("idle", "busy", "loading") for w in c.get("/v1/workers").json()["data"]) == 2,
                       180, "two workers")
            jid = c.post("/v1/jobs", json={"model": "demo-image", "prompt": "doomed", "steps": 300}).json()["id"]
            job = wait_until(lambda: (j := c.get(f"/v1/jobs/{jid}").json())["status"] == "running" and j["progress"] and j,
                             180, "running")
            lost = job["batch"]["worker"]
            node = next(w["node"] for w in c.get("/v1/workers").json()["data"] if w["id"] == lost)
            t0 = time.time()
            cluster.remove_node(next(n for n in nodes if n.node_id == node), allow_graceful=False)
            wait_until(lambda: (j := c.get(f"/v1/jobs/{jid}").json())["batch"]["worker"] != lost
                       and j["status"] == "running", 120, "running elsewhere", every=0.02)
            print(f"node loss -> batch running elsewhere: {time.time() - t0:.2f} s "
                  "(Ray health check 300 ms x 3; includes the retry backoff)")
        cluster.shutdown()


if __name__ == "__main__":
    main()
