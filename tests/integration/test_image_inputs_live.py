"""Image inputs end to end (issue 14): a real `genserve serve` with worker processes running the
built-in demo pipelines — image-to-image and inpainting on demo-image, image-to-video on demo-i2v,
a job's output used as the next job's input, the official OpenAI client's ``images.edit``, the
refusals (a 4xx naming the field), other tenants' jobs, and a stored input surviving a restart."""
from __future__ import annotations

import base64
import io
import os
import subprocess
import sys

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from genserve.backends.image_input import MAX_PIXELS
from genserve.bench.live import LiveServer, wait_for, wait_until

pytestmark = pytest.mark.slow


def config(models, i2v) -> str:
    return f"""
[models.demo-image]
kind = "image"
source = "{models / 'demo-image'}"
max_batch_size = 4
max_wait_ms = 200
sizes = ["32x32", "64x64"]
default_size = "32x32"
default_steps = 4
default_guidance = 1.0

# the same weights, step-level batching: image jobs run as request-level calls there
[models.demo-image-step]
kind = "image"
source = "{models / 'demo-image'}"
batching = "step"
max_batch_size = 4
sizes = ["32x32"]
default_steps = 4
default_guidance = 1.0

[models.demo-i2v]
kind = "video"
source = "{i2v}"
max_batch_size = 2
max_pixels = 4096
size_multiple = 16
default_size = "32x32"
default_steps = 2
default_guidance = 1.0
default_frames = 5
max_frames = 9
frame_stride = 4
"""


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "demo-i2v"
    subprocess.run([sys.executable, "-m", "genserve.backends.demo", "i2v", str(out)], check=True, capture_output=True)
    return out


def new_key(data, tenant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "genserve.cli", "keys", "create", "--tenant", tenant, "--data-dir",
                          str(data)], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(demo_models, i2v, tmp_path_factory):
    data = tmp_path_factory.mktemp("srv")
    keys = {t: new_key(data, t) for t in ("acme", "globex")}
    srv = LiveServer(data, config(demo_models, i2v), workers=1).start()
    srv.keys = keys
    yield srv
    srv.stop()


@pytest.fixture
def acme(server):
    with httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {server.keys['acme']}"}) as c:
        yield c


@pytest.fixture
def globex(server):
    with httpx.Client(base_url=server.url, timeout=120,
                      headers={"Authorization": f"Bearer {server.keys['globex']}"}) as c:
        yield c


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


PICTURE = png(Image.fromarray((np.random.RandomState(1).rand(40, 48, 3) * 255).astype("uint8")))
MASK = Image.new("L", (48, 40), 0)
MASK.paste(255, (0, 0, 24, 40))


def done(c: httpx.Client, r: httpx.Response) -> dict:
    assert r.status_code == 202, r.text
    job = wait_for(c, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    return job


def result(c: httpx.Client, job: dict) -> bytes:
    r = c.get(f"/v1/jobs/{job['id']}/result")
    assert r.status_code == 200
    return r.content


def test_img2img_and_inpaint_run_the_real_pipelines(acme):
    text = done(acme, acme.post("/v1/jobs", json={"model": "demo-image", "prompt": "a fox", "seed": 5}))
    a = done(acme, acme.post("/v1/jobs", json={"model": "demo-image", "prompt": "a fox", "seed": 5,
                                               "image": url(PICTURE), "strength": 0.5}))
    # the same inputs as a multipart upload: identical bytes out
    b = done(acme, acme.post("/v1/jobs", data={"model": "demo-image", "prompt": "a fox", "seed": "5",
                                               "strength": "0.5"}, files={"image": ("p.png", PICTURE)}))
    assert a["params"]["task"] == "img2img" and a["params"]["image"] == b["params"]["image"]
    assert result(acme, a) == result(acme, b) != result(acme, text)
    ins = [done(acme, acme.post("/v1/jobs", json={"model": "demo-image", "prompt": "a fox", "seed": s,
                                                  "image": url(PICTURE), "mask": url(png(MASK))})) for s in (3, 4)]
    assert ins[0]["params"]["task"] == "inpaint" and ins[0]["params"]["strength"] == 1.0
    x, y = (np.asarray(Image.open(io.BytesIO(result(acme, j))).convert("RGB")).astype(int) for j in ins)
    assert x.shape == (32, 32, 3)
    # the left half (the mask, fitted to 32x32) is repainted per seed; the right half keeps the image
    assert np.abs(x - y)[:, :8].mean() > 4 * np.abs(x - y)[:, 24:].mean()


def test_step_mode_models_run_image_jobs_as_request_level_calls(acme):
    body = {"prompt": "a fox", "seed": 5, "image": url(PICTURE), "strength": 0.5}
    step = done(acme, acme.post("/v1/jobs", json={"model": "demo-image-step", **body}))
    req = done(acme, acme.post("/v1/jobs", json={"model": "demo-image", **body}))
    assert result(acme, step) == result(acme, req)


def test_an_image_job_becomes_a_video_without_a_round_trip(acme):
    img = done(acme, acme.post("/v1/jobs", json={"model": "demo-image", "prompt": "a fox", "seed": 1}))
    vid = done(acme, acme.post("/v1/jobs", json={"model": "demo-i2v", "prompt": "it runs", "seed": 1,
                                                 "image": {"job": img["id"], "index": 0}}))
    assert vid["params"]["task"] == "i2v"
    with av.open(io.BytesIO(result(acme, vid))) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    # and back: a video's first frame as an init image
    back = done(acme, acme.post("/v1/jobs", json={"model": "demo-image", "prompt": "a fox", "seed": 1,
                                                  "image": {"job": vid["id"]}}))
    assert back["params"]["task"] == "img2img"


def test_bad_inputs_get_a_4xx_naming_the_field(acme, globex):
    bomb = png(Image.new("1", (MAX_PIXELS // 4000 + 1, 4001)))
    mine = done(acme, acme.post("/v1/jobs", json={"model": "demo-image", "prompt": "x", "steps": 1}))
    cases = [({"image": url(b"GIF89a not really")}, "image", 400),
             ({"image": url(bomb)}, "image", 400),
             ({"image": url(png(Image.new("1", (2_097_152, 8))))}, "image", 400),  # a strip (issue 22)
             ({"image": url(PICTURE), "mask": url(png(Image.new("L", (40, 40))))}, "mask", 400),
             ({"image": {"job": "f" * 32}}, "image", 404)]
    for body, field, status in cases:
        r = acme.post("/v1/jobs", json={"model": "demo-image", "prompt": "x", **body})
        assert r.status_code == status and r.json()["error"]["field"] == field, (body.keys(), r.text)
    # another tenant's job is reported exactly like one that does not exist
    theirs = globex.post("/v1/jobs", json={"model": "demo-image", "prompt": "x", "image": {"job": mine["id"]}})
    unknown = globex.post("/v1/jobs", json={"model": "demo-image", "prompt": "x", "image": {"job": "f" * 32}})
    assert theirs.status_code == unknown.status_code == 404 and theirs.json()["error"]["field"] == "image"
    assert theirs.json()["error"]["message"].replace(mine["id"], "f" * 32) == unknown.json()["error"]["message"]


def test_images_edit_with_the_official_client(server, acme):
    import openai

    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["acme"], max_retries=0, timeout=300)
    mask = Image.new("RGBA", (48, 40), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 24, 40))  # transparent: the area to edit
    runs = [oa.images.edit(image=("p.png", PICTURE, "image/png"), mask=("m.png", png(mask), "image/png"),
                           prompt="a fox", model="demo-image", size="32x32", response_format="b64_json",
                           extra_body={"seed": 7, "steps": 2}) for _ in range(2)]
    outs = [base64.b64decode(r.data[0].b64_json) for r in runs]
    assert outs[0] == outs[1] and Image.open(io.BytesIO(outs[0])).size == (32, 32)  # same seed, same bytes
    plain = oa.images.edit(image=[("p.png", PICTURE, "image/png")], prompt="a fox", model="demo-image", n=2)
    assert len(plain.data) == 2 and all(d.url for d in plain.data)
    jobs = [acme.get(d.url.replace(server.url, "").replace("/result", "")).json() for d in plain.data]
    assert {j["params"]["task"] for j in jobs} == {"img2img"}
    with pytest.raises(openai.BadRequestError) as e:
        oa.images.edit(image=("a.txt", b"plain text", "text/plain"), prompt="x", model="demo-image")
    assert e.value.body["param"] == "image"


def test_a_stored_input_survives_a_restart_and_a_gone_client_cancels_its_edit(demo_models, i2v, tmp_path):
    data = tmp_path / "data"
    srv = LiveServer(data, config(demo_models, i2v), workers=0).start()  # nothing runs: the job stays queued
    try:
        r = httpx.post(f"{srv.url}/v1/jobs", data={"model": "demo-image", "prompt": "x", "seed": "2"},
                       files={"image": ("p.png", PICTURE)}, timeout=60)
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        # an edit whose client gives up waiting: its jobs are canceled, not left to run for nobody
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/images/edits", data={"prompt": "edit me", "n": "2"},
                       files={"image": ("p.png", PICTURE)}, timeout=3)

        def edits():
            jobs = httpx.get(f"{srv.url}/v1/jobs", timeout=10).json()["data"]
            return [j["status"] for j in jobs if j["params"]["prompt"] == "edit me"]

        wait_until(lambda: edits() == ["canceled", "canceled"], timeout=30, what="the edit's jobs canceled")
    finally:
        srv.stop(kill=True)
    with LiveServer(data, config(demo_models, i2v), workers=1) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            job = wait_for(c, jid, timeout=300)
            assert job["status"] == "succeeded", job
            assert Image.open(io.BytesIO(c.get(f"/v1/jobs/{jid}/result").content)).size == (32, 32)
