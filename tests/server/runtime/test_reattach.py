"""A server restarted after a crash, on a cluster where a worker outlived it while running a batch
of the old server (reattach.py): those jobs are held until the worker is ready again, then finished
with the outputs it wrote, or queued again; never run a second time. The runtime on the fake pool
(the cluster version: tests/integration/test_cluster.py, the kill -9 test)."""
from __future__ import annotations

import asyncio

from genserve.server.runtime.runtime import Runtime
from genserve.workers.fake import FakePool

from .test_runtime import MB, Clock, config


def survivors(in_flight: dict[str, str]):
    class SurvivingPool(FakePool):
        def in_flight(self) -> dict[str, str]:
            return in_flight
    return SurvivingPool


def first_server(tmp_path, clock) -> tuple[list[str], str]:
    """Two jobs dispatched to w0 in one batch, a third queued behind them; then the server dies."""
    async def go():
        rt = Runtime(config(tmp_path), devices=["cpu"], clock=clock, pool=FakePool)
        await rt.start()
        rt.pool.ready("w0", 1024 * MB)
        from genserve.server.requests import validate

        ids = [rt.submit(validate({"model": "img", "prompt": f"p{i}", "seed": i}, rt.config.models, random_seed=0),
                         None)[0]["id"] for i in range(2)]
        rt.kick()
        [(_, load)] = rt.pool.take("load")
        rt.pool.say("w0", "loaded", model="img", cached=False, load_start=clock.t, load_end=clock.t, bytes=MB,
                    tier="disk")
        [(_, run)] = rt.pool.take("run")
        assert {j["id"] for j in run["jobs"]} == set(ids)
        third = rt.submit(validate({"model": "img", "prompt": "q", "seed": 9}, rt.config.models, random_seed=0),
                          None)[0]["id"]
        await rt.close()  # the fake pool's close leaves its workers and the jobs' records as they were
        return ids, third
    return asyncio.run(go())


def write(rt: Runtime, job_id: str) -> None:
    rt.results.put(job_id, "output.png", b"\x89PNG from the surviving worker", "image/png")


def test_jobs_a_surviving_worker_still_runs_are_held_then_adopted_or_queued(tmp_path):
    clock = Clock()
    (a, b), c = first_server(tmp_path, clock)

    async def go():
        clock.t += 5
        rt = Runtime(config(tmp_path), devices=["cpu"], clock=clock, pool=survivors({a: "w0", b: "w0"}))
        await rt.start()
        # Held: still running on w0, their attempt open; only c is queued.
        assert [rt.store.get(j)["status"] for j in (a, b, c)] == ["running", "running", "queued"]
        assert rt.engine.queue_depth("img") == 1
        write(rt, a)  # the worker finished a's output; b's never came (its batch failed, say)
        clock.t += 1
        rt.pool.ready("w0", 1024 * MB)  # after the old batch: ready again for the new server
        ja, jb = rt.store.get(a), rt.store.get(b)
        assert ja["status"] == "succeeded" and ja["results"][0]["key"] == f"{a}/output.png"
        assert [(x["attempt"], x["code"]) for x in rt.store.attempts(a)] == [(1, None)]  # run once
        assert jb["status"] in ("queued", "running") and jb["attempts"] == 1
        assert rt.store.attempts(b)[0]["code"] == "worker_crashed"
        rt.kick()
        [(_, load)] = rt.pool.take("load")
        assert load["model"] == "img"
        rt.pool.say("w0", "loaded", model="img", cached=False, load_start=clock.t, load_end=clock.t, bytes=MB,
                    tier="disk")
        [(_, run)] = rt.pool.take("run")
        assert {j["id"] for j in run["jobs"]} == {b, c}  # a is not run again
        await rt.close()
    asyncio.run(go())


def test_held_jobs_of_a_survivor_lost_before_it_is_ready_are_queued_again(tmp_path):
    clock = Clock()
    (a, b), c = first_server(tmp_path, clock)

    async def go():
        rt = Runtime(config(tmp_path, workers=2), devices=["cpu", "cpu"], clock=clock,
                     pool=survivors({a: "w0", b: "w0"}))
        await rt.start()
        rt.cancel(b)  # asked while held: honoured when the hold ends
        rt.pool.crash("w0")
        assert rt.store.get(b)["status"] == "canceled"
        assert rt.store.get(a)["status"] in ("queued", "running")
        assert rt.store.attempts(a)[0]["code"] == "worker_crashed"
        rt.pool.ready("w1", 1024 * MB)
        [(w, load)] = rt.pool.take("load")
        assert w == "w1"
        rt.pool.say("w1", "loaded", model="img", cached=False, load_start=clock.t, load_end=clock.t, bytes=MB,
                    tier="disk")
        [(_, run)] = rt.pool.take("run")
        assert {j["id"] for j in run["jobs"]} == {a, c}
        await rt.close()
    asyncio.run(go())
