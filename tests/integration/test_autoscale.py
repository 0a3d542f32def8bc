"""The local provider: the engine's autoscaler starts and retires real worker processes."""
import os

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from genserve.bench.live import LiveServer, wait_for, wait_until

pytestmark = pytest.mark.slow


def workers(c):
    return c.get("/v1/workers").json()["data"]


def test_queue_depth_scales_worker_processes_up_and_down(demo_models, tmp_path):
    cfg = f"""
[autoscale]
policy = "queue_depth"
min_devices = 1
max_devices = 2
target_queue_s = 1.0
interval_s = 0.5
scale_down_delay_s = 3.0

[models.demo-image]
kind = "image"
source = "{demo_models / 'demo-image'}"
max_batch_size = 2
sizes = ["64x64"]
default_steps = 20
max_steps = 100
default_guidance = 1.0
"""
    with LiveServer(tmp_path, cfg, workers=1) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        first = workers(c)
        assert len(first) == 1 and first[0]["state"] in ("idle", "busy")
        # Warm up so the engine has timed a batch, then queue ~20 batches of work.
        wait_for(c, c.post("/v1/jobs", json={"model": "demo-image", "prompt": "warm"}).json()["id"])
        ids = [c.post("/v1/jobs", json={"model": "demo-image", "prompt": f"load {i}", "seed": i}).json()["id"]
               for i in range(24)]
        def two_up():
            ws = workers(c)
            return ws if len([w for w in ws if w.get("pid")]) == 2 else None

        two = wait_until(two_up, 240, "a second worker process")  # a process start takes a minute on a loaded 2-core box
        pids = {w["id"]: w["pid"] for w in two}
        jobs = [wait_for(c, j, timeout=300) for j in ids]
        assert all(j["status"] == "succeeded" for j in jobs)
        assert len({j["batch"]["worker"] for j in jobs}) == 2  # the new worker took part of the load
        # Idle again: after the scale-down delay one worker is retired, and its process exits.
        def one_left():
            ws = workers(c)
            return ws if len(ws) == 1 else None

        one = wait_until(one_left, 180, "scale down to 1")
        gone = [pid for wid, pid in pids.items() if wid != one[0]["id"]]
        assert len(gone) == 1
        wait_until(lambda: not _alive(gone[0]), 20, "the retired process to exit")
        # The workers gauge (always exposed, so its presence proves nothing) counts the one left.
        states = {s.labels["state"]: s.value for fam in text_string_to_metric_families(c.get("/metrics").text)
                  if fam.name == "genserve_workers" for s in fam.samples}
        assert sum(states.values()) == 1, states


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0: look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
