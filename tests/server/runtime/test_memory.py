"""Bounded memory: once a job is terminal, nothing of it stays in the server's memory — event
histories, subscribers, progress, webhook bookkeeping, the engine's per-job maps, batches waiting
for loads. Driven through the runtime on the fake pool with jobs ending every way a job can end."""
from __future__ import annotations

import asyncio
import base64

from .test_runtime import World

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def per_job_state(w: World) -> dict[str, int]:
    """Every per-job structure of the runtime and the engine, by size."""
    rt, eng = w.rt, w.rt.engine
    return {
        "hub.history": len(rt.events.history), "hub.subscribers": len(rt.events.subscribers),
        "records.progress": len(rt.records._progress),
        "webhooks.hooks": len(rt.webhooks._hooks), "webhooks.last_progress": len(rt.webhooks._last_progress),
        "webhooks.inflight": len(rt.webhooks._inflight),
        "fleet.awaiting_load": len(rt.fleet._awaiting_load),
        "engine.queued": len(eng.waiting.queues), "engine.parked": len(eng.waiting._parked),
        "engine.running": len(eng.fleet.running), "engine.batch_of": eng.fleet.running_jobs(),
        "engine.cancel_sent": len(eng.failures._cancel_sent), "engine.watch": len(eng.failures._watch),
    }


def test_per_job_state_is_released_once_jobs_are_terminal(tmp_path):
    async def go():
        w = await World(tmp_path, webhook_secret=SECRET, workers=1).start()
        hub = w.rt.events
        n_rounds = 60
        for r in range(n_rounds):
            hook = {"webhook": "http://127.0.0.1:9/hook", "webhook_events": ["progress"]} if r % 2 else {}
            a, b, c, d = w.submit(4, **hook)
            subs = [hub.subscribe(j) for j in (a, b)]  # SSE clients following two of them
            if r == 0:
                w.load()
            msg = w.run_msg()
            batch = msg["batch_id"]
            assert {j["id"] for j in msg["jobs"]} == {a, b, c, d}
            w.pool.say("w0", "started", batch_id=batch, t=w.clock.t)
            w.pool.say("w0", "progress", batch_id=batch, step=1, total=2)
            w.rt.cancel(c)  # canceled while running: the worker confirms at the next step
            w.pool.say("w0", "job_canceled", batch_id=batch, job_id=c, t=w.clock.t)
            for j in (a, b, d):
                w.done("w0", batch, j)
            w.clock.t += 0.5
            w.pool.say("w0", "batch_done", batch_id=batch, t=w.clock.t, peak_bytes=1)
            e = w.submit(1)[0]  # canceled while queued behind nothing: may dispatch at once
            w.rt.cancel(e)
            for msgs in w.pool.take("run"):
                b2 = msgs[1]["batch_id"]
                for j in msgs[1]["jobs"]:
                    w.pool.say("w0", "job_canceled", batch_id=b2, job_id=j["id"], t=w.clock.t)
                w.pool.say("w0", "batch_done", batch_id=b2, t=w.clock.t)
            for j, (_, q) in zip((a, b), subs):
                got = [q.get_nowait()["event"] for _ in range(q.qsize())]
                assert got[-1] == "succeeded"  # they saw the job's end before its history went
                hub.unsubscribe(j, q)
            w.clock.t += 1
        w.rt.kick()
        state = per_job_state(w)
        assert all(v == 0 for v in state.values()), state
        statuses = {w.job(j["id"])["status"] for j in w.rt.store.recent(1000)}
        assert statuses <= {"succeeded", "canceled"} and len(w.rt.store.recent(1000)) == 5 * n_rounds
        await w.rt.close()

    asyncio.run(go())
