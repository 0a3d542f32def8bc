"""A non-demo family served through the real server: tiny FLUX (dev style) and Wan image-to-video
checkpoints from a genserve.toml, over HTTP, with a real worker process."""
import io
import shutil

import av
import httpx
import pytest
from PIL import Image

from genserve.backends.image_input import data_url
from genserve.bench.live import LiveServer, post_concurrently, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(family_models, tmp_path_factory):
    toml = f"""
[models.flux]
kind = "image"
source = "{family_models['flux-dev']}"
dtype = "float32"
max_batch_size = 4
max_wait_ms = 1500
default_size = "64x48"
default_steps = 2
default_guidance = 3.5
true_cfg_scale = 4.0
max_sequence_length = 16

[models.flux-plain]
kind = "image"
source = "{family_models['flux-dev']}"
dtype = "float32"
default_size = "64x48"
default_steps = 2

[models.i2v]
kind = "video"
source = "{family_models['wan-i2v']}"
dtype = "float32"
max_batch_size = 2
default_size = "32x32"
default_steps = 2
default_guidance = 3.0
default_frames = 5
max_frames = 9
max_sequence_length = 16
fps = 4
"""
    with LiveServer(tmp_path_factory.mktemp("families-server"), toml, workers=1) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_models_report_their_family(client):
    by_id = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert by_id["flux"]["family"]["family"] == "flux" and by_id["flux"]["size_multiple"] == 16
    assert by_id["i2v"]["family"]["image_input"] is True and by_id["i2v"]["frame_stride"] == 4


def test_what_flux_cannot_honour_is_refused_at_submit(client):
    r = client.post("/v1/jobs", json={"model": "flux", "prompt": "x", "width": 72, "height": 64})
    assert r.status_code == 400 and "width" in r.text and "16" in r.text
    r = client.post("/v1/jobs", json={"model": "flux-plain", "prompt": "x", "negative_prompt": "blurry"})
    assert r.status_code == 400 and "negative_prompt" in r.text and "true_cfg_scale" in r.text


def test_flux_batch_with_and_without_negative_prompts(server, client):
    bodies = [{"model": "flux", "prompt": "a lighthouse", "seed": i, "negative_prompt": "blurry" if i % 2 else None}
              for i in range(4)]
    rs = post_concurrently(server.url, bodies)
    assert all(r.status_code == 202 for r in rs), [r.text for r in rs]
    done = [wait_for(client, r.json()["id"], timeout=180) for r in rs]
    assert all(j["status"] == "succeeded" for j in done), done
    for j in done:
        img = Image.open(io.BytesIO(client.get(f"/v1/jobs/{j['id']}/result").content))
        assert img.size == (64, 48)
    # jobs with and without a negative prompt never share a call (true CFG is per call)
    batches = {bool(j["params"]["negative_prompt"]): set() for j in done}
    for j in done:
        batches[bool(j["params"]["negative_prompt"])].add(j["batch"]["id"])
    assert not batches[True] & batches[False]


def test_wan_image_to_video(client):
    image = data_url(Image.new("RGB", (48, 40), (250, 250, 250)), "JPEG")
    r = client.post("/v1/jobs", json={"model": "i2v", "prompt": "waves", "image": image, "seed": 1})
    assert r.status_code == 202, r.text
    assert r.json()["params"]["image"].startswith("sha256:")  # not echoed back in full
    job = wait_for(client, r.json()["id"], timeout=180)
    assert job["status"] == "succeeded", job
    with av.open(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/result").content)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    r = client.post("/v1/jobs", json={"model": "i2v", "prompt": "waves"})
    assert r.status_code == 400 and "image" in r.text


def test_diffusers_warnings_reach_the_server_log(server, client):
    """The worker lets diffusers' warnings through (they are how a misconfigured model shows
    itself): a prompt longer than the model's max_sequence_length (16 here) is truncated, and the
    pipeline's warning saying so is in the log."""
    prompt = " ".join(f"lighthouse{i}" for i in range(40))
    r = client.post("/v1/jobs", json={"model": "flux", "prompt": prompt, "seed": 11})
    assert r.status_code == 202, r.text
    assert wait_for(client, r.json()["id"], timeout=180)["status"] == "succeeded"
    assert "truncated" in server.log_path.read_text(errors="replace")


def test_a_model_the_server_could_not_read_at_start_is_checked_at_load(family_models, tmp_path):
    """A source that was not there when the config was read (as an s3:// source or a Hugging Face
    id) keeps the default size_multiple 8; the worker compares it with the SD3 pipeline it loads
    (16) and fails the load naming the key, so a 72x64 job ends model_load_failed with that
    message instead of reaching the pipeline (which failed it `internal`)."""
    late = tmp_path / "late-sd3"
    toml = f"""
[server]
retry_backoff_s = 0.2
retry_backoff_max_s = 1.0

[models.late]
kind = "image"
source = "{late}"
dtype = "float32"
default_size = "72x64"
default_steps = 2
max_sequence_length = 16
"""
    with LiveServer(tmp_path / "srv", toml, workers=1) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        shutil.copytree(family_models["sd3"], late)
        r = c.post("/v1/jobs", json={"model": "late", "prompt": "a lighthouse"})
        assert r.status_code == 202, r.text  # the server could not know
        job = wait_for(c, r.json()["id"], timeout=180)
        assert job["status"] == "failed" and job["error"]["code"] == "model_load_failed", job
        assert "size_multiple = 8" in job["error"]["message"] and "multiples of 16" in job["error"]["message"]
