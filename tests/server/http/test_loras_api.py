"""The LoRA registry over HTTP (server/http/loras_api.py, server/jobs/loras.py), in process: the app
over a runtime on the fake pool, the base model a real (tiny) diffusers directory, so uploads are
checked against its denoiser. Adapters are built with PEFT (tests/lora_adapters.py)."""
from __future__ import annotations

import asyncio
import tomllib

import httpx
import pytest

from genserve.backends.demo import ensure_demo_model
from genserve.config.load import parse_config
from genserve.server.http.app import create_app
from genserve.server.runtime.runtime import Runtime
from genserve.server.security.keys import KeyStore
from genserve.workers.fake import FakePool
from tests.lora_adapters import adapter_tensors, save_adapter

from ..runtime.test_runtime import MB, Clock


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return ensure_demo_model("image", tmp_path_factory.mktemp("models") / "demo-image")


@pytest.fixture(scope="module")
def ink(demo_dir, tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("a") / "ink.safetensors", demo_dir, rank=4, seed=1).read_bytes()


def config(tmp_path, demo_dir, extra: str = ""):
    return parse_config(tomllib.loads(f"""
[server]
data_dir = "{tmp_path}"
max_lora_bytes = 200000
[models.img]
kind = "image"
source = "{demo_dir}"
max_batch_size = 8
default_size = "64x64"
default_steps = 2
[models.other]
kind = "image"
source = "{tmp_path}/no-weights"
{extra}"""))


class World:
    def __init__(self, cfg) -> None:
        self.rt = Runtime(cfg, devices=["cpu"], clock=Clock(), pool=FakePool)
        self.app = create_app(cfg, self.rt)

    def http(self, key: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t",
                                 headers={"Authorization": f"Bearer {key}"} if key else {})


def run(cfg, test):
    async def go():
        w = World(cfg)
        await w.rt.start()
        w.rt.pool.ready("w0", 1024 * MB)
        try:
            return await test(w)
        finally:
            await w.rt.close()
    return asyncio.run(go())


def upload(c: httpx.AsyncClient, name: str, data: bytes, model: str = "img", filename: str = "a.safetensors"):
    return c.post("/v1/loras", data={"name": name, "model": model}, files={"file": (filename, data)})


def test_upload_list_get_delete(tmp_path, demo_dir, ink):
    async def test(w: World):
        async with w.http() as c:
            r = await upload(c, "ink", ink)
            assert r.status_code == 201, r.text
            body = r.json()
            assert {k: body[k] for k in ("name", "model", "bytes", "rank", "targets", "owner")} == {
                "name": "ink", "model": "img", "bytes": body["bytes"], "rank": 4,
                "targets": ["to_k", "to_out.0", "to_q", "to_v"], "owner": None}  # auth off: an admin, shared
            assert 0 < body["bytes"] <= len(ink) and body["layers"] == 32
            assert w.rt.results.exists(f"loras/{body['id']}.safetensors")
            assert (await upload(c, "ink", ink)).status_code == 409
            assert [x["name"] for x in (await c.get("/v1/loras")).json()["data"]] == ["ink"]
            assert (await c.get("/v1/loras/ink")).json()["id"] == body["id"]
            assert (await c.delete("/v1/loras/ink")).status_code == 204
            assert (await c.get("/v1/loras/ink")).status_code == 404
            assert not w.rt.results.exists(f"loras/{body['id']}.safetensors")
    run(config(tmp_path, demo_dir), test)


def test_bad_uploads_name_the_field_and_module(tmp_path, demo_dir, ink):
    import io

    import torch
    from safetensors.torch import save

    wrong = adapter_tensors(demo_dir, rank=4)
    k = next(k for k in wrong if "attn2.to_k.lora_A" in k)
    wrong[k] = torch.ones(4, 64)  # the cross-attention's to_k takes 32 inputs
    async def test(w: World):
        async with w.http() as c:
            r = await upload(c, "w", save(wrong))
            err = r.json()["error"]
            assert r.status_code == 400 and err["field"] == "file" and k.rsplit(".lora_A", 1)[0] in err["message"]
            r = await upload(c, "p", b"\x80\x04\x95pickle-bytes....", filename="a.safetensors")
            assert r.status_code == 400 and "not a safetensors file" in r.json()["error"]["message"]
            r = await upload(c, "p", ink, filename="a.bin")
            assert r.status_code == 400 and r.json()["error"]["field"] == "file"
            r = await upload(c, "big", ink + b"\0" * 200000)
            assert r.status_code == 413 and r.json()["error"]["field"] == "file"
            r = await upload(c, "x", ink, model="nope")
            assert r.status_code == 400 and r.json()["error"]["field"] == "model"
            r = await upload(c, "bad name!", ink)
            assert r.status_code == 400 and r.json()["error"]["field"] == "name"
            r = await c.post("/v1/loras", data={"name": "x", "model": "img"}, files={"other": ("a", io.BytesIO(b""))})
            assert r.status_code == 400 and r.json()["error"]["field"] == "file"
    run(config(tmp_path, demo_dir), test)


def test_kohya_layout_and_json_source(tmp_path, demo_dir):
    kohya = save_adapter(tmp_path / "k" / "pytorch_lora_weights.safetensors", demo_dir, layout="kohya", rank=8)
    async def test(w: World):
        async with w.http() as c:
            r = await upload(c, "k", kohya.read_bytes())
            assert r.status_code == 201 and r.json()["layout"] == "kohya" and r.json()["rank"] == 8
            r = await c.post("/v1/loras", json={"name": "k2", "model": "img", "source": str(kohya.parent)})
            assert r.status_code == 201 and r.json()["source"] == str(kohya.parent)
            r = await c.post("/v1/loras", json={"name": "k3", "model": "img", "source": str(tmp_path / "x.pt")})
            assert r.status_code == 400 and r.json()["error"]["field"] == "source"
    run(config(tmp_path, demo_dir), test)


def test_config_loras_are_shared_and_tenants_are_isolated(tmp_path, demo_dir, ink):
    src = tmp_path / "cfg.safetensors"
    src.write_bytes(ink)
    async def test(w: World):
        store = KeyStore(tmp_path)
        _, acme = store.create("acme")
        _, other = store.create("other")
        _, admin = store.create("ops", "admin")
        store.close()
        async with w.http(acme) as a, w.http(other) as b, w.http(admin) as ad:
            assert (await upload(a, "mine", ink)).json()["owner"] == "acme"
            for r in (await b.get("/v1/loras/mine"), await b.delete("/v1/loras/mine")):
                assert r.status_code == 404
            assert [x["name"] for x in (await b.get("/v1/loras")).json()["data"]] == ["house"]  # the config's
            assert [x["name"] for x in (await a.get("/v1/loras")).json()["data"]] == ["house", "mine"]
            assert (await a.post("/v1/loras", json={"name": "s", "model": "img", "source": str(src)})).status_code == 403
            assert (await a.delete("/v1/loras/house")).status_code == 403
            assert (await ad.get("/v1/loras/mine")).json()["owner"] == "acme"
            assert (await upload(b, "mine", ink)).status_code == 201  # its own, same name: another scope
    run(config(tmp_path, demo_dir, f'[loras.house]\nmodel = "img"\nsource = "{src}"'), test)


def test_jobs_take_loras_and_echo_them(tmp_path, demo_dir, ink):
    async def test(w: World):
        store = KeyStore(tmp_path)
        _, acme = store.create("acme")
        _, other = store.create("other")
        store.close()
        async with w.http(acme) as a, w.http(other) as b:
            assert (await upload(a, "ink", ink)).status_code == 201
            assert (await upload(a, "paper", ink, model="other")).status_code == 201
            r = await a.post("/v1/jobs", json={"model": "img", "prompt": "p", "loras": [{"name": "ink", "scale": 0.8}]})
            assert r.status_code == 202, r.text
            job = r.json()
            lid = (await a.get("/v1/loras/ink")).json()["id"]
            assert job["params"]["loras"] == [{"name": "ink", "scale": 0.8, "id": lid}]
            msg = w.rt.pool.take("run")[0][1]  # what the worker is sent: each job's adapters
            assert msg["jobs"][0]["loras"] == [{"name": "ink", "scale": 0.8, "id": lid}]
            # the form spelling of the same request
            r = await a.post("/v1/jobs", data={"model": "img", "prompt": "p"}, files={"loras": (None, "ink:0.5")})
            assert r.status_code == 202 and r.json()["params"]["loras"][0]["scale"] == 0.5
            for body, field in (({"loras": [{"name": "nope"}]}, "loras[0].name"),
                                ({"loras": [{"name": "ink"}, {"name": "paper"}]}, "loras[1].name"),  # other model
                                ({"loras": [{"name": "ink", "scale": 4.5}]}, "loras[0].scale"),
                                ({"loras": [{"name": "ink"}, {"name": "ink"}]}, "loras[1].name"),
                                ({"loras": [{"name": "ink"}] * 3}, "loras"),  # max_loras = 2
                                ({"loras": [{"name": "ink", "weight": 1}]}, "loras.0.weight")):
                r = await a.post("/v1/jobs", json={"model": "img", "prompt": "p", **body})
                assert r.status_code == 400 and r.json()["error"]["field"] == field, (body, r.text)
            r = await b.post("/v1/jobs", json={"model": "img", "prompt": "p", "loras": [{"name": "ink"}]})
            assert r.status_code == 400 and r.json()["error"]["field"] == "loras[0].name"  # acme's: unknown to other
            # an adapter queued jobs use cannot be deleted
            r = await a.delete("/v1/loras/ink")
            assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
            r = await a.post("/v1/images/generations", json={"model": "img", "prompt": "p", "n": 1,
                                                              "loras": [{"name": "ink", "scale": 9}]})
            assert r.status_code == 400 and r.json()["error"]["field"] == "loras[0].scale"
    run(_with_max(tmp_path, demo_dir), test)


def _with_max(tmp_path, demo_dir):
    cfg = config(tmp_path, demo_dir)
    from dataclasses import replace

    return replace(cfg, models={**cfg.models, "img": replace(cfg.models["img"], max_loras=2)})


def test_split_puts_the_adapter_set_in_the_batch_key(tmp_path, demo_dir, ink):
    from dataclasses import replace

    from genserve.server.requests import validate

    cfg = config(tmp_path, demo_dir)
    lora = {"name": "ink", "model": "img", "id": "abc"}
    body = {"model": "img", "prompt": "p", "loras": [{"name": "ink", "scale": 0.5, "lora": lora}]}
    mixed = validate(body, cfg.models, random_seed=1)
    assert mixed.key.loras == "" and mixed.loras == (("ink", 0.5, "abc"),)
    split = validate(body, {**cfg.models, "img": replace(cfg.models["img"], lora_batching="split")}, random_seed=1)
    assert split.key.loras == "abc@0.5" and split.key != validate({"model": "img", "prompt": "p"}, cfg.models,
                                                                   random_seed=1).key


def test_cli_lora_argument():
    import argparse

    from genserve.cli.jobs import lora_arg

    assert lora_arg("ink:0.8") == {"name": "ink", "scale": 0.8} and lora_arg("ink") == {"name": "ink"}
    with pytest.raises(argparse.ArgumentTypeError):
        lora_arg("ink:strong")


def test_worker_reports_reach_workers_metrics_and_the_breakdown(tmp_path, demo_dir, ink):
    async def test(w: World):
        pool = w.rt.pool
        async with w.http() as c:
            lid = (await upload(c, "ink", ink)).json()["id"]
            job = (await c.post("/v1/jobs", json={"model": "img", "prompt": "p", "loras": [{"name": "ink"}]})).json()
            for wid, msg in pool.take("load"):
                pool.say(wid, "loaded", model=msg["model"], cached=False, load_start=1.0, load_end=1.0, bytes=MB,
                         tier="disk")
            [(wid, run_msg)] = pool.take("run")
            assert run_msg["lora_evict"] == [] and run_msg["lora_memory"] == 1024 << 20
            ref = w.rt.results.put(job["id"], "output.png", b"png", "image/png").to_dict()
            pool.say(wid, "started", batch_id=run_msg["batch_id"], t=2.0)
            pool.say(wid, "job_done", batch_id=run_msg["batch_id"], job_id=job["id"], result=ref, inference_start=2.0,
                     inference_end=3.0, output_written=3.0, lora_load_s=0.25, lora_tiers=["storage"])
            pool.say(wid, "batch_done", batch_id=run_msg["batch_id"], t=3.0, loras={lid: 12345})
            view = (await c.get(f"/v1/jobs/{job['id']}")).json()
            assert view["status"] == "succeeded" and view["breakdown"]["lora_load_s"] == 0.25
            workers = (await c.get("/v1/workers")).json()["data"]
            assert workers[0]["resident_loras"] == [{"id": lid, "bytes": 12345}]
            text = (await c.get("/metrics")).text
            assert 'genserve_lora_loads_total{tier="storage"} 1.0' in text
            assert 'genserve_lora_resident_bytes{worker="w0"} 12345.0' in text
    run(config(tmp_path, demo_dir), test)


def test_a_worker_crash_mid_batch_retries_the_jobs_with_their_adapters(tmp_path, demo_dir, ink):
    async def test(w: World):
        pool = w.rt.pool
        async with w.http() as c:
            lid = (await upload(c, "ink", ink)).json()["id"]
            jobs = [(await c.post("/v1/jobs", json={"model": "img", "prompt": "p", "seed": s,
                                                     **({"loras": [{"name": "ink", "scale": 0.5}]} if s else {})})).json()
                    for s in (1, 0)]  # the adapter's job first: it runs at once, the other waits
            for wid, msg in pool.take("load"):
                pool.say(wid, "loaded", model=msg["model"], cached=False, load_start=1.0, load_end=1.0, bytes=MB,
                         tier="disk")
            runs = pool.take("run")
            pool.say(runs[0][0], "started", batch_id=runs[0][1]["batch_id"], t=2.0)
            assert w.rt.engine.resident_loras("w0") == {lid: len(ink) - 8 - int.from_bytes(ink[:8], "little")}
            pool.crash("w0")
            assert w.rt.engine.resident_loras("w0") == {}  # the adapters went with the worker
            pool.ready("w0", 1024 * MB)
            for wid, msg in pool.take("load"):
                pool.say(wid, "loaded", model=msg["model"], cached=False, load_start=3.0, load_end=3.0, bytes=MB,
                         tier="disk")
            again = [j for _, m in pool.take("run") for j in m["jobs"]]
            assert {j["id"] for j in again} == {j["id"] for j in jobs}  # both retried...
            by_id = {j["id"]: j for j in again}
            assert by_id[jobs[0]["id"]]["loras"] == [{"name": "ink", "scale": 0.5, "id": lid}]  # ...with adapters
            assert not by_id[jobs[1]["id"]]["loras"]
            assert (await c.get(f"/v1/jobs/{jobs[0]['id']}")).json()["attempts"][0]["code"] == "worker_crashed"
    run(config(tmp_path, demo_dir), test)
