"""/v1/images/generations with the official ``openai`` client against a live server and the real
demo pipelines: extra_body seed/steps give identical bytes, size=auto, output formats, quality ->
steps, a failing generation is one request (no blind retries), a client that goes away cancels."""
from __future__ import annotations

import base64
import io
import json
import socket

import httpx
import pytest
from PIL import Image

from genserve.bench.live import LiveServer, wait_until

from .conftest import catalog

pytestmark = pytest.mark.slow

FAULTS_ON = {"GENSERVE_ENABLE_FAULTS": "1"}


@pytest.fixture(scope="module")
def srv(demo_models, tmp_path_factory):
    # demo-image: default 64x64, 4 steps, max 400; a prompt with POISON makes its batch raise;
    # broken-image never loads (its jobs fail after 3 attempts, 0.2 s apart).
    text = catalog(demo_models, image_wait_ms=0).replace("aging_s = 30", "aging_s = 30\nretry_backoff_s = 0.2") + f"""
[models.broken-image]
kind = "image"
source = "{demo_models / 'demo-image'}"
sizes = ["64x64"]
default_steps = 2

[models.step-image]
kind = "image"
source = "{demo_models / 'demo-image'}"
batching = "step"
sizes = ["64x64"]
default_steps = 2

[faults]
fail_prompt = "POISON"
fail_load = ["broken-image"]
lives = 99
"""
    s = LiveServer(tmp_path_factory.mktemp("oai-images"), text, workers=1, env=FAULTS_ON).start()
    yield s
    s.stop()


@pytest.fixture
def c(srv):
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        yield client


def openai_client(srv, **kw):
    from openai import OpenAI

    return OpenAI(base_url=srv.url + "/v1", api_key="unused", **kw)


def jobs_with_prompt(c, prompt):
    return [j for j in c.get("/v1/jobs", params={"limit": 50}).json()["data"] if j["params"]["prompt"] == prompt]


def b64_images(res):
    return [base64.b64decode(d.b64_json) for d in res.data]


def test_same_seed_gives_identical_bytes_and_another_seed_differs(srv):
    oa = openai_client(srv)

    def gen(seed):
        return b64_images(oa.images.generate(model="demo-image", prompt="a lighthouse", size="64x64", n=2,
                                             response_format="b64_json", extra_body={"seed": seed, "steps": 2}))

    a, b, other = gen(5), gen(5), gen(6)
    assert a == b  # both images of the call: seeds 5 and 6
    assert a[0] != a[1] and other[0] != a[0]
    assert all(Image.open(io.BytesIO(x)).size == (64, 64) for x in a)


def test_size_auto_quality_and_extensions_land_in_the_job(srv, c):
    oa = openai_client(srv)
    res = oa.images.generate(model="demo-image", prompt="auto size", size="auto", quality="low",
                             extra_body={"negative_prompt": "blurry", "guidance": 2.0, "seed": 9})
    assert (res.size, res.quality, res.output_format) == ("64x64", "low", "png")
    job = c.get(f"/v1/jobs/{res.data[0].url.rsplit('/', 2)[-2]}").json()
    p = job["params"]
    assert (p["width"], p["height"], p["steps"], p["seed"]) == (64, 64, 2, 9)  # low: half of default_steps 4
    assert (p["negative_prompt"], p["guidance"]) == ("blurry", 2.0)
    png = httpx.get(res.data[0].url).content
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    res = oa.images.generate(model="demo-image", prompt="high quality", quality="high")
    job = c.get(f"/v1/jobs/{res.data[0].url.rsplit('/', 2)[-2]}").json()
    assert job["params"]["steps"] == 8 and res.quality == "high"


@pytest.mark.parametrize("fmt,magic,pil", [("jpeg", b"\xff\xd8\xff", "JPEG"), ("webp", b"RIFF", "WEBP")])
def test_output_formats(srv, c, fmt, magic, pil):
    oa = openai_client(srv)
    res = oa.images.generate(model="demo-image", prompt=f"a {fmt} cat", response_format="b64_json",
                             output_format=fmt, output_compression=60, extra_body={"seed": 1, "steps": 2})
    raw = b64_images(res)[0]
    assert raw.startswith(magic) and res.output_format == fmt
    img = Image.open(io.BytesIO(raw))
    assert img.format == pil and img.size == (64, 64)
    # The native route: the same format, the result served with its own type and file name.
    r = c.post("/v1/jobs", json={"model": "demo-image", "prompt": f"native {fmt}", "steps": 2,
                                 "output_format": fmt, "output_compression": 60})
    assert r.status_code == 202, r.text
    job = wait_until(lambda: (j := c.get(f"/v1/jobs/{r.json()['id']}").json())["status"] == "succeeded" and j,
                     120, what="the job")
    assert job["results"][0]["content_type"] == f"image/{fmt}"
    got = c.get(f"/v1/jobs/{job['id']}/result")
    assert got.headers["content-type"] == f"image/{fmt}" and got.content.startswith(magic)
    assert got.headers["content-disposition"].endswith(f'output.{fmt}"')


def test_step_batching_encodes_each_job_in_its_own_format(srv, c):
    oa = openai_client(srv)
    res = oa.images.generate(model="step-image", prompt="a stepped owl", n=2, response_format="b64_json",
                             output_format="jpeg", extra_body={"seed": 4})
    raws = b64_images(res)
    assert all(Image.open(io.BytesIO(x)).format == "JPEG" for x in raws) and raws[0] != raws[1]
    jobs = jobs_with_prompt(c, "a stepped owl")
    assert all(j["batch"]["mode"] == "step" and j["batch"]["joined_at_step"] is not None for j in jobs)  # run_steps
    assert {j["results"][0]["content_type"] for j in jobs} == {"image/jpeg"}


def test_a_failing_generation_is_one_request_and_not_retried(srv, c):
    import openai

    sent = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    oa = openai_client(srv, max_retries=2, http_client=http)
    prompt = "a POISON apple"
    with pytest.raises(openai.InternalServerError) as e:
        oa.images.generate(model="demo-image", prompt=prompt, extra_body={"steps": 2})
    assert len(sent) == 1  # the client did not retry
    assert e.value.status_code == 500 and e.value.response.headers["x-should-retry"] == "false"
    assert e.value.code == "internal" and "failed" in e.value.message
    jobs = jobs_with_prompt(c, prompt)
    assert len(jobs) == 1 and jobs[0]["status"] == "failed"  # and the server ran it once


def test_a_model_that_cannot_load_is_502_after_genserve_retried_and_the_client_does_not(srv, c):
    import openai

    sent = []
    oa = openai_client(srv, max_retries=2, http_client=httpx.Client(event_hooks={"request": [sent.append]}))
    with pytest.raises(openai.InternalServerError) as e:
        oa.images.generate(model="broken-image", prompt="never drawn")
    assert len(sent) == 1 and e.value.status_code == 502 and e.value.code == "model_load_failed"
    (job,) = jobs_with_prompt(c, "never drawn")
    assert [a["code"] for a in job["attempts"]] == ["model_load_failed"] * 3  # genserve's own retries


def test_a_client_that_goes_away_cancels_its_jobs(srv, c):
    prompt = "a very slow painting"
    body = json.dumps({"model": "demo-image", "prompt": prompt, "n": 2, "steps": 400}).encode()
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: any(j["status"] == "running" and (j["progress"] or {}).get("step")
                           for j in jobs_with_prompt(c, prompt)), 120, what="the generation running")
    sock.close()
    jobs = wait_until(lambda: (js := jobs_with_prompt(c, prompt)) and all(j["status"] == "canceled" for j in js)
                      and js, 60, what="its jobs canceled")
    assert len(jobs) == 2
    assert all(not j["results"] for j in jobs)  # stopped before an output was written


def test_stream_with_the_official_client(srv):
    oa = openai_client(srv)
    events = list(oa.images.generate(model="demo-image", prompt="a streamed fox", n=2, stream=True, partial_images=2,
                                     output_format="webp", extra_body={"seed": 11, "steps": 2}))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert all(base64.b64decode(e.b64_json).startswith(b"RIFF") and e.output_format == "webp" for e in events)
    # The same images as without streaming.
    plain = oa.images.generate(model="demo-image", prompt="a streamed fox", n=2, output_format="webp",
                               response_format="b64_json", extra_body={"seed": 11, "steps": 2})
    assert [e.b64_json for e in events] == [d.b64_json for d in plain.data]
