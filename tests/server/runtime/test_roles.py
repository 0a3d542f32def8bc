"""Gateways and engines over one PostgreSQL database, in one event loop (AutoPool workers: no
pipelines run). The real processes, kill -9 included, are tests/integration/test_failover.py."""
import asyncio
import json
import tomllib

import httpx
import pytest

from genserve.config.load import parse_config
from genserve.server.http.app import create_app
from genserve.server.http.engine_app import create_engine_app
from genserve.server.runtime.gateway import Gateway
from genserve.server.runtime.leader import EngineRole
from genserve.server.runtime.runtime import Runtime

from ..auto_pool import auto_pool


def make_config(tmp_path, dsn, extra=""):
    return parse_config(tomllib.loads(f"""
[server]
data_dir = "{tmp_path}"
[store]
backend = "postgres"
dsn = "{dsn}"
[models.img]
kind = "image"
source = "{tmp_path}/no-weights-needed"
sizes = ["64x64"]
default_steps = 3
{extra}
"""))


class Cluster:
    """``gateways`` gateway apps and ``engines`` engine roles, their clients, started and closed together."""

    def __init__(self, cfg, tmp_path, gateways=2, engines=2):
        self.exits: list[int] = []
        self.gateways = [Gateway(cfg) for _ in range(gateways)]
        self.engines = [EngineRole(cfg, runtime_factory=lambda: Runtime(cfg, devices=["cpu"],
                                                                       pool=auto_pool(str(tmp_path / "results"))),
                                   exit=self.exits.append) for _ in range(engines)]
        self.clients = [httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(cfg, g)), base_url="http://gw")
                        for g in self.gateways]
        self.engine_clients = [httpx.AsyncClient(transport=httpx.ASGITransport(app=create_engine_app(cfg, e)),
                                                 base_url="http://engine") for e in self.engines]

    async def __aenter__(self):
        for g in self.gateways:
            await g.start()
        for e in self.engines:
            await e.start()
        return self

    async def __aexit__(self, *exc):
        for c in self.clients + self.engine_clients:
            await c.aclose()
        for e in self.engines:
            await e.close()
        for g in self.gateways:
            await g.close()


async def until(cond, timeout=20.0):
    async def loop():
        while not (v := await cond()):
            await asyncio.sleep(0.02)
        return v
    return await asyncio.wait_for(loop(), timeout)


def sse_events(text: str) -> list[dict]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            out.append({"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])})
    return out


async def leader_of(cluster):
    async def one():
        leaders = [e for e in cluster.engines if e.leader]
        return leaders[0] if len(leaders) == 1 and leaders[0].runtime.ready else None
    return await until(one)


def test_a_job_submitted_on_one_gateway_is_followed_on_the_other(tmp_path, pg_database):
    cfg = make_config(tmp_path, pg_database)

    async def go():
        async with Cluster(cfg, tmp_path) as c:
            leader = await leader_of(c)
            standby = next(e for e in c.engines if e is not leader)
            ready = [(await ec.get("/readyz")).json() for ec in c.engine_clients]
            assert sorted(r["leader"] for r in ready) == [False, True] and all(r["role"] == "engine" for r in ready)
            assert (await c.clients[0].get("/readyz")).json()["role"] == "gateway"
            r = await c.clients[0].post("/v1/jobs", json={"model": "img", "prompt": "p"})
            assert r.status_code == 202, r.text
            jid = r.json()["id"]
            # ends with the terminal event, which only the bus brings to gateway B
            stream = await asyncio.wait_for(c.clients[1].get(f"/v1/jobs/{jid}/events"), 30)
            evs = sse_events(stream.text)
            assert evs[0]["event"] == "queued" and evs[-1]["event"] == "succeeded", evs
            assert [e["id"] for e in evs] == [str(i) for i in range(1, len(evs) + 1)]
            # Last-Event-ID from gateway B's stream, presented to gateway A: only what came after
            again = await c.clients[0].get(f"/v1/jobs/{jid}/events", headers={"last-event-id": evs[-2]["id"]})
            assert [e["event"] for e in sse_events(again.text)] == ["succeeded"]
            job = (await c.clients[1].get(f"/v1/jobs/{jid}")).json()
            assert job["status"] == "succeeded" and len(job["attempts"]) == 1 and len(job["results"]) == 1
            assert standby.runtime is None  # the standby never ran anything

    asyncio.run(go())


def test_the_standby_leads_when_the_leader_goes_and_runs_what_waits(tmp_path, pg_database):
    cfg = make_config(tmp_path, pg_database)

    async def go():
        async with Cluster(cfg, tmp_path, gateways=1) as c:
            leader = await leader_of(c)
            standby = next(e for e in c.engines if e is not leader)
            await leader.close()  # its lock connection ends: the standby's pg_advisory_lock returns
            c.engines.remove(leader)
            assert await leader_of(c) is standby
            r = await c.clients[0].post("/v1/jobs", json={"model": "img", "prompt": "p"})
            jid = r.json()["id"]
            job = await until(lambda: _done(c.clients[0], jid))
            assert job["status"] == "succeeded" and not c.exits

    asyncio.run(go())


async def _done(client, jid):
    job = (await client.get(f"/v1/jobs/{jid}")).json()
    return job if job["status"] in ("succeeded", "failed", "canceled") else None


def test_max_queued_holds_across_gateways_and_cancels_reach_the_leader(tmp_path, pg_database):
    cfg = make_config(tmp_path, pg_database, '[tenants.default]\nmax_queued = 5\n')

    async def go():
        async with Cluster(cfg, tmp_path, engines=0) as c:  # no engine: everything stays queued
            body = {"model": "img", "prompt": "p"}
            rs = await asyncio.gather(*[c.clients[i % 2].post("/v1/jobs", json=body) for i in range(16)])
            codes = sorted(r.status_code for r in rs)
            assert codes == [202] * 5 + [429] * 11, codes
            queued = [r.json()["id"] for r in rs if r.status_code == 202]
            r = await c.clients[1].post(f"/v1/jobs/{queued[0]}/cancel")
            assert r.json()["cancel_requested"] is True and r.json()["status"] == "queued"
            # an engine that starts later takes the queue and honours the cancel asked before it led
            c.engines.append(EngineRole(cfg, runtime_factory=lambda: Runtime(
                cfg, devices=["cpu"], pool=auto_pool(str(tmp_path / "results"))), exit=c.exits.append))
            await c.engines[0].start()
            jobs = [await until(lambda j=j: _done(c.clients[0], j)) for j in queued]
            assert [j["status"] for j in jobs] == ["canceled"] + ["succeeded"] * 4

    asyncio.run(go())


def test_the_publisher_thins_progress_but_never_drops_milestones():
    from genserve.server.jobs.listeners import Event
    from genserve.server.jobs.store.bus import EventPublisher, parse_event

    sent = []
    pub = EventPublisher(lambda ch, payload: sent.append(parse_event(payload)))
    pub.on_event(Event("queued", 0.0, "j", {"model": "m"}))  # the insert trigger's: not again
    pub.on_event(Event("started", 1.0, "j", {"worker": "w0"}))
    for step in range(1, 11):  # 10 steps in 0.09 s
        pub.on_event(Event("progress", 1.0 + step * 0.01, "j", {"step": step, "total": 10}))
    pub.on_event(Event("progress", 2.0, "k", {"step": 1, "total": 10}))  # another job: its own clock
    pub.on_event(Event("succeeded", 1.2, "j", {"status": "succeeded"}))
    pub.on_event(Event("queued", 3.0, "j2", {"model": "m", "restored": True}))  # after a failover: again
    pub.on_event(Event("synced", 3.0))  # fleet events stay in the engine
    assert [(e["job_id"], e["kind"], e["data"].get("step")) for e in sent] == [
        ("j", "started", None), ("j", "progress", 1), ("j", "progress", 10), ("k", "progress", 1),
        ("j", "succeeded", None), ("j2", "queued", None)]


def test_an_engine_that_cannot_build_its_runtime_exits(tmp_path, pg_database):
    cfg = make_config(tmp_path, pg_database)

    def broken():
        raise RuntimeError("no devices")

    async def go():
        exits: list[int] = []
        role = EngineRole(cfg, runtime_factory=broken, exit=exits.append)
        await role.start()
        await until(lambda: _ready(exits))
        assert exits == [75] and not role.leader
        await role.close()

    asyncio.run(go())


async def _ready(v):
    return bool(v)


def test_a_gateway_that_lost_its_listen_connection_catches_up_its_streams(tmp_path, pg_database):
    """The job ends while the gateway is not listening (its LISTEN backend terminated): after the
    reconnect, the catch-up read gives the open stream its terminal event."""
    import psycopg

    cfg = make_config(tmp_path, pg_database)

    async def go():
        async with Cluster(cfg, tmp_path, gateways=1, engines=0) as c:
            gw = c.gateways[0]
            jid = (await c.clients[0].post("/v1/jobs", json={"model": "img", "prompt": "p"})).json()["id"]
            stream = asyncio.create_task(c.clients[0].get(f"/v1/jobs/{jid}/events"))
            await until(lambda: _ready(gw.events.subscribers.get(jid)))
            connects = gw._listen.connects
            with psycopg.connect(pg_database, autocommit=True) as db:
                db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'")
                # finished meanwhile, by no one the gateway hears (as a leader's NOTIFY lost in the gap)
                db.execute("UPDATE jobs SET status = 'succeeded', t_finished = 1.0 WHERE id = %s", (jid,))
            await until(lambda: _ready(gw._listen.connects > connects))
            evs = sse_events((await asyncio.wait_for(stream, 10)).text)
            assert [e["event"] for e in evs] == ["queued", "succeeded"]

    asyncio.run(go())


def test_the_leader_takes_jobs_inserted_while_its_intake_reconnects(tmp_path, pg_database, monkeypatch):
    import psycopg

    from genserve.server.jobs.store import bus

    monkeypatch.setattr(bus, "RECONNECT_S", (1.0,))  # a wide gap: the insert surely falls into it
    cfg = make_config(tmp_path, pg_database)

    async def go():
        async with Cluster(cfg, tmp_path, gateways=1, engines=1) as c:
            leader = await leader_of(c)
            connects = leader._intake.connects
            with psycopg.connect(pg_database, autocommit=True) as db:
                db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'")
            await until(lambda: _ready(not leader._intake.connected.is_set()))
            jid = (await c.clients[0].post("/v1/jobs", json={"model": "img", "prompt": "p"})).json()["id"]
            assert leader._intake.connects == connects  # inserted while nobody listened: the NOTIFY is lost
            job = await until(lambda: _done(c.clients[0], jid))
            assert job["status"] == "succeeded" and leader._intake.connects == connects + 1

    asyncio.run(go())


def test_a_webhook_asked_on_a_gateway_is_delivered_once_by_the_leader(tmp_path, pg_database):
    import base64

    secret = "whsec_" + base64.b64encode(b"genserve-test-key-0123456789abcd").decode()
    cfg = parse_config(tomllib.loads(f"""
[server]
data_dir = "{tmp_path}"
webhook_secret = "{secret}"
[store]
backend = "postgres"
dsn = "{pg_database}"
[webhooks]
allow_private = true
[models.img]
kind = "image"
source = "{tmp_path}/no-weights-needed"
sizes = ["64x64"]
default_steps = 3
"""))
    got: list[tuple[str, dict]] = []

    async def handle(reader, writer):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
        body = await reader.readexactly(int(headers.get("content-length", headers.get("Content-Length", "0"))))
        got.append((headers.get("webhook-id"), json.loads(body)))
        writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    async def go():
        rx = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{rx.sockets[0].getsockname()[1]}/hook"
        async with Cluster(cfg, tmp_path, gateways=1, engines=2) as c:
            await leader_of(c)
            r = await c.clients[0].post("/v1/jobs", json={"model": "img", "prompt": "p", "webhook": url})
            assert r.status_code == 202, r.text
            jid = r.json()["id"]
            await until(lambda: _ready(got))
            job = (await c.clients[0].get(f"/v1/jobs/{jid}")).json()
            assert [d["status"] for d in job["webhook"]["deliveries"]] == ["delivered"]
        rx.close()
        assert [(p["type"], p["data"]["id"]) for _, p in got] == [("job.completed", jid)]

    asyncio.run(go())
