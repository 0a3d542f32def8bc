"""Graceful drain with real processes: a server subprocess, its worker processes, the demo models.
SIGTERM makes /readyz 503 at once; a short running batch completes; a batch longer than drain_s is
requeued durably and completes after a restart; SSE clients get a reconnect event; waiting
OpenAI-compatible calls get 503 + Retry-After; the server exits 0 within drain_s + 5 s."""
import json
import os
import signal
import threading
import time

import httpx
import pytest

from genserve.bench.live import LiveServer, wait_for, wait_until
from genserve.server.jobs.jobstore import JobStore

from .conftest import catalog

pytestmark = pytest.mark.slow


def _config(models, drain_s: float) -> str:
    return catalog(models).replace("[server]\n", f"[server]\ndrain_s = {drain_s}\n", 1)


def _sigterm(srv: LiveServer, group: bool = False) -> float:
    """SIGTERM to the server, or to its whole process group (as systemd's default KillMode and
    Ctrl+C in a terminal do): workers leave shutdown to the server either way."""
    t0 = time.monotonic()
    if group:
        os.killpg(srv.proc.pid, signal.SIGTERM)
    else:
        srv.proc.send_signal(signal.SIGTERM)
    return t0


def _exit_code(srv: LiveServer, timeout: float) -> int:
    code = srv.proc.wait(timeout=timeout)
    srv.proc = None
    srv._log.close()
    return code


def _stream(url: str, job_id: str, out: list) -> None:
    """Read one SSE stream to its end, recording (event, data, id, retry) per message."""
    with httpx.Client(base_url=url, timeout=60) as c, c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        ev, eid, retry = None, None, None
        for line in r.iter_lines():
            if line.startswith("id:"):
                eid = int(line[3:])
            elif line.startswith("retry:"):
                retry = int(line[6:])
            elif line.startswith("event:"):
                ev = line[6:].strip()
            elif line.startswith("data:"):
                out.append((ev, json.loads(line[5:]), eid, retry))
                ev, eid, retry = None, None, None


def test_sigterm_lets_a_short_batch_finish_and_exits_0(demo_models, tmp_path):
    drain_s = 60.0
    srv = LiveServer(tmp_path / "d", _config(demo_models, drain_s), workers=1).start()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        # Warm the model first so the batch under test is only inference.
        assert wait_for(c, c.post("/v1/jobs", json={"model": "demo-image", "prompt": "warm"}).json()["id"])["status"] == "succeeded"
        # long enough (~0.5 s unloaded) that the reads below come before the drained server exits
        job = c.post("/v1/jobs", json={"model": "demo-image", "prompt": "short", "steps": 40}).json()
        wait_until(lambda: c.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", 60, "the job to run")
        queued = c.post("/v1/jobs", json={"model": "slow-lane", "prompt": "stays queued"}).json()
        t0 = _sigterm(srv, group=True)
        r = wait_until(lambda: (lambda r: r if r.status_code == 503 else None)(c.get("/readyz")), 5, "readyz 503")
        assert time.monotonic() - t0 < 2.0, "readyz must turn 503 at once"
        assert r.json()["draining"] is True
        # New batches are not dispatched while draining, but the server still answers reads.
        assert c.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"
        try:
            status = wait_for(c, job["id"], timeout=drain_s)["status"]
        except httpx.ConnectError:  # the batch ended and the drained server exited before this poll
            status = None
    assert _exit_code(srv, drain_s + 5) == 0
    if status is None:  # read the outcome from the job store the server left behind
        store = JobStore(tmp_path / "d" / "jobs.db")
        status = store.get(job["id"])["status"]
        store.db.close()
    assert status == "succeeded"
    assert time.monotonic() - t0 < drain_s + 5
    log = srv.log()
    assert "SIGTERM: draining" in log and "Traceback" not in log


def test_a_batch_longer_than_drain_s_is_requeued_and_completes_after_restart(demo_models, tmp_path):
    drain_s = 0.5
    text = _config(demo_models, drain_s)
    data = tmp_path / "d"
    srv = LiveServer(data, text, workers=1).start()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert wait_for(c, c.post("/v1/jobs", json={"model": "demo-image", "prompt": "warm"}).json()["id"])["status"] == "succeeded"
        long = c.post("/v1/jobs", json={"model": "demo-image", "prompt": "long", "steps": 120}).json()
        wait_until(lambda: (c.get(f"/v1/jobs/{long['id']}").json()["progress"] or {}).get("step", 0) >= 1, 60,
                   "the long job to make progress")
        events: list = []
        reader = threading.Thread(target=_stream, args=(srv.url, long["id"], events))
        reader.start()
        openai: dict = {}

        def images() -> None:  # waits on a job that cannot run before the drain ends
            with httpx.Client(base_url=srv.url, timeout=60) as oc:
                openai["r"] = oc.post("/v1/images/generations", json={"model": "slow-lane", "prompt": "never"})

        waiter = threading.Thread(target=images)
        waiter.start()
        wait_until(lambda: c.get("/v1/jobs?limit=5").json()["data"][0]["model"] == "slow-lane", 30, "the OpenAI job")
        wait_until(lambda: any(e[0] == "progress" for e in events), 30, "the stream to be live")
        t0 = _sigterm(srv)
        code = _exit_code(srv, drain_s + 10)
        elapsed = time.monotonic() - t0
        reader.join(10)
        waiter.join(10)
    assert code == 0 and elapsed < drain_s + 5, (code, elapsed, srv.log())
    # The SSE client was told the job went back to the queue, then to reconnect (no id: its
    # Last-Event-ID stays at the last job event).
    names = [e[0] for e in events]
    assert names[-2:] == ["retrying", "reconnect"], names
    assert events[-2][1]["code"] == "interrupted"
    assert events[-1][2] is None and events[-1][3] == 2000
    # The waiting OpenAI call got a clean 503 with Retry-After.
    assert openai["r"].status_code == 503 and openai["r"].headers["retry-after"]
    assert openai["r"].json()["error"]["code"] == "shutting_down"

    srv = LiveServer(data, text, workers=1).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            job = wait_for(c, long["id"], timeout=300)
            assert job["status"] == "succeeded"
            # The interruption is in the history but did not use up an attempt.
            codes = [a["code"] for a in job["attempts"]]
            assert codes == ["interrupted", None], job["attempts"]
            # The OpenAI call's job was canceled: nobody could have fetched its image.
            oa = c.get("/v1/jobs?limit=10").json()["data"]
            assert [j["status"] for j in oa if j["model"] == "slow-lane"] == ["canceled"]
    finally:
        srv.stop()
