"""The real server with a real worker process and the demo models, over HTTP."""
import base64
import io
import json

import av
import httpx
import pytest
from PIL import Image

from genserve.bench.live import post_concurrently, sse_events, wait_for

pytestmark = pytest.mark.slow


def submit(client, **body):
    r = client.post("/v1/jobs", json={"model": "demo-image", "prompt": "a lighthouse at dusk", **body})
    assert r.status_code == 202, r.text
    return r.json()


def test_health_ready_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    by_id = {m["id"]: m for m in models["data"]}
    assert by_id["demo-image"]["kind"] == "image" and by_id["demo-video"]["max_frames"] == 17
    assert client.get("/docs").status_code == 200 and "openapi" in client.get("/openapi.json").json()


def test_image_png_of_requested_size(client):
    job = submit(client, width=128, height=64, seed=3)
    assert job["urls"]["result"].endswith(f"/v1/jobs/{job['id']}/result")
    done = wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    r = client.get(f"/v1/jobs/{job['id']}/result")
    assert r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and img.size == (128, 64)
    ts = done["timestamps"]
    order = ["received", "queued", "dispatched", "inference_start", "inference_end", "output_written", "finished"]
    assert all(ts[a] <= ts[b] for a, b in zip(order, order[1:])), ts
    assert done["breakdown"]["inference_s"] > 0 and done["batch"]["size"] >= 1
    assert done["progress"] == {"step": 4, "total": 4}


def test_same_seed_same_image(client):
    a = wait_for(client, submit(client, seed=11)["id"])
    b = wait_for(client, submit(client, seed=11)["id"])
    ra = client.get(f"/v1/jobs/{a['id']}/result").content
    rb = client.get(f"/v1/jobs/{b['id']}/result").content
    assert ra == rb


def test_video_mp4_of_requested_size_and_frames(client):
    job = submit(client, model="demo-video", width=64, height=48, num_frames=13, steps=3)
    done = wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    r = client.get(f"/v1/jobs/{job['id']}/result")
    assert r.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(r.content)) as c:
        stream = c.streams.video[0]
        frames = list(c.decode(video=0))
        assert stream.codec_context.name == "h264"
    assert len(frames) == 13 and (frames[0].width, frames[0].height) == (64, 48)


def _concurrent(client_url, bodies):
    out = post_concurrently(client_url, bodies)
    assert all(r.status_code == 202 for r in out), [r.text for r in out]
    return [r.json()["id"] for r in out]


def test_eight_concurrent_same_size_requests_run_in_at_most_two_batches(client, server):
    ids = _concurrent(server.url, [{"model": "demo-image", "prompt": f"cat {i}", "seed": i} for i in range(8)])
    jobs = [wait_for(client, j) for j in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    batches = {j["batch"]["id"] for j in jobs}
    assert len(batches) <= 2, batches
    for j in jobs:
        assert j["batch"]["size"] == sum(1 for k in jobs if k["batch"]["id"] == j["batch"]["id"])


def test_different_sizes_never_share_a_batch(client, server):
    sizes = [(64, 64), (128, 64), (64, 128), (128, 128)] * 2
    ids = _concurrent(server.url, [{"model": "demo-image", "prompt": "x", "width": w, "height": h} for w, h in sizes])
    jobs = [wait_for(client, j) for j in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    by_batch = {}
    for j in jobs:
        by_batch.setdefault(j["batch"]["id"], set()).add((j["params"]["width"], j["params"]["height"]))
    assert all(len(shapes) == 1 for shapes in by_batch.values()), by_batch
    assert len(by_batch) >= 4


def test_sse_event_order_live_and_late(client):
    job = submit(client, steps=6)
    live = sse_events(client, job["id"])
    names = [e for e, _, _ in live]
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "succeeded"
    progress = [d for e, d, _ in live if e == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 7)) and all(p["total"] == 6 for p in progress)
    assert [i for _, _, i in live] == sorted(i for _, _, i in live)
    # A client connecting after the job ended gets its milestones, rebuilt from the record (the
    # in-memory history is released once a job is terminal), and a Last-Event-ID from the live
    # stream still leads to the outcome.
    late = sse_events(client, job["id"])
    assert [(e, d) for e, d, _ in late] == [(e, d) for e, d, _ in live if e != "progress"]
    resumed = sse_events(client, job["id"], headers={"Last-Event-ID": str(live[2][2])})
    assert [e for e, _, _ in resumed] == ["succeeded"] and resumed[0][2] > live[2][2]


def test_cancel_queued_job(client):
    job = submit(client, model="slow-lane", prompt="waits")
    assert job["status"] == "queued" and job["queue_position"] == 0
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"  # idempotent
    assert client.get(f"/v1/jobs/{job['id']}/result").status_code == 409
    assert [e for e, _, _ in sse_events(client, job["id"])] == ["queued", "canceled"]


def test_cancel_running_job_stops_at_a_step_boundary(client):
    job = submit(client, steps=400, prompt="a very long job")
    steps, last = [], None
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "progress":
                steps.append(json.loads(line[5:])["step"])
                if len(steps) == 1:  # running: cancel it, and follow the live stream to its end
                    r2 = client.post(f"/v1/jobs/{job['id']}/cancel")
                    assert r2.status_code == 200 and r2.json()["cancel_requested"]
            elif line.startswith("data:"):
                last = event
    done = wait_for(client, job["id"], timeout=30)
    assert done["status"] == "canceled"
    assert last == "canceled" and steps and max(steps) < 400
    assert client.get(f"/v1/jobs/{job['id']}/result").status_code == 409
    # The worker is free again for the next job.
    assert wait_for(client, submit(client)["id"])["status"] == "succeeded"


def test_idempotent_client_ids(client):
    a = client.post("/v1/jobs", json={"model": "demo-image", "prompt": "same", "id": "client-42"})
    b = client.post("/v1/jobs", json={"model": "demo-image", "prompt": "same", "id": "client-42"})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"] and b.headers.get("idempotent-replayed") == "true"
    c = client.post("/v1/jobs", json={"model": "demo-image", "prompt": "different", "id": "client-42"})
    assert c.status_code == 409 and c.json()["error"]["field"] == "id"
    wait_for(client, a.json()["id"])


def test_queue_full_is_429_with_retry_after(client):
    ids = []
    for i in range(3):
        r = client.post("/v1/jobs", json={"model": "slow-lane", "prompt": f"fill {i}"})
        if r.status_code == 202:
            ids.append(r.json()["id"])
    r = client.post("/v1/jobs", json={"model": "slow-lane", "prompt": "one too many"})
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
    for j in ids:
        client.post(f"/v1/jobs/{j}/cancel")
    assert client.post("/v1/jobs", json={"model": "slow-lane", "prompt": "room again"}).status_code == 202


BAD = [
    ({"model": "nope", "prompt": "x"}, 400, "model"),
    ({"model": "demo-image", "prompt": "x", "width": 96, "height": 96}, 400, "size"),
    ({"model": "demo-image", "prompt": "x", "width": 60, "height": 64}, 400, "width"),
    ({"model": "demo-video", "prompt": "x", "width": 256, "height": 256}, 400, "size"),
    ({"model": "demo-image", "prompt": "x", "steps": 0}, 400, "steps"),
    ({"model": "demo-image", "prompt": "x", "steps": 401}, 400, "steps"),
    ({"model": "demo-image", "prompt": "x", "num_frames": 9}, 400, "num_frames"),
    ({"model": "demo-image", "prompt": ""}, 400, "prompt"),
    ({"model": "demo-image", "prompt": "x" * 2001}, 400, "prompt"),
    ({"model": "demo-image"}, 400, "prompt"),
    ({"model": "demo-image", "prompt": "x", "steps": "many"}, 400, "steps"),
    ({"model": "demo-image", "prompt": "x", "priority": "urgent"}, 400, "priority"),
    ({"model": "demo-image", "prompt": "x", "colour": "red"}, 400, "colour"),
    ({"model": "demo-video", "prompt": "x", "num_frames": 10}, 400, "num_frames"),
]


@pytest.mark.parametrize("body, status, field", BAD)
def test_bad_input_gets_4xx_naming_the_field(client, body, status, field):
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and field in err["message"]


def test_malformed_json_unknown_job_and_images_n(client, server):
    r = client.post("/v1/jobs", content=b'{"model": "demo-image", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "body"
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/events", "/v1/jobs/nope/result"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["field"] == "id"
    assert client.post("/v1/jobs/nope/cancel").status_code == 404
    for n in (0, 11):
        r = client.post("/v1/images/generations", json={"model": "demo-image", "prompt": "x", "n": n})
        assert r.status_code == 400 and r.json()["error"]["field"] == "n"
    r = client.post("/v1/images/generations", json={"model": "demo-image", "prompt": "x", "size": "big"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "size"
    # None of it hurt the server or its worker.
    workers = client.get("/v1/workers").json()["data"]
    assert workers[0]["restarts"] == 0
    assert wait_for(client, submit(client)["id"])["status"] == "succeeded"


def test_official_openai_client_gets_images(server, client):
    from openai import OpenAI

    oa = OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert {"demo-image", "demo-video"} <= {m.id for m in oa.models.list()}
    res = oa.images.generate(model="demo-image", prompt="a teapot", n=3, size="128x64", response_format="b64_json")
    imgs = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in res.data]
    assert len(imgs) == 3 and all(i.size == (128, 64) for i in imgs)
    res = oa.images.generate(model="demo-image", prompt="a teapot", n=2, size="64x64")
    ids = [d.url.rsplit("/", 2)[-2] for d in res.data]
    jobs = [client.get(f"/v1/jobs/{j}").json() for j in ids]
    assert len({j["batch"]["id"] for j in jobs}) == 1  # the n images are one batch
    png = httpx.get(res.data[0].url).content
    assert Image.open(io.BytesIO(png)).size == (64, 64)
