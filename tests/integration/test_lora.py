"""LoRA end to end on a live server with a real worker process: adapters uploaded over HTTP, a
mixed batch (4 different adapters + 1 without, submitted together) runs as ONE batch and each
output equals the job run alone; an adapter changes the output; the worker reports its adapters."""
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from genserve.bench.live import LiveServer, post_concurrently, wait_for
from tests.integration.conftest import catalog
from tests.lora_adapters import save_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_server(demo_models, tmp_path_factory):
    srv = LiveServer(tmp_path_factory.mktemp("lora"), catalog(demo_models), workers=1).start()
    yield srv
    srv.stop()


def pixels(c: httpx.Client, job_id: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(c.get(f"/v1/jobs/{job_id}/result").content)), np.int16)


def test_mixed_adapters_share_one_batch_and_match_each_job_alone(lora_server, demo_models, tmp_path):
    with httpx.Client(base_url=lora_server.url, timeout=120) as c:
        for i, rank in enumerate((4, 8, 16, 4)):
            data = save_adapter(tmp_path / f"s{i}.safetensors", demo_models / "demo-image", rank=rank,
                                seed=i, layout="kohya" if i == 2 else "peft").read_bytes()
            r = c.post("/v1/loras", data={"name": f"style{i}", "model": "demo-image"},
                       files={"file": (f"s{i}.safetensors", data)})
            assert r.status_code == 201, r.text
        bodies = [{"model": "demo-image", "prompt": "a lighthouse", "seed": 40 + i, "guidance": 4.0,
                   **({"loras": [{"name": f"style{i}", "scale": 0.9}]} if i < 4 else {})} for i in range(5)]
        jobs = [r.json() for r in post_concurrently(lora_server.url, bodies)]
        done = [wait_for(c, j["id"]) for j in jobs]
        assert all(d["status"] == "succeeded" for d in done), done
        assert len({d["batch"]["id"] for d in done}) == 1 and done[0]["batch"]["size"] == 5
        assert done[0]["params"]["loras"][0]["name"] == "style0"
        assert done[0]["breakdown"]["lora_load_s"] is not None and done[4]["breakdown"]["lora_load_s"] is None
        for body, d in zip(bodies, done):
            alone = wait_for(c, c.post("/v1/jobs", json=body).json()["id"])
            assert alone["batch"]["size"] == 1
            assert np.abs(pixels(c, d["id"]) - pixels(c, alone["id"])).max() <= 2, body
        plain = wait_for(c, c.post("/v1/jobs", json={**bodies[0], "loras": None}).json()["id"])
        assert np.abs(pixels(c, plain["id"]) - pixels(c, done[0]["id"])).max() > 10
        worker = c.get("/v1/workers").json()["data"][0]
        assert len(worker["resident_loras"]) == 4
        assert 'genserve_lora_hits_total' in c.get("/metrics").text
