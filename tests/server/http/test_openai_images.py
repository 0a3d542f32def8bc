"""/v1/images/generations and image output formats at the HTTP edge, in process: validation that
names the field, what each OpenAI field turns into (job records), and failures that tell the
official client not to retry. Pipelines and live sockets: tests/integration/test_openai_images.py."""
from __future__ import annotations

import asyncio
import json
import tomllib

import httpx
import pytest

from genserve.config.load import parse_config
from genserve.server.http.app import create_app
from genserve.server.runtime.runtime import Runtime
from genserve.workers.fake import FakePool

from ..auto_pool import auto_pool


def make_config(tmp_path):
    return parse_config(tomllib.loads(f"""
[server]
data_dir = "{tmp_path}"

[models.img]
kind = "image"
source = "{tmp_path}/no-weights-needed"
max_batch_size = 4
max_wait_ms = 0
sizes = ["64x64", "128x64"]
default_size = "128x64"
default_steps = 4
max_steps = 10

[models.vid]
kind = "video"
source = "{tmp_path}/no-weights-needed-2"
default_size = "64x64"
max_pixels = 16384
default_frames = 5
max_frames = 9
frame_stride = 4
"""))


def with_app(tmp_path, test, pool=FakePool):
    """``test(client, runtime)`` against the app; FakePool: jobs never run; auto_pool: at once."""
    cfg = make_config(tmp_path)

    async def go():
        rt = Runtime(cfg, devices=["cpu"], pool=pool)
        app = create_app(cfg, rt)
        await rt.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
                return await test(c, rt)
        finally:
            await rt.close()

    return asyncio.run(go())


def gen(**kw):
    return {"model": "img", "prompt": "a cat", **kw}


@pytest.mark.parametrize("body,field", [
    (gen(output_format="gif"), "output_format"),
    (gen(output_format="svg"), "output_format"),
    (gen(output_compression=50), "output_compression"),  # png is lossless
    (gen(output_format="jpeg", output_compression=101), "output_compression"),
    (gen(output_format="webp", output_compression=-1), "output_compression"),
    (gen(output_format="jpeg", output_compression="90"), "output_compression"),
    (gen(quality="ultra"), "quality"),
    (gen(size="autox"), "size"),
    (gen(size="1024x1024"), "size"),  # not one of the model's sizes
    (gen(seed=-1), "seed"),
    (gen(seed=2**63 - 1, n=2), "seed"),  # the second image's seed would overflow
    (gen(seed="5"), "seed"),
    (gen(steps=11), "steps"),
    (gen(steps=0), "steps"),
    (gen(guidance=99.0), "guidance"),
    (gen(negative_prompt=5), "negative_prompt"),
    (gen(timeout_s=10**9), "timeout_s"),
    (gen(stream="yes"), "stream"),
    (gen(sede=5), "sede"),  # a misspelled extension is refused, not silently dropped
    (gen(model="vid"), "model"),
    (gen(n=0), "n"),
    (gen(n=11), "n"),
])
def test_invalid_generation_bodies_are_400_naming_the_field(tmp_path, body, field):
    async def test(c, rt):
        r = await c.post("/v1/images/generations", content=json.dumps(body).encode(),
                         headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["field"] == field and r.json()["error"]["param"] == field, r.json()
        assert rt.store.recent(10) == []

    with_app(tmp_path, test)


@pytest.mark.parametrize("body,field", [
    ({"model": "vid", "prompt": "a", "output_format": "webp"}, "output_format"),
    ({"model": "vid", "prompt": "a", "output_compression": 50}, "output_compression"),
    ({"model": "img", "prompt": "a", "output_format": "gif"}, "output_format"),
    ({"model": "img", "prompt": "a", "output_format": "png", "output_compression": 50}, "output_compression"),
    ({"model": "img", "prompt": "a", "output_format": "jpeg", "output_compression": 100.0}, "output_compression"),
])
def test_invalid_output_fields_on_jobs_are_400_naming_the_field(tmp_path, body, field):
    async def test(c, rt):
        r = await c.post("/v1/jobs", json=body)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text
        assert rt.store.recent(10) == []

    with_app(tmp_path, test)


def test_output_fields_on_jobs_are_normalized_and_not_part_of_the_batch_key(tmp_path):
    async def test(c, rt):
        p = [(await c.post("/v1/jobs", json={"model": "img", "prompt": "a", **kw})).json()["params"]
             for kw in ({}, {"output_format": "jpeg"}, {"output_format": "webp", "output_compression": 40})]
        assert [(x["output_format"], x["output_compression"]) for x in p] == [("png", None), ("jpeg", 90), ("webp", 40)]
        v = (await c.post("/v1/jobs", json={"model": "vid", "prompt": "a"})).json()["params"]
        assert (v["output_format"], v["output_compression"]) == (None, None)
        # One batch key for all three images: the format is applied per job when encoding.
        from genserve.server.requests import JobParams
        assert len({JobParams.from_dict(x).key for x in p}) == 1

    with_app(tmp_path, test)


def test_openai_fields_become_job_fields(tmp_path):
    async def test(c, rt):
        r = await c.post("/v1/images/generations", json=gen(
            n=3, seed=5, negative_prompt="blur", guidance=3.5, size="auto", output_format="webp",
            output_compression=70, response_format="b64_json", style="vivid", user="u1", background="auto",
            moderation="low", partial_images=2, stream=False))
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["size"], body["output_format"], body["quality"], body["background"]) == ("128x64", "webp", None,
                                                                                                None)
        assert len(body["data"]) == 3 and all(d["b64_json"] for d in body["data"])
        jobs = sorted(rt.store.recent(10), key=lambda j: j["params"]["seed"])
        assert [j["params"]["seed"] for j in jobs] == [5, 6, 7]
        p = jobs[0]["params"]
        assert (p["width"], p["height"], p["steps"], p["negative_prompt"], p["guidance"]) == (128, 64, 4, "blur", 3.5)
        assert (p["output_format"], p["output_compression"]) == ("webp", 70)

    with_app(tmp_path, test, pool=auto_pool(str(tmp_path / "results")))


@pytest.mark.parametrize("quality,steps,reported", [
    ("low", 2, "low"), ("medium", 4, "medium"), ("auto", 4, "medium"), ("standard", 4, "medium"),
    ("high", 8, "high"), ("hd", 8, "high"),
    # xhigh wants 12 and max 16 steps; max_steps = 10 clamps both, and the response says what ran
    # (issue 22, item 10: xhigh ran 4 steps on SDXL-Turbo and said xhigh)
    ("xhigh", 10, "high"), ("max", 10, "high"),
])
def test_quality_maps_to_steps(tmp_path, quality, steps, reported):
    async def test(c, rt):
        r = await c.post("/v1/images/generations", json=gen(quality=quality))
        assert r.status_code == 200, r.text
        assert (r.json()["quality"], r.json()["steps"]) == (reported, steps)
        assert rt.store.recent(1)[0]["params"]["steps"] == steps
        # An explicit steps wins over quality.
        r = await c.post("/v1/images/generations", json=gen(quality=quality, steps=3))
        assert r.status_code == 200 and rt.store.recent(1)[0]["params"]["steps"] == 3

    with_app(tmp_path, test, pool=auto_pool(str(tmp_path / "results")))


def test_a_generation_past_its_deadline_is_504_and_not_retried(tmp_path):
    async def test(c, rt):
        # The fake pool never runs it: the job's own deadline fails it; the call says so.
        r = await c.post("/v1/images/generations", json=gen(timeout_s=0.3))
        assert r.status_code == 504, r.text
        assert r.headers["x-should-retry"] == "false"
        err = r.json()["error"]
        assert err["code"] == "timeout" and err["type"] == "server_error"
        assert rt.store.recent(1)[0]["status"] == "failed"

    with_app(tmp_path, test)


@pytest.mark.parametrize("status,code,http", [
    ("failed", "internal", 500), ("failed", "output_mismatch", 500), ("failed", "out_of_memory", 500),
    ("failed", "model_load_failed", 502), ("failed", "invalid_request", 400), ("failed", "timeout", 504),
    ("canceled", None, 409),
])
def test_every_failure_tells_the_client_not_to_retry(status, code, http):
    from genserve.server.http.openai.wait import failure

    r = failure({"id": "j1", "status": status, "error_code": code, "error_message": "why"})
    assert r.status_code == http and r.headers["x-should-retry"] == "false"
    err = json.loads(r.body)["error"]
    assert err["code"] == (code or status) and "j1" in err["message"]


def test_stream_true_answers_one_completed_event_per_image(tmp_path):
    async def test(c, rt):
        async with c.stream("POST", "/v1/images/generations", json=gen(n=2, seed=3, stream=True,
                                                                      output_format="jpeg")) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in r.aiter_lines() if line]
        assert [x for x in lines if x.startswith("event:")] == ["event: image_generation.completed"] * 2
        events = [json.loads(x[5:]) for x in lines if x.startswith("data:")]
        assert [(e["type"], e["output_format"], e["size"]) for e in events] == [
            ("image_generation.completed", "jpeg", "128x64")] * 2
        assert all(e["b64_json"] for e in events)

    with_app(tmp_path, test, pool=auto_pool(str(tmp_path / "results")))


@pytest.mark.parametrize("n", [1, 3])
def test_a_cancelled_wait_leaves_no_unretrieved_task_error(tmp_path, n):
    """Issue 22, item 6: a call cancelled while it waits (its client went away mid-request, the
    server shutting down) once left ``_GatheringFuture exception was never retrieved`` behind."""
    import gc

    async def test(c, rt):
        loop = asyncio.get_running_loop()
        unobserved: list[dict] = []
        loop.set_exception_handler(lambda _loop, ctx: unobserved.append(ctx))
        call = asyncio.ensure_future(c.post("/v1/images/generations", json=gen(n=n)))
        while len(rt.store.recent(10)) < n:  # the FakePool never runs them: the call waits
            await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(5):  # let the cancelled waits finish, then collect what they left
            await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
        assert unobserved == [], [ctx.get("message") for ctx in unobserved]

    with_app(tmp_path, test)
