"""Step-level batching through the real server and a real worker process: jobs submitted while a
long job runs join its running set at the next step and finish long before it, each with its own
step count and guidance; their outputs equal the same jobs run alone at request level."""
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from genserve.testing import LiveServer, sse_events, wait_for, wait_until

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
