"""Input hardening at the HTTP edge (issue 11, item 5), through the real app over a runtime on the
fake pool (in-process ASGI, no sockets, no processes): strict types, valid Unicode, the body
limit, Last-Event-ID, Allow on 405, returned URLs, and stored data that older versions wrote."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import tomllib

import httpx
import pytest

from genserve.config.load import ConfigError, parse_config
from genserve.server.http.app import create_app
from genserve.server.runtime.runtime import Runtime
from genserve.workers.fake import FakePool

SECRET = "whsec_" + "Z2Vuc2VydmUtdGVzdC1rZXktMDEyMzQ1Njc4OWFiY2Q="


def make_config(tmp_path, extra: str = ""):
    return parse_config(tomllib.loads(f"""
[server]
data_dir = "{tmp_path}"
webhook_secret = "{SECRET}"

[models.img]
kind = "image"
source = "{tmp_path}/no-weights-needed"
max_batch_size = 4
max_wait_ms = 600000
sizes = ["64x64", "128x64"]
default_size = "64x64"
default_steps = 2
{extra}
"""))


def with_app(tmp_path, test, extra: str = "", *, base_url: str = "http://testserver", client=("10.9.8.7", 5555)):
    """Run ``test(client, runtime)`` against the app over a runtime on the fake pool."""
    cfg = make_config(tmp_path, extra)

    async def go():
        rt = Runtime(cfg, devices=["cpu"], pool=FakePool)
        app = create_app(cfg, rt)
        await rt.start()
        try:
            transport = httpx.ASGITransport(app=app, client=client)
            async with httpx.AsyncClient(transport=transport, base_url=base_url) as c:
                return await test(c, rt)
        finally:
            await rt.close()

    return asyncio.run(go())


def job(**kw):
    return {"model": "img", "prompt": "a cat", **kw}


# ---- strict types and valid values ------------------------------------------------------------------

@pytest.mark.parametrize("body,field", [
    (job(prompt="\ud800"), "prompt"),
    (job(prompt="ok \udfff ok"), "prompt"),
    (job(negative_prompt="\ud83d"), "negative_prompt"),
    (job(id="\udc00"), "id"),
    (job(width=0), "width"),
    (job(height=0), "height"),
    (job(width=-64), "width"),
    (job(width="64"), "width"),
    (job(width=True), "width"),
    (job(steps=2.0), "steps"),
    (job(steps=False), "steps"),
    (job(seed="1"), "seed"),
    (job(guidance="1.5"), "guidance"),
    (job(guidance=True), "guidance"),
    (job(timeout_s="5"), "timeout_s"),
    (job(prompt=5), "prompt"),
    (job(webhook_events=["completed"]), "webhook_events"),
    (job(webhook="http://hooks.invalid/h", webhook_events=["completed"] * 4), "webhook_events"),
    (job(webhook="http://user:pw@hooks.invalid/h"), "webhook"),
    (job(webhook="http://hooks.invalid:99999/h"), "webhook"),
])
def test_invalid_job_bodies_are_400_naming_the_field_and_store_nothing(tmp_path, body, field):
    async def test(c, rt):
        # httpx encodes JSON as UTF-8, which cannot carry a lone surrogate: send the JSON escape,
        # exactly as a client that writes ASCII-only JSON does.
        r = await c.post("/v1/jobs", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["field"] == field, r.json()
        assert rt.store.recent(10) == []  # refused before anything was stored
        assert (await c.get("/v1/jobs")).status_code == 200

    with_app(tmp_path, test)


def test_valid_numbers_still_work_and_integers_are_accepted_where_floats_are(tmp_path):
    async def test(c, rt):
        r = await c.post("/v1/jobs", json=job(width=128, height=64, guidance=2, timeout_s=30, seed=7,
                                             prompt="caf\u00e9 \U0001F431"))
        assert r.status_code == 202, r.text
        p = r.json()["params"]
        assert (p["width"], p["guidance"], p["prompt"]) == (128, 2.0, "caf\u00e9 \U0001F431")

    with_app(tmp_path, test)


@pytest.mark.parametrize("size", ["0x0", "0x64", "64x0", "64", "x", "-64x64", "64x64x64"])
def test_openai_size_that_is_not_a_valid_size_is_400_not_the_default(tmp_path, size):
    async def test(c, rt):
        r = await c.post("/v1/images/generations", json={"model": "img", "prompt": "a cat", "size": size})
        assert r.status_code == 400 and r.json()["error"]["field"] == "size", r.text
        assert rt.store.recent(10) == []

    with_app(tmp_path, test)


@pytest.mark.parametrize("body,field", [
    ({"prompt": "a", "n": "2"}, "n"), ({"prompt": "a", "n": True}, "n"), ({"prompt": "\ud800"}, "prompt"),
])
def test_openai_route_is_strict_too(tmp_path, body, field):
    async def test(c, rt):
        r = await c.post("/v1/images/generations", content=json.dumps(body).encode(),
                         headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text

    with_app(tmp_path, test)


# ---- body limit -------------------------------------------------------------------------------------


def test_a_declared_body_over_the_limit_is_413_before_it_is_read(tmp_path):
    async def test(c, rt):
        big = json.dumps(job(prompt="x" * (1 << 20))).encode()
        r = await c.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
        assert rt.store.recent(10) == []
        # an unknown field the size of the limit is refused by size, never parsed
        r = await c.post("/v1/jobs", content=b'{"junk": "' + b"y" * (2 << 20) + b'"}',
                         headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert (await c.get("/healthz")).status_code == 200

    with_app(tmp_path, test)


def test_a_streamed_body_is_counted_while_it_arrives(tmp_path):
    sent = []

    async def chunks():
        for _ in range(64):  # 64 × 64 KiB = 4 MiB offered; the limit is 256 KiB
            sent.append(1)
            yield b" " * 65536

    async def test(c, rt):
        r = await c.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert len(sent) < 64  # it stopped reading soon after the limit
        r = await c.post("/v1/jobs", content=json.dumps(job(prompt="y" * 1000)).encode(),
                         headers={"content-type": "application/json"})
        assert r.status_code == 202  # under the limit: fine

    with_app(tmp_path, test, "[http]\nmax_body_bytes = 262144\n")


@pytest.mark.parametrize("text,key", [
    ("[http]\nmax_body_bytes = 10\n", "http.max_body_bytes"),
    ("[http]\nmax_body_bytes = true\n", "http.max_body_bytes"),
    ('[http]\npublic_url = "ftp://x/"\n', "http.public_url"),
    ('[http]\ntrusted_proxies = ["not-an-ip"]\n', "http.trusted_proxies[0]"),
    ("[http]\nbogus = 1\n", "http.bogus"),
    ('[webhooks]\nallow_private = "yes"\n', "webhooks.allow_private"),
    ('[webhooks]\nallow = ["10.0.0.0/8", "bad host!"]\n', "webhooks.allow[1]"),
    ("[webhooks]\nallow = 3\n", "webhooks.allow"),
])
def test_bad_http_and_webhooks_settings_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        make_config(tmp_path, text)
    assert e.value.key == key


# ---- small things -----------------------------------------------------------------------------------


def test_last_event_id_that_is_not_an_id_is_400(tmp_path):
    async def test(c, rt):
        jid = (await c.post("/v1/jobs", json=job())).json()["id"]
        for bad in ("abc", "-1", "1e3", "9" * 40):
            r = await c.get(f"/v1/jobs/{jid}/events", headers={"Last-Event-ID": bad})
            assert r.status_code == 400 and r.json()["error"]["field"] == "Last-Event-ID", (bad, r.text)
        await c.post(f"/v1/jobs/{jid}/cancel")
        r = await c.get(f"/v1/jobs/{jid}/events", headers={"Last-Event-ID": "1"})
        assert r.status_code == 200 and "event: queued" not in r.text and "event: canceled" in r.text

    with_app(tmp_path, test)


def test_405_says_which_methods_are_allowed(tmp_path):
    async def test(c, rt):
        r = await c.delete("/v1/jobs")
        assert r.status_code == 405
        assert set(r.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
        r = await c.get("/v1/models/img/load")
        assert r.status_code == 405 and "POST" in r.headers["allow"]

    with_app(tmp_path, test)


def test_returned_urls_never_come_from_the_host_header(tmp_path):
    async def test(c, rt):
        r = await c.post("/v1/jobs", json=job(), headers={"Host": "evil.example"})
        urls = r.json()["urls"]
        assert "evil" not in json.dumps(r.json())
        assert urls["self"].startswith("http://testserver/")  # the address the request arrived on
        r = await c.get("/v1/jobs", headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example",
                                             "X-Forwarded-Proto": "https"})
        assert "evil" not in r.text
        # Starlette's trailing-slash redirects build Location from Host: answered with the path only.
        for path, to in (("/v1/jobs/?limit=1", "/v1/jobs?limit=1"), ("/dashboard/", "/dashboard")):
            r = await c.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
            assert r.status_code == 307 and r.headers["location"] == to, (path, r.headers)

    with_app(tmp_path, test)


def test_same_host_redirect_rewrite_leaves_other_hosts_alone():
    from genserve.server.security.limits import _same_host_path

    assert _same_host_path(b"http://evil.example/v1/jobs", b"evil.example") == b"/v1/jobs"
    assert _same_host_path(b"https://evil.example?x=1", b"evil.example") == b"?x=1"
    assert _same_host_path(b"http://evil.example.other/x", b"evil.example") == b"http://evil.example.other/x"
    s3 = b"http://127.0.0.1:9000/bucket/k?X-Amz-Signature=1"
    assert _same_host_path(s3, b"127.0.0.1:8000") == s3


def test_public_url_is_the_base_of_returned_urls(tmp_path):
    async def test(c, rt):
        r = await c.post("/v1/jobs", json=job(), headers={"Host": "evil.example"})
        assert r.json()["urls"]["self"] == f"https://gen.example.com/api/v1/jobs/{r.json()['id']}"

    with_app(tmp_path, test, '[http]\npublic_url = "https://gen.example.com/api"\n')


def test_forwarded_headers_are_believed_only_from_a_trusted_proxy(tmp_path):
    fwd = {"X-Forwarded-Host": "gen.example.com", "X-Forwarded-Proto": "https"}
    extra = '[http]\ntrusted_proxies = ["10.0.0.0/8"]\n'

    async def trusted(c, rt):
        r = await c.post("/v1/jobs", json=job(), headers=fwd)
        assert r.json()["urls"]["self"].startswith("https://gen.example.com/v1/jobs/")
        r = await c.post("/v1/jobs", json=job(), headers={**fwd, "X-Forwarded-Host": "a b/c"})
        assert r.json()["urls"]["self"].startswith("http://testserver/")  # a malformed host is ignored

    async def untrusted(c, rt):
        r = await c.post("/v1/jobs", json=job(), headers=fwd)
        assert r.json()["urls"]["self"].startswith("http://testserver/")

    with_app(tmp_path / "a", trusted, extra, client=("10.1.2.3", 4000))
    with_app(tmp_path / "b", untrusted, extra, client=("192.0.2.9", 4000))


# ---- stored data written by older versions ----------------------------------------------------------


def test_stored_bad_data_never_makes_a_read_answer_500(tmp_path):
    """Rows as older versions (or a bug) left them: a lone surrogate in the prompt (the JSON
    escape), params missing later fields, a params column that is not JSON, bytes that are not
    UTF-8, results that are not result refs. Every read route must still answer, and cancel too."""

    async def setup(c, rt):
        ids = [(await c.post("/v1/jobs", json=job(prompt=f"p{i}", webhook="http://127.0.0.1:9/h"))).json()["id"]
               for i in range(5)]
        return ids

    receivers = "[webhooks]\nallow_private = true\n"  # port 9 on loopback: nothing listens there
    ids = with_app(tmp_path, setup, receivers)
    db = sqlite3.connect(tmp_path / "jobs.db")
    good = json.loads(db.execute("SELECT params FROM jobs WHERE id = ?", (ids[0],)).fetchone()[0])
    surrogate = json.dumps(dict(good, prompt="\ud800"))  # ensure_ascii: the escape, as the old server wrote it
    assert "\\ud800" in surrogate
    old = {k: v for k, v in good.items() if k not in ("timeout_s", "webhook_events")}
    db.execute("UPDATE jobs SET params = ? WHERE id = ?", (surrogate, ids[0]))
    db.execute("UPDATE jobs SET params = ? WHERE id = ?", (json.dumps(old), ids[1]))
    db.execute("UPDATE jobs SET params = ?, status = 'failed' WHERE id = ?", ("{not json", ids[2]))
    db.execute("UPDATE jobs SET error_message = CAST(X'6261640a80ff' AS TEXT), status = 'failed',"
               " error_code = 'internal' WHERE id = ?", (ids[3],))
    db.execute("UPDATE jobs SET results = '[1, {\"key\": 5}]', status = 'succeeded' WHERE id = ?", (ids[4],))
    db.commit()
    db.close()

    async def reads(c, rt):  # a restart over that database
        r = await c.get("/v1/jobs")
        assert r.status_code == 200, r.text
        assert {j["id"] for j in r.json()["data"]} == set(ids)
        for jid in ids:
            r = await c.get(f"/v1/jobs/{jid}")
            assert r.status_code == 200, r.text
            assert (await c.post(f"/v1/jobs/{jid}/cancel")).status_code == 200
            # terminal now, so the stream ends after the milestones
            assert (await c.get(f"/v1/jobs/{jid}/events")).status_code == 200
            assert (await c.get(f"/v1/jobs/{jid}/result")).status_code in (404, 409)
            assert (await c.get(f"/v1/jobs/{jid}/result?index=1")).status_code in (404, 409)
        assert (await c.get(f"/v1/jobs/{ids[0]}")).json()["params"]["prompt"] == "\ufffd"
        assert (await c.get(f"/v1/jobs/{ids[3]}")).json()["error"]["message"].startswith("bad")
        assert (await c.get("/")).status_code in (200, 307, 404)

    with_app(tmp_path, reads, receivers)
