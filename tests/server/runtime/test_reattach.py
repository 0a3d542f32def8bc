"""A server restarted after a crash, on a cluster where a worker outlived it while running a batch
of the old server (reattach.py): those jobs are held until the worker is ready again, then finished
with the outputs it wrote, or queued again; never run a second time. The runtime on the fake pool
(the cluster version: tests/integration/test_cluster.py, the kill -9 test)."""
from __future__ import annotations

import asyncio

from genserve.server.observe.stats import breakdown
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
        rt.pool.say("w0", "loaded", model="img", cached=False, load_start=clock.t - 2.0, load_end=clock.t,
                    bytes=MB, tier="disk")  # the batch waited 2 s for its model: a cold start
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


def test_a_server_is_ready_while_its_only_worker_finishes_a_held_batch(tmp_path):
    # issue 22.3: after a restart /readyz stayed 503 until the survivors finished their held batches.
    clock = Clock()
    (a, b), _ = first_server(tmp_path, clock)

    async def go():
        rt = Runtime(config(tmp_path), devices=["cpu"], clock=clock, pool=survivors({a: "w0", b: "w0"}))
        await rt.start()
        assert not rt.pool.workers["w0"].ready  # busy with the old server's batch...
        assert rt.ready and rt.worker_readiness() == {"w0": True}  # ...but up: the API takes jobs
        rt.pool.crash("w0")  # lost before it was ready: nothing left to run jobs
        assert not rt.ready and rt.worker_readiness() == {"w0": False}
        await rt.close()
    asyncio.run(go())


def test_adopted_jobs_keep_inference_and_cold_start_and_the_downtime_is_its_own_stage(tmp_path):
    clock = Clock()
    t0 = clock.t
    (a, b), c = first_server(tmp_path, clock)

    async def go():
        clock.t = t0 + 30  # the server was down meanwhile
        rt = Runtime(config(tmp_path), devices=["cpu"], clock=clock, pool=survivors({a: "w0", b: "w0"}))
        await rt.start()
        write(rt, a)
        write(rt, b)
        # The worker kept what it reported to nobody (its job_done for a and b) and says it with
        # its ready; the runtime finishes both with those timings.
        kept = {a: {"inference_start": t0 + 1, "inference_end": t0 + 4, "output_written": t0 + 4.5},
                b: {"inference_start": t0 + 1, "inference_end": t0 + 4, "output_written": t0 + 5}}
        clock.t = t0 + 40
        rt.pool.ready("w0", 1024 * MB, finished_before=kept)
        ja, jb = rt.store.get(a), rt.store.get(b)
        assert ja["status"] == jb["status"] == "succeeded"
        st = breakdown(ja)
        assert st["inference"] == 3.0 and st["cold_start"] == 2.0 and st["output_write"] == 0.5
        assert st["downtime"] == 40 - 4.5  # output written -> finished: not folded into inference
        assert breakdown(jb)["downtime"] == 35.0
        assert st["total"] == 40.0
        # A job that ran normally has no downtime.
        clock.t += 1
        rt.kick()
        [(_, run)] = rt.pool.take("run")
        assert [j["id"] for j in run["jobs"]] == [c]
        rt.pool.say("w0", "job_done", batch_id=run["batch_id"], job_id=c,
                    result={"key": f"{c}/output.png", "content_type": "image/png", "bytes": 1},
                    inference_start=clock.t, inference_end=clock.t + 1, output_written=clock.t + 1)
        assert rt.store.get(c)["status"] == "succeeded" and breakdown(rt.store.get(c))["downtime"] is None
        await rt.close()
    asyncio.run(go())
