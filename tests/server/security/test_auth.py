"""API keys, scopes and tenant isolation over the HTTP app (runtime on the fake pool, in-process ASGI).

Every job route is tried with another tenant's key: each must answer as if the job did not exist.
"""
from __future__ import annotations

import asyncio
import logging
import tomllib

import httpx
import pytest

from genserve.config.load import parse_config
from genserve.server.http.app import create_app
from genserve.server.runtime.runtime import Runtime
from genserve.server.security.keys import KeyStore
from genserve.workers.fake import FakePool

from ..runtime.test_runtime import Clock, Recorder, World, run

EXTRA = """
[auth]
metrics_token = "metrics-token-0123456789"

[tenants.acme]
max_queued = 3
weight = 2

[tenants.slow]
rate_per_s = 0.5
burst = 2
max_priority = "standard"

[tenants.cheap]
max_priority = "low"
"""


def cfg(tmp_path, extra: str = EXTRA):
    return parse_config(tomllib.loads(f"""
[server]
data_dir = "{tmp_path}"
[models.img]
kind = "image"
source = "{tmp_path}/no-weights-needed"
max_batch_size = 4
max_wait_ms = 0
default_size = "64x64"
default_steps = 2
{extra}"""))


class AuthWorld(World):
    def __init__(self, tmp_path, extra: str = EXTRA) -> None:
        self.clock = Clock()
        self.cfg = cfg(tmp_path, extra)
        self.rt = Runtime(self.cfg, devices=["cpu"], clock=self.clock, pool=FakePool)
        self.pool = self.rt.pool
        self.rec = Recorder()
        self.rt.listeners.append(self.rec)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _world(tmp_path, extra: str = EXTRA, ready: bool = True):
    w = await AuthWorld(tmp_path, extra).start(ready)
    app = create_app(w.cfg, w.rt)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return w, client


def test_tenant_isolation_on_every_job_route(tmp_path):
    async def go():
        store = KeyStore(tmp_path)  # as `genserve keys create` would, before the server starts
        _, acme = store.create("acme")
        _, other = store.create("other")
        _, admin = store.create("ops", "admin")
        w, c = await _world(tmp_path)
        A, B = bearer(acme), bearer(other)
        r = await c.post("/v1/jobs", json={"model": "img", "prompt": "mine", "id": "shared-id"}, headers=A)
        assert r.status_code == 202 and r.json()["tenant"] == "acme"
        jid = r.json()["id"]
        # Another tenant's view: the job does not exist.
        for path in (f"/v1/jobs/{jid}", f"/v1/jobs/{jid}/result", f"/v1/jobs/{jid}/events"):
            r = await c.get(path, headers=B)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
        r = await c.post(f"/v1/jobs/{jid}/cancel", headers=B)
        assert r.status_code == 404
        assert not w.job(jid)["cancel_requested"] and w.job(jid)["status"] != "canceled"
        r = await c.delete(f"/v1/jobs/{jid}", headers=B)  # would be 409 (unfinished) for its owner
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert (await c.delete(f"/v1/jobs/{jid}", headers=A)).status_code == 409
        assert (await c.get("/v1/jobs", headers=B)).json()["data"] == []
        assert (await c.get("/v1/jobs?tenant=acme", headers=B)).status_code == 404
        # The same client id from another tenant is another job, not a replay of acme's.
        r = await c.post("/v1/jobs", json={"model": "img", "prompt": "theirs", "id": "shared-id"}, headers=B)
        assert r.status_code == 202 and r.json()["id"] != jid and "Idempotent-Replayed" not in r.headers
        other_jid = r.json()["id"]
        r = await c.post("/v1/jobs", json={"model": "img", "prompt": "mine", "id": "shared-id"}, headers=A)
        assert r.json()["id"] == jid and r.headers["Idempotent-Replayed"] == "true"
        # The owner sees its own; the admin sees everyone's.
        assert [j["id"] for j in (await c.get("/v1/jobs", headers=A)).json()["data"]] == [jid]
        assert {j["id"] for j in (await c.get("/v1/jobs", headers=bearer(admin))).json()["data"]} == {jid, other_jid}
        assert [j["id"] for j in (await c.get("/v1/jobs?tenant=other", headers=bearer(admin))).json()["data"]] == [other_jid]
        assert (await c.get(f"/v1/jobs/{jid}", headers=A)).status_code == 200
        assert (await c.get(f"/v1/jobs/{jid}", headers=bearer(admin))).status_code == 200
        r = await c.post(f"/v1/jobs/{other_jid}/cancel", headers=A)
        assert r.status_code == 404 and w.job(other_jid)["status"] != "canceled"
        r = await c.post(f"/v1/jobs/{other_jid}/cancel", headers=B)  # still queued
        assert r.status_code == 200 and r.json()["status"] == "canceled"
        # Run it: the result is the owner's only.
        w.load()
        msg = w.run_msg()
        w.clock.t += 2.0
        for j in msg["jobs"]:
            w.done("w0", msg["batch_id"], j["id"])
        w.pool.say("w0", "batch_done", batch_id=msg["batch_id"], t=w.clock.t)
        assert w.job(jid)["status"] == "succeeded"
        assert (await c.get(f"/v1/jobs/{jid}/result", headers=B)).status_code == 404
        r = await c.get(f"/v1/jobs/{jid}/result", headers=A)
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
        r = await c.get(f"/v1/jobs/{jid}/events", headers=A)
        assert r.status_code == 200 and "event: succeeded" in r.text
        # Usage: each tenant sees its own; the admin every tenant's.
        mine = (await c.get("/v1/usage", headers=A)).json()["data"]
        assert [t["tenant"] for t in mine] == ["acme"] and mine[0]["jobs"] == 1
        [row] = mine[0]["by_model_day"]
        assert row["model"] == "img" and row["succeeded"] == 1 and row["device_seconds"] > 0
        assert (await c.get("/v1/usage?tenant=acme", headers=B)).status_code == 404
        theirs = (await c.get("/v1/usage", headers=B)).json()["data"]
        assert [(t["tenant"], t["by_model_day"][0]["canceled"]) for t in theirs] == [("other", 1)]
        every = (await c.get("/v1/usage", headers=bearer(admin))).json()["data"]
        assert [t["tenant"] for t in every] == ["acme", "other"]
        assert [t["tenant"] for t in (await c.get("/v1/usage?tenant=other", headers=bearer(admin))).json()["data"]] == ["other"]
        assert (await c.get("/v1/usage?days=0", headers=A)).status_code == 400
        # Prometheus: acme is configured (its own label); "other" is not (folded into "other").
        text = (await c.get("/metrics", headers=bearer(admin))).text
        assert 'genserve_tenant_jobs_total{model="img",status="succeeded",tenant="acme"} 1.0' in text
        assert 'genserve_tenant_jobs_total{model="img",status="canceled",tenant="other"} 1.0' in text
        assert 'genserve_tenant_device_seconds_total{model="img",tenant="acme"}' in text
        await c.aclose()
        await w.rt.close()
        store.close()

    asyncio.run(go())


def test_keys_are_required_once_one_exists_and_seen_without_restart(tmp_path, caplog):
    async def go():
        w, c = await _world(tmp_path)
        # No key yet: open (the server was allowed to start because it is on loopback).
        assert (await c.get("/v1/models")).status_code == 200
        r = await c.post("/v1/jobs", json={"model": "img", "prompt": "x"})
        assert r.status_code == 202 and r.json()["tenant"] == "default"
        cli = KeyStore(tmp_path)  # another connection, as the `genserve keys` process
        key_id, key = cli.create("acme")
        for path in ("/v1/models", "/v1/jobs", "/openapi.json", "/v1/usage", "/no/such/route"):
            r = await c.get(path)
            assert r.status_code == 401, path
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert r.json()["error"]["code"] == "unauthorized"
        assert (await c.get("/v1/models", headers=bearer(key + "x"))).status_code == 401
        assert (await c.get("/v1/models", headers={"Authorization": key})).status_code == 401  # not Bearer
        assert (await c.get("/v1/models", headers=bearer(key))).status_code == 200
        # The dashboard's static files hold no data: a browser loads them, its script sends the key.
        assert (await c.get("/dashboard")).status_code == 200
        assert (await c.get("/dashboard/dashboard.js")).status_code == 200
        assert (await c.get("/static/uplot/uPlot.iife.min.js")).status_code == 200  # the dashboard's <script>
        # Health checks stay open.
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/readyz")).status_code in (200, 503)
        # The job created before keys belongs to the default tenant: not acme's.
        assert (await c.get("/v1/jobs", headers=bearer(key))).json()["data"] == []
        assert cli.revoke(key_id)
        assert (await c.get("/v1/models", headers=bearer(key))).status_code == 401  # no restart needed
        # Revoking every key does not reopen the server.
        assert (await c.get("/v1/models")).status_code == 401
        await c.aclose()
        await w.rt.close()
        cli.close()

    with caplog.at_level(logging.INFO, logger="genserve.auth"):
        asyncio.run(go())
    assert any("auth failure" in r.getMessage() for r in caplog.records)


def test_scopes_admin_routes_and_metrics_token(tmp_path, caplog):
    async def go():
        store = KeyStore(tmp_path)
        _, jobs_key = store.create("acme")
        _, admin = store.create("ops", "admin")
        w, c = await _world(tmp_path)
        J, A = bearer(jobs_key), bearer(admin)
        for method, path in (("POST", "/v1/models/img/load"), ("POST", "/v1/models/img/unload"),
                             ("GET", "/v1/workers"), ("GET", "/v1/stats"), ("GET", "/v1/stats/series"),
                             ("GET", "/metrics")):
            r = await c.request(method, path, headers=J)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", path
            r = await c.request(method, path, headers=A)
            assert r.status_code in (200, 202), (path, r.status_code, r.text)
        r = await c.get("/metrics", headers=bearer("metrics-token-0123456789"))
        assert r.status_code == 200 and "genserve" in r.text
        assert (await c.get("/v1/workers", headers=bearer("metrics-token-0123456789"))).status_code == 401
        assert (await c.get("/metrics")).status_code == 401
        await c.aclose()
        await w.rt.close()
        store.close()

    with caplog.at_level(logging.INFO, logger="genserve.auth"):
        asyncio.run(go())
    assert any("admin action: POST /v1/models/img/load" in r.getMessage() for r in caplog.records)


def test_tenant_limits(tmp_path):
    async def go():
        store = KeyStore(tmp_path)
        _, acme = store.create("acme")
        _, slow = store.create("slow")
        _, free = store.create("free")
        w, c = await _world(tmp_path, ready=False)
        body = {"model": "img", "prompt": "x"}
        # max_queued = 3 (no worker is ready: nothing leaves the queue)
        for _ in range(3):
            assert (await c.post("/v1/jobs", json=body, headers=bearer(acme))).status_code == 202
        r = await c.post("/v1/jobs", json=body, headers=bearer(acme))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "rate_limited"
        assert w.rt.store.queued_count("acme") == 3  # the refused job was never stored
        # More images at once than max_queued can ever admit: a 400, not a 429 to retry forever.
        r = await c.post("/v1/images/generations", json={**body, "n": 4}, headers=bearer(acme))
        assert r.status_code == 400 and r.json()["error"]["field"] == "n", r.text
        # Another tenant is not affected.
        assert (await c.post("/v1/jobs", json=body, headers=bearer(free))).status_code == 202
        # rate 0.5/s with a burst of 2
        S = bearer(slow)
        assert [(await c.post("/v1/jobs", json=body, headers=S)).status_code for _ in range(2)] == [202, 202]
        r = await c.post("/v1/jobs", json=body, headers=S)
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 2
        # max_priority = standard
        r = await c.post("/v1/jobs", json={**body, "priority": "high"}, headers=bearer(slow))
        assert r.status_code == 400 and r.json()["error"]["field"] == "priority"
        assert (await c.post("/v1/jobs", json={**body, "priority": "high"}, headers=bearer(free))).status_code == 202
        # max_priority = low: a job that asks for nothing gets low; asking for more is refused.
        _, cheap = store.create("cheap")
        r = await c.post("/v1/jobs", json={**body, "id": "c1"}, headers=bearer(cheap))
        assert r.status_code == 202 and r.json()["priority"] == "low"
        r = await c.post("/v1/jobs", json={**body, "id": "c1"}, headers=bearer(cheap))
        assert r.status_code == 202 and r.headers["Idempotent-Replayed"] == "true"
        assert (await c.post("/v1/jobs", json={**body, "priority": "standard"}, headers=bearer(cheap))).status_code == 400
        await c.aclose()
        await w.rt.close()
        store.close()

    asyncio.run(go())


def test_openai_client_api_key_is_a_bearer_key(tmp_path):
    openai = pytest.importorskip("openai")

    async def go():
        store = KeyStore(tmp_path)
        _, key = store.create("acme")
        w, c = await _world(tmp_path)
        oa = openai.AsyncOpenAI(api_key=key, base_url="http://t/v1", http_client=c, max_retries=0)
        models = await oa.models.list()
        assert [m.id for m in models.data] == ["img"]
        bad = openai.AsyncOpenAI(api_key="sk-wrong", base_url="http://t/v1", http_client=c, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        await c.aclose()
        await w.rt.close()
        store.close()

    asyncio.run(go())


def test_cors_origins(tmp_path):
    async def go():
        store = KeyStore(tmp_path)
        _, key = store.create("acme")
        w = await AuthWorld(tmp_path).start()
        from dataclasses import replace

        config = replace(w.cfg, server=replace(w.cfg.server, cors_origins=("https://app.example.com",)))
        app = create_app(config, w.rt)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            pre = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "authorization,content-type"}
            r = await c.options("/v1/jobs", headers=pre)
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
            r = await c.options("/v1/jobs/x", headers={**pre, "Access-Control-Request-Method": "DELETE"})
            assert r.status_code == 200 and "DELETE" in r.headers["access-control-allow-methods"]
            r = await c.options("/v1/jobs", headers={**pre, "Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in r.headers
            r = await c.get("/v1/jobs", headers={"Origin": "https://app.example.com", **bearer(key)})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
            r = await c.get("/v1/jobs", headers={"Origin": "https://app.example.com"})
            assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        await w.rt.close()
        store.close()

    asyncio.run(go())


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    from genserve.config.auth import AccessConfig, AuthConfig
    from genserve.server.security.auth import bind_refusal

    store = KeyStore(tmp_path)
    open_ = AccessConfig()
    assert bind_refusal("127.0.0.1", store, open_, False) is None
    assert bind_refusal("::1", store, open_, False) is None
    assert "--insecure" in bind_refusal("0.0.0.0", store, open_, False)
    assert bind_refusal("0.0.0.0", store, open_, True) is None
    assert bind_refusal("0.0.0.0", store, AccessConfig(AuthConfig(required=True)), False) is None
    store.create("acme")
    assert bind_refusal("10.1.2.3", store, open_, False) is None
    store.close()


def test_step_mode_records_name_only_the_same_tenants_batch_mates(tmp_path):
    """A step-mode job's record says who shared its denoiser calls: ids of its own tenant's jobs,
    and only a count for other tenants' (their ids are theirs to know)."""
    async def go():
        store = KeyStore(tmp_path)
        _, acme = store.create("acme")
        _, other = store.create("other")
        w, c = await _world(tmp_path, 'batching = "step"\n' + EXTRA)  # a key of [models.img]
        A, B = bearer(acme), bearer(other)
        ids = []
        for who, h in (("a1", A), ("b1", B), ("a2", A)):
            r = await c.post("/v1/jobs", json={"model": "img", "prompt": who}, headers=h)
            ids.append(r.json()["id"])
        w.load()
        msg = w.run_msg()
        for jid in ids:
            ref = w.write_output(jid)
            w.pool.say("w0", "job_done", batch_id=msg["batch_id"], job_id=jid, result=ref,
                       inference_start=w.clock.t, inference_end=w.clock.t, output_written=w.clock.t,
                       step={"joined_step": 0, "shared_with": [i for i in ids if i != jid], "paused_at": []})
        a1 = (await c.get(f"/v1/jobs/{ids[0]}", headers=A)).json()["batch"]
        assert a1["mode"] == "step" and a1["shared_steps_with"] == [ids[2]]
        assert a1["shared_steps_with_other_tenants"] == 1
        b1 = (await c.get(f"/v1/jobs/{ids[1]}", headers=B)).json()["batch"]
        assert b1["shared_steps_with"] == [] and b1["shared_steps_with_other_tenants"] == 2
    run(go())
