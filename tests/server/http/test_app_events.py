"""The SSE route over a runtime on the fake pool (in-process ASGI, no sockets, no processes)."""
from __future__ import annotations

import asyncio

import httpx

from genserve.server.http.app import create_app

from ..runtime.test_runtime import World


def _ids_and_events(text: str) -> list[tuple[int, str]]:
    out, eid = [], None
    for line in text.splitlines():
        if line.startswith("id:"):
            eid = int(line[3:])
        elif line.startswith("event:"):
            out.append((eid, line[6:].strip()))
    return out


def test_live_events_after_rebuilt_milestones_keep_counting_up(tmp_path):
    """A running job whose in-memory history was dropped: the stream rebuilds its milestones from
    the record, then live events must continue the numbering (Last-Event-ID relies on it)."""

    async def go():
        w = await World(tmp_path).start()
        w.rt.events.max_jobs = 1
        [jid] = w.submit()
        w.load()
        msg = w.run_msg()
        w.submit()  # a second job's events push the first one's history out
        assert not w.rt.events.known(jid)
        app = create_app(w.cfg, w.rt)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            request = asyncio.ensure_future(client.get(f"/v1/jobs/{jid}/events"))
            for _ in range(100_000):  # yield to the app until its stream has subscribed
                if w.rt.events.subscribers.get(jid):
                    break
                await asyncio.sleep(0)
            assert w.rt.events.subscribers.get(jid), "the SSE stream never subscribed"
            w.pool.say("w0", "progress", batch_id=msg["batch_id"], step=1, total=2)
            w.done("w0", msg["batch_id"], jid)
            resp = await asyncio.wait_for(request, 10)
        got = _ids_and_events(resp.text)
        assert [e for _, e in got] == ["queued", "started", "progress", "succeeded"]
        assert [i for i, _ in got] == [1, 2, 3, 4]
        await w.rt.close()

    asyncio.run(go())


def test_a_client_reconnecting_after_the_job_ended_gets_its_outcome(tmp_path):
    """The history is released once a job is terminal: a client reconnecting with the Last-Event-ID
    of its live stream (a number past the rebuilt milestones) still gets the terminal event."""

    async def go():
        w = await World(tmp_path).start()
        [jid] = w.submit()
        w.load()
        msg = w.run_msg()
        for step in (1, 2):
            w.pool.say("w0", "progress", batch_id=msg["batch_id"], step=step, total=2)
        w.done("w0", msg["batch_id"], jid)
        assert not w.rt.events.known(jid)
        app = create_app(w.cfg, w.rt)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            fresh = _ids_and_events((await client.get(f"/v1/jobs/{jid}/events")).text)
            again = _ids_and_events((await client.get(f"/v1/jobs/{jid}/events", headers={"Last-Event-ID": "4"})).text)
        assert [e for _, e in fresh] == ["queued", "started", "succeeded"]
        assert again == [(5, "succeeded")]
        await w.rt.close()

    asyncio.run(go())


def test_close_streams_ends_a_live_stream_with_reconnect(tmp_path):
    async def go():
        w = await World(tmp_path).start()
        [jid] = w.submit()
        app = create_app(w.cfg, w.rt)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            request = asyncio.ensure_future(client.get(f"/v1/jobs/{jid}/events"))
            for _ in range(100_000):
                if w.rt.events.subscribers.get(jid):
                    break
                await asyncio.sleep(0)
            w.rt.events.close_streams()
            resp = await asyncio.wait_for(request, 10)
            late = await client.get(f"/v1/jobs/{jid}/events")  # opened after the close
        assert resp.text.endswith('event: reconnect\ndata: {"reason": "server shutting down", "retry_ms": 2000}\n\n')
        assert "retry: 2000\nevent: reconnect" in resp.text
        assert [e for _, e in _ids_and_events(resp.text)] == ["queued", "started", "reconnect"]
        assert [e for _, e in _ids_and_events(late.text)] == ["queued", "started", "reconnect"]
        await w.rt.close()

    asyncio.run(go())
