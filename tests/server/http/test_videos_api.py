"""The OpenAI Videos API (server/http/openai/videos.py) and job listing pages, in process: the real app
over a runtime on the fake pool, the test playing the worker (it writes a real MP4). The official
``openai`` client is used where the shape matters (it parses every response into its types)."""
from __future__ import annotations

import asyncio
import base64
import io
import tomllib

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from genserve.backends.encode import encode_mp4
from genserve.config.load import parse_config
from genserve.server.http.app import create_app
from genserve.server.http.openai.videos import frames_for, seconds_of
from genserve.server.requests import RequestError
from genserve.server.runtime.runtime import Runtime
from genserve.server.security.keys import KeyStore
from genserve.storage import LocalResultStore
from genserve.workers.fake import FakePool

from ..runtime.test_runtime import MB, Clock

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the client's deprecation


def video_model(name: str, source) -> str:
    """A video model's table (8 fps, stride 4, at most 17 frames) over ``source``."""
    return f"""[models.{name}]
kind = "video"
source = "{source}"
max_batch_size = 1
max_wait_ms = 0
max_pixels = 16384
size_multiple = 16
default_size = "64x64"
default_steps = 2
default_frames = 9
max_frames = 17
frame_stride = 4
fps = 8"""


def cfg(tmp_path, extra: str = ""):
    return parse_config(tomllib.loads(f"""
[server]
data_dir = "{tmp_path}"
[retention]
results_days = 2
{video_model("vid", f"{tmp_path}/no-weights-needed")}
[models.img]
kind = "image"
source = "{tmp_path}/no-weights-needed-2"
max_batch_size = 1
max_wait_ms = 600000
default_size = "64x64"
default_steps = 2
{extra}"""))


class VideoWorld:
    """The app over a runtime on the fake pool with one ready worker; ``finish`` plays it."""

    def __init__(self, tmp_path, extra: str = "") -> None:
        self.clock = Clock()
        self.cfg = cfg(tmp_path, extra)
        self.rt = Runtime(self.cfg, devices=["cpu"], clock=self.clock, pool=FakePool)
        self.pool: FakePool = self.rt.pool  # type: ignore[assignment]
        self.app = create_app(self.cfg, self.rt)
        self.loaded: set[str] = set()

    async def __aenter__(self) -> "VideoWorld":
        await self.rt.start()
        self.pool.ready("w0", 1024 * MB)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.rt.close()

    def http(self, key: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t",
                                 headers={"Authorization": f"Bearer {key}"} if key else {})

    def client(self, key: str = "none") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url="http://t/v1", api_key=key, max_retries=0,
                                  http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app)))

    def finish(self, *, thumbnail: bool = True) -> list[str]:
        """Run what the runtime dispatched, as a worker would: a real MP4 (and a thumbnail) per job."""
        done = []
        for w, msg in self.pool.take("load"):
            self.pool.say(w, "loaded", model=msg["model"], cached=False, load_start=self.clock.t,
                          load_end=self.clock.t, bytes=MB, tier="disk")
        for w, msg in self.pool.take("run"):
            self.pool.say(w, "started", batch_id=msg["batch_id"], t=self.clock.t)
            self.clock.t += 1
            p = msg["params"]
            for j in msg["jobs"]:
                frames = np.full((p["num_frames"], p["height"], p["width"], 3), 40, dtype=np.uint8)
                store = LocalResultStore(self.rt.results.root)
                ref = store.put(j["id"], "output.mp4", encode_mp4(frames, p["fps"]), "video/mp4").to_dict()
                if thumbnail:
                    buf = io.BytesIO()
                    Image.new("RGB", (p["width"], p["height"]), (40, 40, 40)).save(buf, "JPEG")
                    ref["thumbnail"] = store.put(j["id"], "thumbnail.jpg", buf.getvalue(), "image/jpeg").to_dict()
                self.pool.say(w, "job_done", batch_id=msg["batch_id"], job_id=j["id"], result=ref,
                              inference_start=self.clock.t, inference_end=self.clock.t, output_written=self.clock.t)
                done.append(j["id"])
            self.pool.say(w, "batch_done", batch_id=msg["batch_id"], t=self.clock.t)
        return done


def run(tmp_path, test, extra: str = ""):
    async def go():
        async with VideoWorld(tmp_path, extra) as w:
            return await test(w)
    return asyncio.run(go())


# ---- seconds -> frames ------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds,frames", [(1, 9), (2, 17), (0.1, 1), (0.5, 5), (1.2, 9), (1.3, 9), (1.5, 13),
                                            (1.375, 13), (2.2, 17)])
def test_seconds_become_frames_rounded_to_the_stride(tmp_path, seconds, frames):
    m = cfg(tmp_path).models["vid"]  # 8 fps, stride 4, at most 17 frames
    assert frames_for(seconds, m) == frames and (frames - 1) % 4 == 0


@pytest.mark.parametrize("seconds", [2.5, 100, 1e308, 0, -1, float("nan"), float("inf")])
def test_seconds_out_of_range_are_refused_naming_seconds(tmp_path, seconds):
    with pytest.raises(RequestError) as e:
        frames_for(seconds, cfg(tmp_path).models["vid"])
    assert e.value.field == "seconds"


def test_seconds_are_reported_as_the_clip_length():
    assert seconds_of(9, 8) == "1.125" and seconds_of(16, 4) == "4" and seconds_of(1, 8) == "0.125"


# ---- the Videos API ---------------------------------------------------------------------------------

def test_create_poll_download_list_delete_with_the_official_client(tmp_path):
    async def test(w: VideoWorld):
        client = w.client()
        v = await client.videos.create(prompt="waves", seconds="2", size="64x48",
                                       extra_body={"seed": 3, "steps": 2})
        # dispatched at once (a worker is free): running, though no step has been reported yet
        assert (v.object, v.status, v.progress, v.model) == ("video", "in_progress", 0, "vid")
        assert (v.seconds, v.size, v.prompt, v.error, v.completed_at) == ("2.125", "64x48", "waves", None, None)
        job = w.rt.store.get(v.id)
        assert job["params"]["num_frames"] == 17 and job["params"]["seed"] == 3 and job["params"]["steps"] == 2
        assert w.finish() == [v.id]
        v = await client.videos.retrieve(v.id)
        assert (v.status, v.progress) == ("completed", 100) and v.completed_at == v.created_at + 1
        assert v.expires_at == v.completed_at + 2 * 86400  # [retention] results_days
        content = await client.videos.download_content(v.id)
        data = content.read()
        assert data[4:8] == b"ftyp"
        import av
        with av.open(io.BytesIO(data)) as c:
            frames = list(c.decode(video=0))
        assert len(frames) == 17 and (frames[0].width, frames[0].height) == (64, 48)
        thumb = (await client.videos.download_content(v.id, variant="thumbnail")).read()
        assert Image.open(io.BytesIO(thumb)).size == (64, 48)
        page = await client.videos.list()
        assert [x.id for x in page.data] == [v.id] and page.has_more is False
        deleted = await client.videos.delete(v.id)
        assert (deleted.id, deleted.deleted, deleted.object) == (v.id, True, "video.deleted")
        with pytest.raises(openai.NotFoundError):
            await client.videos.retrieve(v.id)
        assert w.rt.store.get(v.id) is None
    run(tmp_path, test)



def test_defaults_and_input_reference_upload(tmp_path):
    src = tmp_path / "i2v"
    src.mkdir()
    (src / "model_index.json").write_text('{"_class_name": "WanImageToVideoPipeline"}')

    async def test(w: VideoWorld):
        client = w.client()
        v = await client.videos.create(prompt="default")
        assert (v.model, v.size, v.seconds) == ("vid", "64x64", "1.125")  # the first video model's defaults
        png = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(png, "PNG")
        v = await client.videos.create(prompt="from an image", model="i2v",
                                       input_reference=("frame.png", png.getvalue(), "application/octet-stream"))
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        uploaded = w.rt.store.get(v.id)["params"]["image_sha256"]
        async with w.http() as c:
            # the reference object in a form, spelled as the client's form encoder spells objects
            r = await c.post("/v1/videos", files={"prompt": (None, b"x"), "model": (None, b"i2v"),
                                                  "input_reference[image_url]": (None, url)})
            assert r.status_code == 200 and w.rt.store.get(r.json()["id"])["params"]["image_sha256"] == uploaded
            # and as JSON
            r = await c.post("/v1/videos", json={"prompt": "x", "model": "i2v", "input_reference": {"image_url": url},
                                                 "seconds": 1})
            assert r.status_code == 200 and r.json()["seconds"] == "1.125", r.text
            assert w.rt.store.get(r.json()["id"])["params"]["image_sha256"] == uploaded
            view = (await c.get(f"/v1/jobs/{v.id}")).json()  # the native view shows the frame by digest
            assert view["params"]["image"].startswith("sha256:")
    # an image-to-video model: its family is read from the directory's model_index.json (no weights needed)
    run(tmp_path, test, video_model("i2v", src))


@pytest.mark.parametrize("body,field,status", [
    ({"prompt": "x", "model": "img"}, "model", 400),
    ({"prompt": "x", "model": "nope"}, "model", 400),
    ({"prompt": "x", "seconds": "3"}, "seconds", 400),
    ({"prompt": "x", "seconds": "soon"}, "seconds", 400),
    ({"prompt": "x", "seconds": 0}, "seconds", 400),
    ({"prompt": "x", "seconds": 10 ** 400}, "seconds", 400),
    ({"prompt": "x", "seconds": "1e999"}, "seconds", 400),
    ({"prompt": "x", "input_reference": "https://example.com/a.png"}, "input_reference", 400),
    ({"prompt": "x", "size": "big"}, "size", 400),
    ({"prompt": "x", "size": "72x64"}, "size", 400),
    ({"prompt": "x", "size": "512x512"}, "size", 400),
    ({"prompt": ""}, "prompt", 400),
    ({"model": "vid"}, "prompt", 400),
    ({"prompt": "x", "input_reference": {"image_url": "https://example.com/a.png"}}, "input_reference", 400),
    ({"prompt": "x", "input_reference": {"file_id": "file_1"}}, "input_reference", 400),
    ({"prompt": "x", "input_reference": {"image_url": "data:image/png;base64,AAAA"}}, "input_reference", 400),
    ({"prompt": "x", "quality": "high"}, "quality", 400),
    ({"prompt": "x", "seed": "5"}, "seed", 400),
    ({"prompt": "x", "steps": 1000}, "steps", 400),
    ('{"prompt": "\\ud800 lone"}', "prompt", 400),  # JSON can spell a lone surrogate
])
def test_bad_creates_are_4xx_naming_the_field(tmp_path, body, field, status):
    async def test(w: VideoWorld):
        async with w.http() as c:
            r = await (c.post("/v1/videos", content=body, headers={"content-type": "application/json"})
                       if isinstance(body, str) else c.post("/v1/videos", json=body))
            assert r.status_code == status and r.json()["error"]["param"] == field, r.text
            assert w.rt.store.recent(10) == []
    run(tmp_path, test)


def test_bad_form_fields_and_bodies(tmp_path):
    async def test(w: VideoWorld):
        async with w.http() as c:
            r = await c.post("/v1/videos", data={"prompt": "x", "seed": "five"}, files={"unused": ("a", b"")})
            assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
            r = await c.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", b"not an image")})
            assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference"
            r = await c.post("/v1/videos", content=b"prompt=x", headers={"content-type": "text/plain"})
            assert r.status_code == 415
            r = await c.post("/v1/videos", content=b"--zz\r\nbroken",
                             headers={"content-type": "multipart/form-data; boundary=zz"})
            assert r.status_code == 400
            r = await c.post("/v1/videos", content=b"[1]", headers={"content-type": "application/json"})
            assert r.status_code == 400
            assert w.rt.store.recent(10) == []
    run(tmp_path, test)


def test_status_progress_failure_content_and_delete_before_done(tmp_path):
    async def test(w: VideoWorld):
        async with w.http() as c:
            vid = (await c.post("/v1/videos", json={"prompt": "x"})).json()["id"]
            other = (await c.post("/v1/videos", json={"prompt": "y"})).json()  # waits: one worker, batches of 1
            assert (other["status"], other["progress"]) == ("queued", 0)
            await c.post(f"/v1/jobs/{other['id']}/cancel")  # canceled -> failed, with an error saying so
            v = (await c.get(f"/v1/videos/{other['id']}")).json()
            assert v["status"] == "failed" and v["error"]["code"] == "canceled" and v["completed_at"] is not None
            assert (await c.delete(f"/v1/videos/{other['id']}")).json()["deleted"] is True
            for _, msg in w.pool.take("load"):
                w.pool.say("w0", "loaded", model=msg["model"], cached=False, load_start=0, load_end=0, bytes=MB,
                           tier="disk")
            [(_, run_msg)] = w.pool.take("run")
            w.pool.say("w0", "started", batch_id=run_msg["batch_id"], t=w.clock.t)
            w.pool.say("w0", "progress", batch_id=run_msg["batch_id"], step=1, total=2)
            v = (await c.get(f"/v1/videos/{vid}")).json()
            assert (v["status"], v["progress"]) == ("in_progress", 50)
            r = await c.get(f"/v1/videos/{vid}/content")
            assert r.status_code == 409
            r = await c.delete(f"/v1/videos/{vid}")
            assert r.status_code == 409 and r.json()["error"]["param"] == "id"
            w.pool.say("w0", "batch_failed", batch_id=run_msg["batch_id"], code="internal",
                       message="the pipeline raised")  # not retryable: the job fails
            v = (await c.get(f"/v1/videos/{vid}")).json()
            assert v["status"] == "failed" and v["progress"] == 0 and v["completed_at"] is not None
            assert v["error"]["code"] == "internal" and v["error"]["message"].startswith("the pipeline raised")
            assert (await c.get(f"/v1/videos/{vid}/content")).status_code == 409
            assert (await c.delete(f"/v1/videos/{vid}")).json()["deleted"] is True
    run(tmp_path, test)


def test_content_variants(tmp_path):
    async def test(w: VideoWorld):
        async with w.http() as c:
            vid = (await c.post("/v1/videos", json={"prompt": "x"})).json()["id"]
            w.finish(thumbnail=False)
            r = await c.get(f"/v1/videos/{vid}/content?variant=thumbnail")
            assert r.status_code == 404 and r.json()["error"]["param"] == "variant"
            assert (await c.get(f"/v1/videos/{vid}/content?variant=spritesheet")).status_code == 404
            assert (await c.get(f"/v1/videos/{vid}/content?variant=poster")).status_code == 400
            r = await c.get(f"/v1/videos/{vid}/content")
            assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and r.content[4:8] == b"ftyp"
    run(tmp_path, test)


def test_image_jobs_are_not_videos_and_tenants_are_isolated(tmp_path):
    async def test(w: VideoWorld):
        store = KeyStore(tmp_path)
        _, acme = store.create("acme")
        _, other = store.create("other")
        _, admin = store.create("ops", "admin")
        store.close()
        async with w.http(acme) as a, w.http(other) as b:
            img = (await a.post("/v1/jobs", json={"model": "img", "prompt": "x"})).json()["id"]
            assert (await a.get(f"/v1/videos/{img}")).status_code == 404
            vid = (await a.post("/v1/videos", json={"prompt": "x"})).json()["id"]
            assert [v["id"] for v in (await a.get("/v1/videos")).json()["data"]] == [vid]  # not the image job
            for r in (await b.get(f"/v1/videos/{vid}"), await b.get(f"/v1/videos/{vid}/content"),
                      await b.delete(f"/v1/videos/{vid}")):
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            assert (await b.get("/v1/videos")).json()["data"] == []
            r = await b.get(f"/v1/videos?after={vid}")
            assert r.status_code == 400 and r.json()["error"]["param"] == "after"
            async with w.http(admin) as ad:  # an admin lists its own tenant's videos; reads any by id
                assert (await ad.get("/v1/videos")).json()["data"] == []
                assert (await ad.get(f"/v1/videos/{vid}")).status_code == 200
    run(tmp_path, test)
