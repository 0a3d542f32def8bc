"""genserve connected to a real Ray cluster through Ray Client (``address = "ray://HOST:PORT"``):
a one-node cluster of its own (a head with two units of the device resource and a Ray Client
server on a free loopback port), apart from test_cluster.py's. Ray Client carries no streaming
actor calls, so the pool's messages come back by long polls; these tests show jobs, progress,
worker loss and ``kill -9`` re-attachment working through it."""
from __future__ import annotations

import os
import signal
import socket
import time

import httpx
import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only (read when ray is imported)
ray = pytest.importorskip("ray")

from genserve.bench.live import LiveServer, sse_events, wait_for, wait_until  # noqa: E402
from genserve.workers.ray_pool import RaySettings  # noqa: E402

pytestmark = pytest.mark.slow

DEVICE = "genserve_device"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client_address():
    """A head node of its own (its own session directory and random GCS port; shut down with the
    processes it started, nothing else) with a Ray Client server."""
    from ray.cluster_utils import Cluster

    port = _free_port()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {DEVICE: 2}, "ray_client_server_port": port, "node_ip_address": "127.0.0.1",
        "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5,
                           "health_check_initial_delay_ms": 0}})
    yield f"ray://127.0.0.1:{port}"
    c.shutdown()


def client_toml(models, address: str, name: str) -> str:
    return f"""
[server]
heartbeat_s = 0.5
heartbeat_timeout_s = 30

[cluster]
provider = "ray"
address = "{address}"
device_resource = "{DEVICE}"
workers = 2
name = "{name}"

[models.demo-image]
kind = "image"
source = "{models / 'demo-image'}"
max_batch_size = 2
max_wait_ms = 0
sizes = ["64x64"]
default_size = "64x64"
default_steps = 2
max_steps = 400
default_guidance = 1.0
"""


def up_workers(c: httpx.Client, n: int) -> list[dict] | None:
    ws = c.get("/v1/workers").json()["data"]
    return ws if len(ws) == n and all(w["state"] in ("idle", "busy", "loading") for w in ws) else None


def running(c: httpx.Client, job_id: str) -> dict | None:
    job = c.get(f"/v1/jobs/{job_id}").json()
    return job if job["status"] == "running" and job.get("progress") else None


def test_jobs_run_through_ray_client_with_live_progress(demo_models, client_address, tmp_path):
    with LiveServer(tmp_path / "a", client_toml(demo_models, client_address, "rc-a")) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        ws = wait_until(lambda: up_workers(c, 2), 360, "two workers up")
        assert all(w["node"] and w["device_name"] == "cpu" for w in ws)  # "placed" came through the poll
        ids = [c.post("/v1/jobs", json={"model": "demo-image", "prompt": f"p{i}", "steps": 8}).json()["id"]
               for i in range(4)]
        jobs = [wait_for(c, j, 180) for j in ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * 4
        assert len({j["batch"]["worker"] for j in jobs}) == 2  # both actors served
        assert c.get(f"/v1/jobs/{ids[0]}/result").content.startswith(b"\x89PNG")
        # Progress arrives step by step as the worker reports it, then the outcome; the ten or so
        # messages of this (warm) job come back as they happen: all of them in less time than one
        # poll would wait with nothing to say.
        t0 = time.monotonic()
        job = c.post("/v1/jobs", json={"model": "demo-image", "prompt": "live", "steps": 6}).json()
        events = sse_events(c, job["id"])
        assert time.monotonic() - t0 < RaySettings.poll_wait_s
        names = [e for e, _, _ in events]
        assert names[0] == "queued" and "started" in names and names[-1] == "succeeded"
        assert [d["step"] for e, d, _ in events if e == "progress"] == list(range(1, 7))
    assert "long poll through Ray Client" in srv.log_path.read_text()


def test_a_killed_actor_is_a_lost_worker_and_its_batch_runs_again(demo_models, client_address, tmp_path):
    with LiveServer(tmp_path / "b", client_toml(demo_models, client_address, "rc-b")) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        wait_until(lambda: up_workers(c, 2), 360, "two workers up")
        jid = c.post("/v1/jobs", json={"model": "demo-image", "prompt": "doomed", "steps": 150}).json()["id"]
        job = wait_until(lambda: running(c, jid), 360, "the long batch running")
        victim = next(w for w in c.get("/v1/workers").json()["data"] if w["id"] == job["batch"]["worker"])
        os.kill(victim["pid"], signal.SIGKILL)  # the actor's process: Ray reports it dead to the poll
        done = wait_for(c, jid, 600)
        assert done["status"] == "succeeded" and len(done["results"]) == 1
        assert [a["code"] for a in done["attempts"]][:1] == ["worker_crashed"] and len(done["attempts"]) == 2
        # The lost worker comes back as a new actor (the node has its device unit free again).
        ws = wait_until(lambda: up_workers(c, 2), 360, "the replacement up")
        assert victim["pid"] not in {w["pid"] for w in ws}


def test_server_kill_9_reattaches_through_ray_client(demo_models, client_address, tmp_path):
    cfg = client_toml(demo_models, client_address, "rc-c")
    srv = LiveServer(tmp_path / "c", cfg).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            before = {w["id"]: w["pid"] for w in wait_until(lambda: up_workers(c, 2), 360, "two workers up")}
            ids = [c.post("/v1/jobs", json={"model": "demo-image", "prompt": f"k{i}", "steps": 300 if i == 0 else 10}
                          ).json()["id"] for i in range(4)]
            wait_until(lambda: running(c, ids[0]), 360, "the long batch running")
        srv.stop(kill=True)
        srv = LiveServer(tmp_path / "c", cfg).start()
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            jobs = [wait_for(c, j, 600) for j in ids]
            assert [j["status"] for j in jobs] == ["succeeded"] * 4
            # The batch running across the restart was finished by its worker and adopted: one attempt.
            assert [a["code"] for a in jobs[0]["attempts"]] == [None], jobs[0]["attempts"]
            after = {w["id"]: w["pid"] for w in wait_until(lambda: up_workers(c, 2), 180, "two workers up")}
            assert after == before  # the same actors, found again by name through Ray Client
    finally:
        srv.stop()
