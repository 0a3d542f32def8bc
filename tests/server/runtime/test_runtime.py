"""The runtime on the in-memory fake pool: no processes, no torch. The test plays the workers'
part with protocol messages and checks what the runtime records and publishes."""
from __future__ import annotations

import asyncio

import pytest

from genserve.config.load import parse_config
from genserve.server.jobs.listeners import Event
from genserve.server.requests import validate
from genserve.server.runtime.runtime import Runtime
from genserve.storage import LocalResultStore, output_name
from genserve.workers.fake import FakePool

MB = 1 << 20


class Clock:
    """A settable clock that counts its reads."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t, self.reads = t, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.t


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def on_event(self, ev: Event) -> None:
        self.events.append(ev)

    def kinds(self, job_id: str) -> list[str]:
        return [e.kind for e in self.events if e.job_id == job_id]


def config(tmp_path, **server):
    server_toml = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in server.items())
    return parse_config(__import__("tomllib").loads(f"""
[server]
data_dir = "{tmp_path}"
{server_toml}
[models.img]
kind = "image"
source = "{tmp_path}/no-weights-needed"
max_batch_size = 4
max_wait_ms = 0
default_size = "64x64"
default_steps = 2
"""))


class World:
    """A runtime over a fake pool, with one worker ready."""

    def __init__(self, tmp_path, workers: int = 1, **server) -> None:
        self.clock = Clock()
        self.cfg = config(tmp_path, **server)
        self.rt = Runtime(self.cfg, devices=["cpu"] * workers, clock=self.clock, pool=FakePool)
        self.pool: FakePool = self.rt.pool  # type: ignore[assignment]
        self.rec = Recorder()
        self.rt.listeners.append(self.rec)

    async def start(self, ready: bool = True) -> "World":
        await self.rt.start()
        if ready:
            for w in list(self.pool.workers):
                self.pool.ready(w, 1024 * MB)
        return self

    def submit(self, n: int = 1, **body) -> list[str]:
        ids = []
        for i in range(n):
            params = validate({"model": "img", "prompt": f"p{i}", "seed": i, **body}, self.cfg.models, random_seed=0)
            ids.append(self.rt.submit(params, None)[0]["id"])
        self.rt.kick()
        return ids

    def job(self, job_id: str) -> dict:
        return self.rt.store.get(job_id)

    def run_msg(self) -> dict:
        [(_, msg)] = self.pool.take("run")
        return msg

    def load(self, worker: str = "w0", model: str = "img") -> None:
        [(w, msg)] = self.pool.take("load")
        assert (w, msg["model"]) == (worker, model)
        t = self.clock.t
        self.pool.say(worker, "loaded", model=model, cached=False, load_start=t - 0.5, load_end=t, bytes=100 * MB,
                      tier="disk")

    def done(self, worker: str, batch_id: str, job_id: str, write: bool = True) -> dict:
        ref = self.write_output(job_id) if write else {"key": f"{job_id}/output.png", "content_type": "image/png",
                                                      "bytes": 1}
        self.pool.say(worker, "job_done", batch_id=batch_id, job_id=job_id, result=ref, inference_start=self.clock.t,
                      inference_end=self.clock.t, output_written=self.clock.t)
        return ref

    def write_output(self, job_id: str) -> dict:
        return LocalResultStore(self.rt.results.root).put(job_id, output_name("image"), b"\x89PNG fake",
                                                           "image/png").to_dict()


def run(coro):
    return asyncio.run(coro)


def test_a_job_runs_end_to_end_and_listeners_see_its_lifecycle_in_order(tmp_path):
    async def go():
        w = await World(tmp_path).start()
        [jid] = w.submit()
        w.clock.t += 1
        w.load()
        msg = w.run_msg()
        assert [j["id"] for j in msg["jobs"]] == [jid] and msg["params"]["steps"] == 2
        w.pool.say("w0", "started", batch_id=msg["batch_id"], t=w.clock.t)
        for step in (1, 2):
            w.pool.say("w0", "progress", batch_id=msg["batch_id"], step=step, total=2)
        assert w.rt.progress(jid) == (2, 2)
        w.done("w0", msg["batch_id"], jid)
        w.clock.t += 1
        w.pool.say("w0", "batch_done", batch_id=msg["batch_id"], t=w.clock.t, peak_bytes=5 * MB)
        job = w.job(jid)
        assert job["status"] == "succeeded" and job["batch_id"] == msg["batch_id"] and job["worker"] == "w0"
        assert job["t_load_start"] is not None and job["load_tier"] == "disk"  # it waited for the load
        assert w.rec.kinds(jid) == ["queued", "started", "progress", "progress", "succeeded"]
        assert w.rt.progress(jid) is None  # forgotten once terminal
        # The runtime charged the batch's device time (dispatch to batch_done: 2 s) to the job.
        assert job["device_seconds"] == pytest.approx(2.0) and job["device_type"] == "cpu"
        ended = [e for e in w.rec.events if e.kind == "batch_ended"]
        assert ended and ended[0].data["charges"][0]["job_id"] == jid
        await w.rt.close()
    run(go())


def test_a_job_is_finished_exactly_once(tmp_path):
    async def go():
        w = await World(tmp_path).start()
        [jid] = w.submit(timeout_s=5.0)
        w.load()
        msg = w.run_msg()
        w.done("w0", msg["batch_id"], jid)
        # A late duplicate report, and the deadline passing afterwards, change nothing.
        w.done("w0", msg["batch_id"], jid)
        w.clock.t += 10
        w.rt.kick()
        w.pool.say("w0", "batch_done", batch_id=msg["batch_id"], t=w.clock.t)
        assert w.job(jid)["status"] == "succeeded"
        assert w.rec.kinds(jid).count("succeeded") == 1 and "failed" not in w.rec.kinds(jid)
        [attempt] = w.rt.store.attempts(jid)
        assert attempt["code"] is None and attempt["ended"] is not None
        await w.rt.close()
    run(go())


def test_a_step_mode_progress_message_carries_each_jobs_own_count(tmp_path):
    """Step mode sends one ``progress`` per denoiser call for the whole running set; each job's
    progress and its own events follow its own count (jobs joined at different steps)."""
    async def go():
        w = await World(tmp_path).start()
        a, b = w.submit(2)
        w.load()
        msg = w.run_msg()
        assert sorted(j["id"] for j in msg["jobs"]) == sorted([a, b])
        w.pool.say("w0", "started", batch_id=msg["batch_id"], t=w.clock.t)
        w.pool.say("w0", "progress", batch_id=msg["batch_id"], step=3, jobs=[[a, 2, 2], [b, 1, 2]])
        assert (w.rt.progress(a), w.rt.progress(b)) == ((2, 2), (1, 2))
        progress = [(e.job_id, e.data["step"]) for e in w.rec.events if e.kind == "progress"]
        assert progress == [(a, 2), (b, 1)]
        await w.rt.close()

    run(go())


def test_a_deadline_while_running_fails_the_job_once_and_stops_it_at_the_next_step(tmp_path):
    async def go():
        w = await World(tmp_path).start()
        [jid] = w.submit(timeout_s=5.0)
        w.load()
        msg = w.run_msg()
        w.clock.t += 6
        w.rt.kick()
        [(worker, cancel)] = w.pool.take("cancel")
        assert worker == "w0" and cancel["job_ids"] == [jid]
        job = w.job(jid)
        assert job["status"] == "failed" and job["error_code"] == "timeout"
        # The worker had already written the output when the cancel arrived: the job stays failed.
        w.done("w0", msg["batch_id"], jid)
        assert w.job(jid)["status"] == "failed" and w.rec.kinds(jid).count("failed") == 1
        await w.rt.close()
    run(go())


def test_an_output_written_before_a_crash_is_adopted_and_the_rest_retried(tmp_path):
    async def go():
        w = await World(tmp_path, workers=2).start()
        a, b = w.submit(2)
        w.load()
        msg = w.run_msg()
        assert {j["id"] for j in msg["jobs"]} == {a, b}
        w.write_output(a)  # a's output reached the store, but the worker died before reporting it
        w.clock.t += 1
        w.pool.crash("w0")
        ja, jb = w.job(a), w.job(b)
        assert ja["status"] == "succeeded" and ja["results"][0]["key"] == f"{a}/output.png"
        # b had a failed attempt and is retried at once on the other worker (it failed on w0).
        assert jb["attempts"] == 1 and jb["status"] == "running" and jb["worker"] == "w1"
        assert w.rt.store.attempts(b)[0]["code"] == "worker_crashed"
        assert w.rec.kinds(b)[-2:] == ["retrying", "started"]
        assert "retrying" not in w.rec.kinds(a)
        w.load("w1")
        retry = w.run_msg()
        assert [j["id"] for j in retry["jobs"]] == [b]
        w.done("w1", retry["batch_id"], b)
        attempts = w.rt.store.attempts(b)
        assert [(x["attempt"], x["worker"], x["code"]) for x in attempts] == [(1, "w0", "worker_crashed"),
                                                                            (2, "w1", None)]
        await w.rt.close()
    run(go())


def test_an_adopted_output_is_found_under_its_format(tmp_path):
    async def go():
        w = await World(tmp_path).start()
        (a,) = w.submit(1, output_format="webp")
        w.load()
        msg = w.run_msg()
        assert msg["jobs"][0]["output_format"] == "webp" and msg["jobs"][0]["output_compression"] == 90
        LocalResultStore(w.rt.results.root).put(a, output_name("image", "webp"), b"RIFF fake", "image/webp")
        w.clock.t += 1
        w.pool.crash("w0")
        assert w.job(a)["status"] == "succeeded"
        assert w.job(a)["results"][0] == {"key": f"{a}/output.webp", "content_type": "image/webp", "bytes": 9}
        await w.rt.close()
    run(go())


def test_out_of_memory_splits_the_batch_without_using_an_attempt(tmp_path):
    async def go():
        w = await World(tmp_path).start()
        ids = w.submit(4)
        w.load()
        msg = w.run_msg()
        assert len(msg["jobs"]) == 4
        w.pool.say("w0", "batch_failed", batch_id=msg["batch_id"], code="out_of_memory", message="OOM")
        smaller = w.run_msg()
        assert len(smaller["jobs"]) == 2
        for j in ids:
            job = w.job(j)
            assert job["attempts"] == 0  # the split does not count
            assert w.rt.store.attempts(j)[0]["code"] == "out_of_memory"
        retrying = [e for e in w.rec.events if e.kind == "retrying"]
        assert len(retrying) == 4 and not any(e.data["counted"] for e in retrying)
        await w.rt.close()
    run(go())


def test_restart_re_enters_unfinished_jobs_with_their_attempts(tmp_path):
    async def first():
        w = await World(tmp_path).start()
        ids = w.submit(2)
        w.load()
        w.run_msg()  # both running when the "server" stops
        queued_at = w.job(ids[0])["t_queued"]
        await w.rt.close()
        return ids, queued_at

    async def second(ids, queued_at):
        w = World(tmp_path)
        await w.start(ready=False)
        for j in ids:
            job = w.job(j)
            assert job["status"] == "queued" and job["attempts"] == 1 and job["t_queued"] == queued_at
            assert w.rt.store.attempts(j)[0]["code"] == "worker_crashed"
        assert w.rt.engine.is_queued(ids[0]) and w.rt.engine.is_queued(ids[1])
        assert [e.data.get("restored") for e in w.rec.events if e.kind == "queued"] == [True, True]
        w.pool.ready("w0", 1024 * MB)
        w.load()
        assert sorted(j["id"] for j in w.run_msg()["jobs"]) == sorted(ids)
        await w.rt.close()

    ids, queued_at = run(first())
    run(second(ids, queued_at))


def test_each_event_reads_the_clock_once(tmp_path):
    async def go():
        w = await World(tmp_path).start()
        [jid] = w.submit()
        w.load()
        msg = w.run_msg()
        before = w.clock.reads
        w.pool.say("w0", "progress", batch_id=msg["batch_id"], step=1, total=2)
        assert w.clock.reads - before == 1
        before = w.clock.reads
        w.done("w0", msg["batch_id"], jid)  # finishes the job, steps the engine, publishes: one now
        assert w.clock.reads - before == 1
        before = w.clock.reads
        w.submit()  # persist + queue, then the API's kick: two events
        assert w.clock.reads - before == 2
        await w.rt.close()
    run(go())


def test_cancel_of_a_queued_job_and_of_a_running_one(tmp_path):
    async def go():
        w = await World(tmp_path).start(ready=False)
        [queued] = w.submit()
        w.rt.cancel(queued)  # no worker yet: it is still queued
        assert w.job(queued)["status"] == "canceled" and w.rec.kinds(queued)[-1] == "canceled"
        w.pool.ready("w0", 1024 * MB)
        [running] = w.submit()
        w.load()
        msg = w.run_msg()
        w.rt.cancel(running)
        [(_, cancel)] = w.pool.take("cancel")
        assert cancel["job_ids"] == [running] and w.job(running)["status"] == "running"  # until the worker stops it
        w.pool.say("w0", "job_canceled", batch_id=msg["batch_id"], job_id=running, t=w.clock.t)
        assert w.job(running)["status"] == "canceled" and w.job(running)["cancel_requested"]
        await w.rt.close()
    run(go())


def test_fleet_view_joins_pool_and_engine(tmp_path):
    async def go():
        w = await World(tmp_path, workers=2).start(ready=False)
        w.pool.ready("w0", 1024 * MB)
        views = {v.id: v for v in w.rt.fleet.worker_views(w.clock.t)}
        assert views["w0"].up and views["w0"].state == "idle" and views["w0"].capacity_bytes == 1024 * MB
        assert not views["w1"].up and views["w1"].to_dict()["resident_models"] == []
        w.submit()
        w.load()
        w.run_msg()
        v = {v.id: v for v in w.rt.fleet.worker_views(w.clock.t)}["w0"]
        assert v.state == "busy" and v.batch_id is not None
        assert [r.model for r in v.resident] == ["img"] and v.reported_used_bytes == 100 * MB
        assert w.rt.fleet.residency_changes()[-1]["action"] == "load"
        await w.rt.close()
    run(go())
