"""Thumbnails on the server side, over a runtime on the fake pool (in-process ASGI, no processes):
the test plays the worker, writing a real output and its real thumbnail (``with_thumbnail``, what
both runners call) into the local result store. Covers ``GET /v1/jobs/{id}/result?variant=``,
``thumbnail_url`` in the job view, adoption after a crash, and that deleting a job or expiring its
results (retention) leaves no object behind."""
from __future__ import annotations

import asyncio
import io

import httpx
from PIL import Image
from prometheus_client import CollectorRegistry

from genserve.backends.encode import encode_png
from genserve.backends.runner import with_thumbnail
from genserve.config.retention import DAY_S, RetentionConfig
from genserve.server.http.api import result_entry
from genserve.server.http.app import create_app
from genserve.server.jobs.jobstore import JobStore
from genserve.server.jobs.listeners import Event
from genserve.server.jobs.sweeper import Retention
from genserve.server.status import JobStatus
from genserve.storage import LocalResultStore

from ..runtime.test_runtime import World

T0 = 1_000_000.0


def write_result(store: LocalResultStore, job_id: str, size=(96, 64)) -> dict:
    """What a worker writes for an image job: the PNG, then its thumbnail; the ResultRef dict."""
    img = Image.new("RGB", size, (30, 160, 220))
    ref = store.put(job_id, "output.png", encode_png(img), "image/png")
    return with_thumbnail(store, ref, "image", img).to_dict()


def files(store: LocalResultStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())


def finish(w: World, job_id: str, ref: dict) -> None:
    msg = w.run_msg()
    w.pool.say("w0", "job_done", batch_id=msg["batch_id"], job_id=job_id, result=ref, inference_start=w.clock.t,
               inference_end=w.clock.t, output_written=w.clock.t)
    w.pool.say("w0", "batch_done", batch_id=msg["batch_id"], t=w.clock.t)


def in_app(tmp_path, test):
    async def go():
        w = await World(tmp_path).start()
        app = create_app(w.cfg, w.rt)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                await test(w, c)
        finally:
            await w.rt.close()

    asyncio.run(go())


def test_the_thumbnail_variant_is_served_and_linked_from_the_job_view(tmp_path):
    async def test(w, c):
        [jid] = w.submit()
        w.load()
        ref = write_result(w.rt.results, jid)
        finish(w, jid, ref)
        view = (await c.get(f"/v1/jobs/{jid}")).json()
        [res] = view["results"]
        assert res["url"] == f"http://t/v1/jobs/{jid}/result"
        assert res["thumbnail_url"] == f"http://t/v1/jobs/{jid}/result?variant=thumbnail"
        r = await c.get(res["thumbnail_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert f'filename="{jid}-thumbnail.jpg"' in r.headers["content-disposition"]
        img = Image.open(io.BytesIO(r.content))
        assert img.format == "JPEG" and img.size == (96, 64) and len(r.content) == ref["thumbnail"]["bytes"]
        for url in (res["url"], f"/v1/jobs/{jid}/result?variant=output&index=0"):  # the default variant
            r = await c.get(url)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        r = await c.get(f"/v1/jobs/{jid}/result?variant=poster")
        assert r.status_code == 400 and r.json()["error"]["field"] == "query.variant", r.json()  # like any query field
        assert "thumbnail" in r.json()["error"]["message"]
        r = await c.get(f"/v1/jobs/{jid}/result?index=3&variant=thumbnail")
        assert r.status_code == 404 and r.json()["error"]["field"] == "index"
        # The thumbnail object gone behind the server's back: a 404 naming variant, not a 500.
        w.rt.results.delete(ref["thumbnail"]["key"])
        r = await c.get(res["thumbnail_url"])
        assert r.status_code == 404 and r.json()["error"]["field"] == "variant"

    in_app(tmp_path, test)


def test_a_result_without_a_thumbnail(tmp_path):
    """Records written before thumbnails existed (or by a worker that wrote none): no URL, and the
    variant answers 404 naming ``variant``."""
    async def test(w, c):
        [jid] = w.submit()
        w.load()
        finish(w, jid, w.write_output(jid))
        [res] = (await c.get(f"/v1/jobs/{jid}")).json()["results"]
        assert res["thumbnail_url"] is None
        r = await c.get(f"/v1/jobs/{jid}/result?variant=thumbnail")
        assert r.status_code == 404 and r.json()["error"]["field"] == "variant"
        assert "no thumbnail" in r.json()["error"]["message"]

    in_app(tmp_path, test)


def test_result_entry_urls_for_later_results():
    ref = {"key": "j/output.png", "content_type": "image/png", "bytes": 5,
           "thumbnail": {"key": "j/thumbnail.jpg", "content_type": "image/jpeg", "bytes": 3}}
    assert result_entry("http://t/v1/jobs/j/result", 2, ref) == {
        "url": "http://t/v1/jobs/j/result?index=2", "content_type": "image/png", "bytes": 5,
        "thumbnail_url": "http://t/v1/jobs/j/result?index=2&variant=thumbnail"}


def test_delete_job_removes_output_and_thumbnail(tmp_path):
    async def test(w, c):
        [jid] = w.submit()
        w.load()
        finish(w, jid, write_result(w.rt.results, jid))
        assert files(w.rt.results) == [f"{jid}/output.png", f"{jid}/thumbnail.jpg"]
        assert (await c.delete(f"/v1/jobs/{jid}")).status_code == 204
        assert files(w.rt.results) == [] and not (w.rt.results.root / jid).exists()  # no orphan, no empty dir
        assert w.rt.retention.stored == 0  # the gauge counted both objects and gave both back

    in_app(tmp_path, test)


def test_an_adopted_output_keeps_its_thumbnail(tmp_path):
    async def test(w, c):
        [jid] = w.submit()
        w.load()
        w.run_msg()
        ref = write_result(w.rt.results, jid)  # written, then the worker died before reporting it
        w.clock.t += 1
        w.pool.crash("w0")
        assert w.job(jid)["status"] == "succeeded"
        assert w.job(jid)["results"] == [ref]
        r = await c.get(f"/v1/jobs/{jid}/result?variant=thumbnail")
        assert r.status_code == 200 and len(r.content) == ref["thumbnail"]["bytes"]

    in_app(tmp_path, test)


# ---- retention on the local store: every object a record names is deleted ---------------------------


class Setup:
    def __init__(self, tmp_path, **cfg) -> None:
        self.store = JobStore(tmp_path / "jobs.db")
        self.results = LocalResultStore(tmp_path / "results")
        self.ret = Retention(RetentionConfig(**cfg), self.store, self.results, CollectorRegistry(), lambda: T0)

    def job(self, job_id: str, finished: float) -> dict:
        self.store.insert(job_id, None, {"model": "m", "priority": "standard"}, T0)
        ref = write_result(self.results, job_id)
        self.store.update([job_id], status=JobStatus.SUCCEEDED, results=[ref], t_finished=finished)
        self.ret.on_event(Event("succeeded", finished, job_id, record=self.store.get(job_id)))
        return ref


def size(ref: dict) -> int:
    return ref["bytes"] + ref["thumbnail"]["bytes"]


def test_results_ttl_and_jobs_ttl_delete_thumbnails_too(tmp_path):
    s = Setup(tmp_path, results_days=1, jobs_days=3)
    old, older, new = s.job("old", T0 - 2 * DAY_S), s.job("older", T0 - 4 * DAY_S), s.job("new", T0)
    assert s.ret.stored == size(old) + size(older) + size(new)  # thumbnails count as stored bytes
    assert Retention(RetentionConfig(), s.store, s.results, CollectorRegistry(), lambda: T0).stored == s.ret.stored
    out = s.ret.sweep(T0)
    assert out == {"results": 1, "jobs": 1, "bytes": size(old) + size(older)}
    assert files(s.results) == ["new/output.png", "new/thumbnail.jpg"]
    assert s.ret.stored == size(new)


def test_size_cap_deletes_thumbnails_too(tmp_path):
    s = Setup(tmp_path, max_data_bytes=1)
    a, b = s.job("a", T0 - 2), s.job("b", T0 - 1)
    assert s.ret.sweep(T0)["bytes"] == size(a) + size(b)
    assert files(s.results) == [] and s.ret.stored == 0
