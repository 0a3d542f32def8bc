"""Tenant-aware admission over HTTP (issue 22): two API keys of two tenants against a real
``genserve serve``. One tenant floods a model from two threads and fills its queue; the other
tenant's jobs are still accepted, and the flood is held to its share (engine/policies/admission.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import httpx
import pytest

from genserve.bench.live import LiveServer

pytestmark = pytest.mark.slow

MAX_QUEUE = 20
# No workers: nothing is dispatched, so the queue only fills (a flood that is never drained).
CONFIG = f"""
[models.img]
kind = "image"
source = "{{root}}/no-weights"
default_size = "64x64"
max_queue = {MAX_QUEUE}
"""


def create_key(data, tenant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "genserve.cli", "keys", "create", "--tenant", tenant,
                          "--data-dir", str(data)], capture_output=True, text=True, timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_a_flooding_tenant_cannot_lock_another_out_of_a_model(tmp_path):
    data = tmp_path / "data"
    with LiveServer(data, CONFIG.format(root=tmp_path), workers=0) as srv:
        flood_key, trickle_key = create_key(data, "flood"), create_key(data, "trickle")
        lock = threading.Condition()
        flood: list[httpx.Response] = []
        stop = threading.Event()

        def flood_thread() -> None:
            with httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": f"Bearer {flood_key}"}) as c:
                while not stop.is_set():
                    r = c.post("/v1/jobs", json={"model": "img", "prompt": "flood"})
                    with lock:
                        flood.append(r)
                        lock.notify_all()

        def refused() -> int:
            return sum(r.status_code == 429 for r in flood)

        threads = [threading.Thread(target=flood_thread) for _ in range(2)]
        for t in threads:
            t.start()
        trickle = []
        try:
            with lock:  # the flood has filled the queue while alone
                assert lock.wait_for(lambda: refused() >= 1, timeout=120), [r.text for r in flood[-3:]]
            with httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": f"Bearer {trickle_key}"}) as c:
                for i in range(5):
                    trickle.append(c.post("/v1/jobs", json={"model": "img", "prompt": f"trickle {i}"}))
                    seen = refused()
                    with lock:  # the flood keeps pressing between the trickle's submits
                        assert lock.wait_for(lambda: refused() >= seen + 3, timeout=60)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert [r.status_code for r in trickle] == [202] * 5, [r.text for r in trickle]
        accepted = [r for r in flood if r.status_code == 202]
        assert len(accepted) == MAX_QUEUE  # all it got while alone; over its share (10) since then
        last = flood[-1]
        assert last.status_code == 429 and last.json()["error"]["code"] == "queue_full"
        assert "holds its share (10 jobs)" in last.json()["error"]["message"] and int(last.headers["Retry-After"]) >= 1
        models = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": f"Bearer {trickle_key}"}).json()
        [img] = [m for m in models["data"] if m["id"] == "img"]
        assert img["queue_depth"] == MAX_QUEUE + 5  # past max_queue by the newcomer's jobs: nothing evicted
