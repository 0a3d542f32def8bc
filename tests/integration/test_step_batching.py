"""Step-level batching through the real server and a real worker process: jobs submitted while a
long job runs join its running set at the next step and finish long before it, each with its own
step count and guidance; their outputs equal the same jobs run alone at request level."""
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from genserve.bench.live import LiveServer, sse_events, wait_for, wait_until

pytestmark = pytest.mark.slow


def model(name, models, batching):
    return f"""
[models.{name}]
kind = "image"
source = "{models / 'demo-image'}"
batching = "{batching}"
max_batch_size = 4
sizes = ["32x32"]
default_steps = 4
max_steps = 400
default_guidance = 1.0
"""


def pixels(c, job_id):
    r = c.get(f"/v1/jobs/{job_id}/result")
    assert r.status_code == 200
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16)


def test_jobs_join_a_running_set_and_match_their_standalone_outputs(demo_models, tmp_path):
    cfg = model("img-step", demo_models, "step") + model("img-req", demo_models, "request")
    with LiveServer(tmp_path, cfg, workers=1) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        long = c.post("/v1/jobs", json={"model": "img-step", "prompt": "long", "steps": 400, "seed": 1}).json()["id"]
        wait_until(lambda: (c.get(f"/v1/jobs/{long}").json().get("progress") or {}).get("step", 0) >= 1,
                   timeout=120, what="the long job's first step")
        shorts = [
            {"model": "img-step", "prompt": "a red fox", "steps": 3, "guidance": 1.0, "seed": 11},
            {"model": "img-step", "prompt": "a lighthouse", "steps": 5, "guidance": 4.0, "seed": 12,
             "negative_prompt": "blurry"},
        ]
        ids = [c.post("/v1/jobs", json=b).json()["id"] for b in shorts]
        events = sse_events(c, ids[1])
        done = [wait_for(c, j) for j in ids]
        assert [d["status"] for d in done] == ["succeeded", "succeeded"]
        # the long job was still running: they joined its set, shared its steps and left before it ended
        assert c.get(f"/v1/jobs/{long}").json()["status"] == "running"
        for d in done:
            assert d["batch"]["mode"] == "step"
            assert d["batch"]["id"] == c.get(f"/v1/jobs/{long}").json()["batch"]["id"]
            assert d["batch"]["joined_at_step"] >= 1
            assert long in d["batch"]["shared_steps_with"]
            assert d["progress"] == {"step": d["params"]["steps"], "total": d["params"]["steps"]}
        steps = [e[1]["step"] for e in events if e[0] == "progress"]
        assert steps == [1, 2, 3, 4, 5]  # its own steps, not the long job's
        assert c.post(f"/v1/jobs/{long}/cancel").status_code == 200
        assert wait_for(c, long)["status"] == "canceled"
        metrics = c.get("/metrics").text
        assert "genserve_running_jobs" in metrics

        # The same requests alone at request level: the same pixels (see tests/backends/test_stepping.py).
        for body, jid in zip(shorts, ids):
            alone = c.post("/v1/jobs", json={**body, "model": "img-req"}).json()["id"]
            assert wait_for(c, alone)["status"] == "succeeded"
            assert np.abs(pixels(c, alone) - pixels(c, jid)).max() <= 2


def test_a_high_priority_job_pauses_a_low_one_which_resumes_where_it_stopped(demo_models, tmp_path):
    cfg = (model("img-step", demo_models, "step").replace("max_batch_size = 4", "max_batch_size = 1")
           + model("img-req", demo_models, "request"))
    with LiveServer(tmp_path, cfg, workers=1) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        low_body = {"model": "img-step", "prompt": "background work", "steps": 150, "seed": 5, "priority": "low"}
        low = c.post("/v1/jobs", json=low_body).json()["id"]
        wait_until(lambda: (c.get(f"/v1/jobs/{low}").json().get("progress") or {}).get("step", 0) >= 2,
                   timeout=120, what="the low job's second step")
        high = c.post("/v1/jobs", json={"model": "img-step", "prompt": "urgent", "steps": 3, "seed": 6,
                                        "priority": "high"}).json()["id"]
        h = wait_for(c, high)
        assert h["status"] == "succeeded"
        assert c.get(f"/v1/jobs/{low}").json()["status"] in ("queued", "running")  # paused, not done
        lo = wait_for(c, low, timeout=300)
        assert lo["status"] == "succeeded"
        codes = [a["code"] for a in lo["attempts"]]
        assert codes[0] == "preempted" and codes[-1] is None  # paused once, then finished
        assert lo["progress"] == {"step": 150, "total": 150}
        [paused_at] = lo["batch"]["paused_at_steps"]
        assert 2 <= paused_at < 150  # it went on from there, not from step 0
        # resumed from its latents: the same image as an uninterrupted run
        alone = c.post("/v1/jobs", json={**low_body, "model": "img-req", "priority": "standard"}).json()["id"]
        assert wait_for(c, alone, timeout=300)["status"] == "succeeded"
        assert np.abs(pixels(c, alone) - pixels(c, low)).max() <= 2
