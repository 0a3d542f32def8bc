"""Image inputs at submit (issue 14): the forms (data URL, multipart file, job reference), the
checks (a 4xx naming the field), storage with the job, the batch key, and the OpenAI edits route's
refusals. Through the real app over a runtime on the fake pool; the models' families come from
config files alone (a Stable Diffusion and a Wan image-to-video layout, no weights)."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import tomllib

import httpx
import pytest
from PIL import Image

from genserve.backends.image_input import MAX_PIXELS, check_input
from genserve.config.load import parse_config
from genserve.server.http.app import create_app
from genserve.server.jobs.inputs import read_inputs
from genserve.server.requests import RequestError
from genserve.server.runtime.runtime import Runtime
from genserve.server.security.keys import Principal
from genserve.storage import LocalResultStore
from genserve.workers.fake import FakePool


def _layout(path, index: dict, components: dict) -> str:
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps(index))
    for name, cfg in components.items():
        (path / name).mkdir()
        (path / name / "config.json").write_text(json.dumps(cfg))
    return str(path)


def config(tmp_path, extra: str = ""):
    sd = _layout(tmp_path / "sd", {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]},
                 {"vae": {"block_out_channels": [16, 32]}})
    i2v = _layout(tmp_path / "i2v", {"_class_name": "WanImageToVideoPipeline", "vae": ["d", "AutoencoderKLWan"],
                                     "transformer": ["d", "WanTransformer3DModel"]},
                  {"vae": {}, "transformer": {"patch_size": [1, 2, 2]}})
    return parse_config(tomllib.loads(f"""
[server]
data_dir = "{tmp_path}/data"
[models.img]
kind = "image"
source = "{sd}"
default_size = "64x64"
default_steps = 4
[models.vid]
kind = "video"
source = "{i2v}"
default_size = "32x32"
default_frames = 5
max_frames = 9
frame_stride = 4
size_multiple = 16
{extra}
"""))


def with_app(tmp_path, test, extra: str = ""):
    cfg = config(tmp_path, extra)

    async def go():
        rt = Runtime(cfg, devices=["cpu"], pool=FakePool)
        app = create_app(cfg, rt)
        await rt.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await test(c, rt)
        finally:
            await rt.close()

    return asyncio.run(go())


def png(size=(48, 40), color=(200, 30, 30), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def field_of(r: httpx.Response) -> str:
    return r.json()["error"]["field"]


def test_json_and_multipart_inputs_are_stored_with_the_job(tmp_path):
    async def t(c, rt):
        r = await c.post("/v1/jobs", json={"model": "img", "prompt": "x", "image": url(png()), "seed": 1})
        assert r.status_code == 202, r.text
        job = r.json()
        p = job["params"]
        assert (p["task"], p["strength"]) == ("img2img", 0.8) and p["image"].startswith("sha256:")
        stored = rt.store.get(job["id"])["params"]
        assert stored["image"] == f"{job['id']}/input-image.png"  # a key, not the bytes
        assert rt.results.read(stored["image"]) == check_input(png()).png
        form = {"model": "img", "prompt": "x", "seed": "1", "strength": "0.5"}
        files = {"image": ("a.bin", png(), "application/octet-stream"),
                 "mask": ("m.png", png(color=255, mode="L"), "image/png")}
        r = await c.post("/v1/jobs", data=form, files=files)
        assert r.status_code == 202, r.text
        p2 = r.json()["params"]
        assert (p2["task"], p2["strength"], p2["image"]) == ("inpaint", 0.5, p["image"])  # same digest
        assert rt.results.exists(f"{r.json()['id']}/input-mask.png")
        # the task and strength split batches; a text job is in neither
        keys = {rt.store.get(i)["params"]["variant"] for i in (job["id"], r.json()["id"])}
        assert keys == {"img2img:s0.8", "inpaint:s0.5"}
        r = await c.post("/v1/jobs", json={"model": "img", "prompt": "x", "image": url(png(fmt="WEBP"), "image/webp")})
        assert r.status_code == 202, r.text
        # deleting a finished job deletes its stored inputs too
        jid = r.json()["id"]
        await c.post(f"/v1/jobs/{jid}/cancel")
        assert (await c.delete(f"/v1/jobs/{jid}")).status_code == 204
        assert not rt.results.exists(f"{jid}/input-image.png")

    with_app(tmp_path, t)


BOMB = png((MAX_PIXELS // 4000 + 1, 4001), 0, mode="1")  # a few KB; too many pixels when decoded


@pytest.mark.parametrize("body,field,status", [
    ({"image": url(b"not an image at all")}, "image", 400),
    ({"image": "https://example.com/a.png"}, "image", 400),
    ({"image": url(png(fmt="JPEG"))}, "image", 400),  # says PNG, holds JPEG
    ({"image": url(BOMB)}, "image", 400),
    ({"image": url(png((4, 40)))}, "image", 400),
    ({"image": url(png()), "mask": url(png((40, 40), 255, "L"))}, "mask", 400),  # not the image's size
    ({"mask": url(png(color=255, mode="L"))}, "mask", 400),
    ({"strength": 0.5}, "strength", 400),
    ({"image": url(png()), "strength": 0.0}, "strength", 400),
    ({"image": url(png()), "strength": 1.5}, "strength", 400),
    ({"image": url(png()), "strength": 0.1, "steps": 4}, "strength", 400),  # 0 steps left
    ({"image": {"job": "0123456789abcdef", "index": 0}}, "image", 404),
    ({"image": {"job": "x", "index": -1}}, "image", 400),
    ({"image": {"job": "x", "extra": 1}}, "image", 400),
    ({"image": 5}, "image", 400),
    ({"model": "nope", "image": {"job": "0123456789abcdef"}}, "model", 400),  # the model first
])
def test_bad_inputs_are_refused_naming_the_field(tmp_path, body, field, status):
    async def t(c, rt):
        r = await c.post("/v1/jobs", json={"model": "img", "prompt": "x", **body})
        assert r.status_code == status and field_of(r) == field, r.text

    with_app(tmp_path, t, "[http]\nmax_body_bytes = 4194304")


STRIP = png((2_097_152, 8), 0, mode="1")  # within MAX_PIXELS, a few KB; 2M x 128 pixels when fitted to 64 x 64


def test_a_thin_strip_is_refused_at_submit_and_never_reaches_a_worker(tmp_path):
    """Issue 22, item 1: a worker once grew to 1.7 GB cover-fitting a 1,110-byte 131072 x 8 PNG."""
    assert len(STRIP) < 20_000

    async def t(c, rt):
        for body, field in (({"image": url(STRIP)}, "image"),
                            ({"image": url(png((48, 8))), "mask": url(STRIP)}, "mask"),
                            ({"image": url(png((4096, 8)))}, "image")):
            r = await c.post("/v1/jobs", json={"model": "img", "prompt": "x", **body})
            assert r.status_code == 400 and field_of(r) == field, r.text
            assert "aspect ratio" in r.text or "at most 4096" in r.text
        r = await c.post("/v1/jobs", data={"model": "img", "prompt": "x"}, files={"image": ("s.png", STRIP)})
        assert r.status_code == 400 and field_of(r) == "image", r.text
        r = await c.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("s.png", STRIP)})
        assert r.status_code == 400 and field_of(r) == "image", r.text
        r = await c.post("/v1/images/edits", data={"prompt": "x"},
                         files={"image": ("a.png", png()), "mask": ("m.png", STRIP)})
        assert r.status_code == 400 and field_of(r) == "mask", r.text
        assert rt.store.recent(10) == [] and rt.pool.take("run") == []  # nothing stored, nothing run

    with_app(tmp_path, t)


def test_video_models_take_a_frame_and_no_mask_or_strength(tmp_path):
    async def t(c, rt):
        for body, field in (({}, "image"), ({"image": url(png()), "mask": url(png(color=255, mode="L"))}, "mask"),
                            ({"image": url(png()), "strength": 0.5}, "strength")):
            r = await c.post("/v1/jobs", json={"model": "vid", "prompt": "x", **body})
            assert r.status_code == 400 and field_of(r) == field, r.text
        r = await c.post("/v1/jobs", json={"model": "vid", "prompt": "x", "image": url(png())})
        assert r.status_code == 202 and r.json()["params"]["task"] == "i2v", r.text

    with_app(tmp_path, t)


@pytest.mark.parametrize("form,files,field", [
    ({"width": "64px"}, {}, "width"),
    ({"steps": "2.0"}, {}, "steps"),
    ({"guidance": "nan"}, {}, "guidance"),
    ({"strength": "lots"}, {"image": ("a.png", png(), "image/png")}, "strength"),
    ({}, {"image": ("a.txt", b"hello", "text/plain")}, "image"),
    ({"prompt": "twice"}, {}, "prompt"),
    ({"bogus": "1"}, {}, "bogus"),
    ({}, {"width": ("w", b"64", "text/plain")}, "width"),
])
def test_multipart_fields_are_parsed_strictly(tmp_path, form, files, field):
    async def t(c, rt):
        parts = [(k, (None, v.encode())) for k, v in (("model", "img"), ("prompt", "x"), *form.items())]
        r = await c.post("/v1/jobs", files=parts + list(files.items()))
        assert r.status_code == 400 and field_of(r) == field, r.text

    with_app(tmp_path, t)


def test_uploads_have_their_own_body_limit(tmp_path):
    big = png((1200, 1200), (1, 2, 3))
    big += b"\0" * (2_000_000 - len(big))  # 2 MB: over max_body_bytes, under max_upload_bytes

    async def t(c, rt):
        r = await c.post("/v1/jobs", json={"model": "img", "prompt": "x", "image": url(big)})
        assert r.status_code == 413 and "max_body_bytes" in r.text
        r = await c.post("/v1/jobs", data={"model": "img", "prompt": "x"}, files={"image": ("a.png", big)})
        assert r.status_code == 202, r.text
        r = await c.post("/v1/jobs", data={"model": "img", "prompt": "x"},
                         files={"image": ("a.png", big + b"\0" * 3_000_000)})
        assert r.status_code == 413 and "max_upload_bytes" in r.text

    with_app(tmp_path, t, "[http]\nmax_upload_bytes = 4194304")


def test_edits_refusals(tmp_path):
    async def t(c, rt):
        r = await c.post("/v1/images/edits", json={"prompt": "x"})
        assert r.status_code == 415
        r = await c.post("/v1/images/edits", data={"prompt": "x"}, files={"mask": ("m.png", png(mode="RGBA"))})
        assert r.status_code == 400 and field_of(r) == "image"
        r = await c.post("/v1/images/edits", data={"prompt": "x"},
                         files={"image": ("a.png", png()), "mask": ("m.png", png(mode="RGB"))})
        assert r.status_code == 400 and field_of(r) == "mask" and "alpha" in r.text
        r = await c.post("/v1/images/edits", data={"prompt": "x", "model": "vid"}, files={"image": ("a.png", png())})
        assert r.status_code == 400 and field_of(r) == "model"
        r = await c.post("/v1/images/edits", data={"prompt": "x", "n": "11"}, files={"image": ("a.png", png())})
        assert r.status_code == 400 and field_of(r) == "n"

    with_app(tmp_path, t)


# ---- job references (the store and the job records, without the app) --------------------------------

class Jobs(dict):
    def get(self, job_id):  # the JobReader's get
        return super().get(job_id)


def test_job_references_resolve_for_the_same_tenant_only(tmp_path):
    store = LocalResultStore(tmp_path)
    ref = store.put("a1", "output.png", png(), "image/png").to_dict()
    jobs = Jobs(a1={"id": "a1", "tenant": "acme", "status": "succeeded", "results": [ref]},
                r1={"id": "r1", "tenant": "acme", "status": "running", "results": []},
                g1={"id": "g1", "tenant": "acme", "status": "succeeded", "results": [ref], "t_results_deleted": 5.0})
    acme, other = Principal("acme", "user"), Principal("globex", "user")

    def read(value, who):
        return asyncio.run(read_inputs({"image": value}, jobs, store, who))

    got = read({"job": "a1", "index": 0}, acme)["image"]
    assert got.png == check_input(png()).png
    errors = {}
    for name, value, who in (("other tenant", {"job": "a1"}, other), ("unknown", {"job": "zz"}, acme),
                             ("running", {"job": "r1"}, acme), ("index", {"job": "a1", "index": 1}, acme),
                             ("deleted", {"job": "g1"}, acme)):
        with pytest.raises(RequestError) as e:
            read(value, who)
        assert e.value.field == "image"
        errors[name] = (e.value.status, e.value.message.replace("'a1'", "'zz'"))
    assert errors["other tenant"] == errors["unknown"] == (404, "refers to no job 'zz'")  # nothing disclosed
    assert errors["running"][0] == 409 and errors["index"][0] == 404 and errors["deleted"][0] == 410


def test_a_video_output_gives_its_first_frame(tmp_path):
    import numpy as np

    from genserve.backends.encode import encode_mp4

    frames = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    frames[0] = 255
    store = LocalResultStore(tmp_path)
    ref = store.put("v1", "output.mp4", encode_mp4(frames, 8), "video/mp4").to_dict()
    jobs = Jobs(v1={"id": "v1", "tenant": "t", "status": "succeeded", "results": [ref]})
    got = asyncio.run(read_inputs({"mask": {"job": "v1"}}, jobs, store, Principal("t", "user")))["mask"]
    assert got.size == (32, 32)
    assert np.asarray(Image.open(io.BytesIO(got.png))).min() > 200  # the white first frame, not the black rest


@pytest.mark.parametrize("field,raw", [("prompt", b"\xed\xa0\x80"), ("prompt", b"ok \xff ok"),
                                       ("negative_prompt", b"caf\xe9")])
def test_multipart_text_that_is_not_utf8_is_400_not_mojibake(tmp_path, field, raw):
    """A lone surrogate's bytes (CESU-8) or latin-1 in a form field: refused like a lone surrogate
    in JSON, before anything is stored (Starlette alone would read them as latin-1)."""
    async def t(c, rt):
        parts = [("model", (None, b"img")), ("prompt", (None, b"x")) if field != "prompt" else (field, (None, raw))]
        if field != "prompt":
            parts.append((field, (None, raw)))
        r = await c.post("/v1/jobs", files=parts)
        assert r.status_code == 400 and field_of(r) == field, r.text
        assert rt.store.recent(10) == []
        r = await c.post("/v1/jobs", files=[("model", (None, b"img")), ("prompt", (None, "café 猫".encode()))])
        assert r.status_code == 202 and r.json()["params"]["prompt"] == "café 猫", r.text

    with_app(tmp_path, t)
