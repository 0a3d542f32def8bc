"""Retention: TTLs for results and job records, the size cap (oldest finished results first),
DELETE /v1/jobs/{id}, expires_at in job records, and the metrics. A real SQLite store and result
directory; the sweep is called with explicit times (the runtime's timer is not needed)."""
from __future__ import annotations

import asyncio
import tomllib

import httpx
import pytest
from prometheus_client import CollectorRegistry

from genserve.config.load import ConfigError, parse_config
from genserve.config.retention import DAY_S, RetentionConfig
from genserve.server.http.app import create_app
from genserve.server.jobs.jobstore import JobStore
from genserve.server.jobs.listeners import Event
from genserve.server.jobs.sweeper import Retention
from genserve.server.status import JobStatus
from genserve.storage import LocalResultStore

from ..runtime.test_runtime import World

T0 = 1_000_000.0


class Setup:
    def __init__(self, tmp_path, **cfg) -> None:
        self.store = JobStore(tmp_path / "jobs.db")
        self.results = LocalResultStore(tmp_path / "results")
        self.registry = CollectorRegistry()
        self.ret = Retention(RetentionConfig(**cfg), self.store, self.results, self.registry, lambda: T0)

    def job(self, job_id: str, finished: float | None, size: int = 100, status=JobStatus.SUCCEEDED) -> None:
        """A job record finished at ``finished`` (None: still queued) with one result of ``size`` bytes."""
        self.store.insert(job_id, None, {"model": "m", "priority": "standard"}, T0)
        if finished is None:
            return
        ref = self.results.put(job_id, "output.png", b"x" * size, "image/png").to_dict()
        self.store.update([job_id], status=status, results=[ref], t_finished=finished)
        self.ret.on_event(Event(status.value, finished, job_id, record=self.store.get(job_id)))

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels or None) or 0.0

    def on_disk(self, job_id: str) -> bool:
        return (self.results.root / job_id / "output.png").exists()


def test_results_ttl_deletes_files_keeps_records(tmp_path):
    s = Setup(tmp_path, results_days=1)
    s.job("old", T0 - 2 * DAY_S)
    s.job("new", T0 - 0.5 * DAY_S)
    s.job("live", None)
    assert s.metric("genserve_result_bytes_stored") == 200
    assert s.ret.sweep(T0) == {"results": 1, "jobs": 0, "bytes": 100}
    assert not s.on_disk("old") and s.on_disk("new")
    old = s.store.get("old")
    assert old is not None and old["results"] == [] and old["t_results_deleted"] == T0
    assert not (s.results.root / "old").exists()  # the job's directory goes with its last file
    assert s.metric("genserve_result_bytes_stored") == 100
    assert s.metric("genserve_result_bytes_deleted_total", reason="results_days") == 100
    assert s.ret.sweep(T0) == {"results": 0, "jobs": 0, "bytes": 0}  # nothing twice


def test_jobs_ttl_deletes_record_and_results(tmp_path):
    s = Setup(tmp_path, jobs_days=3)
    s.job("ancient", T0 - 4 * DAY_S)
    s.job("recent", T0 - 1 * DAY_S)
    s.job("queued", None)
    s.store.start_attempts(("ancient",), "w0", "m", "b1", T0 - 4 * DAY_S)
    assert s.ret.sweep(T0)["jobs"] == 1
    assert s.store.get("ancient") is None and s.store.attempts("ancient") == []
    assert not s.on_disk("ancient") and s.store.get("recent") is not None and s.store.get("queued") is not None
    assert s.metric("genserve_jobs_deleted_total", reason="jobs_days") == 1


def test_size_cap_expires_the_oldest_finished_results_first(tmp_path):
    s = Setup(tmp_path, max_data_bytes=250)
    for i, age in enumerate((5, 1, 3, 2)):  # finished 5, 1, 3, 2 days ago; 100 bytes each
        s.job(f"j{i}", T0 - age * DAY_S)
    out = s.ret.sweep(T0)
    # 400 > 250: the two oldest (j0: 5 days, j2: 3 days) go, leaving 200.
    assert out["results"] == 2 and not s.on_disk("j0") and not s.on_disk("j2")
    assert s.on_disk("j1") and s.on_disk("j3")
    assert s.metric("genserve_result_bytes_stored") == 200
    assert s.metric("genserve_result_bytes_deleted_total", reason="max_data_bytes") == 200


def test_stored_bytes_are_counted_from_the_store_on_start(tmp_path):
    s = Setup(tmp_path)
    s.job("a", T0, size=70)
    s.job("b", T0, size=30)
    again = Retention(RetentionConfig(), s.store, s.results, CollectorRegistry(), lambda: T0)
    assert again.stored == 100


def test_sweep_batch_bounds_one_pass(tmp_path):
    s = Setup(tmp_path, results_days=1, sweep_batch=2)
    for i in range(5):
        s.job(f"j{i}", T0 - 2 * DAY_S)
    assert [s.ret.sweep(T0)["results"] for _ in range(4)] == [2, 2, 1, 0]


def test_delete_is_idempotent_in_the_store(tmp_path):
    s = Setup(tmp_path)
    assert s.results.delete("nope/output.png") == 0
    s.job("a", T0, size=10)
    assert s.results.delete("a/output.png") == 10
    assert s.results.delete("a/output.png") == 0


def test_retention_config_keys_are_checked():
    base = '[models.m]\nkind = "image"\nsource = "demo:image"\n'
    cfg = parse_config(tomllib.loads(base + "[retention]\nresults_days = 7\njobs_days = 30\nmax_data_bytes = 1e9\n"))
    assert cfg.retention == RetentionConfig(results_days=7.0, jobs_days=30.0, max_data_bytes=10**9)
    assert parse_config(tomllib.loads(base)).retention.enabled is False
    for bad, key in (("results_days = -1", "retention.results_days"), ('jobs_days = "x"', "retention.jobs_days"),
                     ("max_data_byte = 5", "retention.max_data_byte"),
                     ("results_days = 7\njobs_days = 1", "retention.jobs_days"),
                     ("max_data_bytes = -5", "retention.max_data_bytes")):
        with pytest.raises(ConfigError) as e:
            parse_config(tomllib.loads(base + "[retention]\n" + bad + "\n"))
        assert e.value.key == key


def test_delete_route_and_expires_at(tmp_path):
    """DELETE /v1/jobs/{id} over the runtime on the fake pool: 409 while unfinished, 204 once
    finished (files and record gone), 404 after; expires_at follows [retention]."""

    async def go():
        w = World(tmp_path)
        w.cfg = parse_config(tomllib.loads(
            f'[server]\ndata_dir = "{tmp_path}"\n[retention]\nresults_days = 1\njobs_days = 2\n'
            f'[models.img]\nkind = "image"\nsource = "{tmp_path}/x"\nmax_batch_size = 4\ndefault_size = "64x64"\n'
            'default_steps = 2\n'))
        from genserve.server.runtime.runtime import Runtime
        from genserve.workers.fake import FakePool
        w.rt = Runtime(w.cfg, devices=["cpu"], clock=w.clock, pool=FakePool)
        w.pool = w.rt.pool
        await w.start()
        [jid] = w.submit()
        app = create_app(w.cfg, w.rt)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.delete(f"/v1/jobs/{jid}")
            assert r.status_code == 409 and r.json()["error"]["field"] == "id"
            view = (await c.get(f"/v1/jobs/{jid}")).json()
            assert view["expires_at"] is None and view["results_expire_at"] is None
            w.load()
            msg = w.run_msg()
            w.done("w0", msg["batch_id"], jid)
            w.pool.say("w0", "batch_done", batch_id=msg["batch_id"], t=w.clock.t)
            view = (await c.get(f"/v1/jobs/{jid}")).json()
            finished = view["timestamps"]["finished"]
            assert view["expires_at"] == finished + 2 * DAY_S and view["results_expire_at"] == finished + DAY_S
            stored = w.rt.observer.prometheus_text().decode()
            assert "genserve_result_bytes_stored " in stored
            assert (await c.get(f"/v1/jobs/{jid}/result")).status_code == 200
            r = await c.delete(f"/v1/jobs/{jid}")
            assert r.status_code == 204
            assert not (w.rt.results.root / jid).exists() and w.rt.store.get(jid) is None
            assert (await c.get(f"/v1/jobs/{jid}")).status_code == 404
            assert (await c.delete(f"/v1/jobs/{jid}")).status_code == 404  # a repeat finds nothing
            text = w.rt.observer.prometheus_text().decode()
            assert 'genserve_jobs_deleted_total{reason="api"} 1.0' in text
            # Results expired by age: the record stays, the result URL answers 410.
            [j2] = w.submit()
            msg = w.run_msg()
            w.done("w0", msg["batch_id"], j2)
            w.rt.retention.sweep(w.clock.t + 1.5 * DAY_S)
            view = (await c.get(f"/v1/jobs/{j2}")).json()
            assert view["results"] == [] and view["results_deleted_at"] is not None
            assert (await c.get(f"/v1/jobs/{j2}/result")).status_code == 410
        await w.rt.close()

    asyncio.run(go())


def test_the_runtime_sweeps_on_its_own_timer(tmp_path):
    """Wiring: with [retention] the runtime sweeps at start and every sweep_interval_s."""

    async def go():
        from genserve.server.runtime.runtime import Runtime
        from genserve.workers.fake import FakePool

        w = World(tmp_path)
        w.cfg = parse_config(tomllib.loads(
            f'[server]\ndata_dir = "{tmp_path}"\n[retention]\nmax_data_bytes = 0\nsweep_interval_s = 0.05\n'
            f'[models.img]\nkind = "image"\nsource = "{tmp_path}/x"\ndefault_size = "64x64"\ndefault_steps = 2\n'))
        w.rt = Runtime(w.cfg, devices=["cpu"], clock=w.clock, pool=FakePool)
        w.pool = w.rt.pool
        await w.start()
        [jid] = w.submit()
        w.load()
        msg = w.run_msg()
        w.done("w0", msg["batch_id"], jid)
        assert (w.rt.results.root / jid).exists()
        for _ in range(200):  # the next sweep is at most 0.05 s away
            if w.job(jid)["results"] == []:
                break
            await asyncio.sleep(0.01)
        assert w.job(jid)["results"] == [] and not (w.rt.results.root / jid).exists()
        assert w.job(jid)["status"] == "succeeded"  # the record stays
        await w.rt.close()

    asyncio.run(go())
