"""Failover with real processes on PostgreSQL (docs/ha.md): 2 gateways + 2 engines with local
workers; 100 tiny jobs submitted across both gateways; the leading engine (and its workers) killed
with SIGKILL midway, then one gateway killed mid-submit. Every job acknowledged ends, and succeeds
exactly once (one successful attempt, one output); an SSE stream opened on the other gateway before
the kill ends with its job's terminal event; the standby leads within 10 s."""
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from genserve.bench.live import LiveServer, wait_until

pytestmark = pytest.mark.slow

JOBS = 100


def ha_config(models: Path, dsn: str) -> str:
    return f"""
[server]
heartbeat_s = 1.0

[store]
backend = "postgres"
dsn = "{dsn}"

[models.demo-image]
kind = "image"
source = "{models / 'demo-image'}"
max_batch_size = 8
max_wait_ms = 50
max_queue = 10000
sizes = ["64x64"]
default_size = "64x64"
default_steps = 2
max_steps = 400
default_guidance = 1.0
"""


def start(data_dir: Path, config: str, role: str, workers: int = 1) -> LiveServer:
    return LiveServer(data_dir, config, workers=workers, extra_args=["--role", role]).start()


def engine_state(srv: LiveServer) -> dict | None:
    try:
        return httpx.get(srv.url + "/readyz", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None


def kill9(srv: LiveServer) -> None:
    os.killpg(srv.proc.pid, signal.SIGKILL)  # the process and its workers, as a machine crash would
    srv.proc.wait()
    srv.proc = None
    srv._log.close()


def follow(url: str, job_id: str, out: list) -> None:
    """Read one SSE stream to its end: (event, data) per message."""
    with httpx.Client(base_url=url, timeout=300) as c, c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        ev = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                ev = line[6:].strip()
            elif line.startswith("data:"):
                out.append((ev, json.loads(line[5:])))


def test_leader_killed_mid_load_every_job_succeeds_once(demo_models, tmp_path, pg_database):
    data = tmp_path / "shared"  # one results directory for every process (S3 on a real cluster)
    config = ha_config(demo_models, pg_database)
    servers: list[LiveServer] = []
    try:
        e1 = start(data, config, "engine")
        servers.append(e1)
        wait_until(lambda: (engine_state(e1) or {}).get("ready") and engine_state(e1)["leader"], 120, "e1 leading")
        e2 = start(data, config, "engine")
        servers.append(e2)
        assert engine_state(e2)["leader"] is False
        g1, g2 = start(data, config, "gateway", 0), start(data, config, "gateway", 0)
        servers += [g1, g2]

        # A long job, followed on gateway 2 from before the kill to its end.
        with httpx.Client(base_url=g1.url, timeout=30) as c:
            long_job = c.post("/v1/jobs", json={"model": "demo-image", "prompt": "long", "steps": 40}).json()["id"]
        stream: list = []
        reader = threading.Thread(target=follow, args=(g2.url, long_job, stream), daemon=True)
        reader.start()
        wait_until(lambda: any(e == "queued" for e, _ in stream), 30, "the stream to start")

        accepted: dict[int, str] = {}  # job number -> id, once a gateway answered 202 (or replayed it)
        lock = threading.Lock()
        leader_killed, gateway_killed = threading.Event(), threading.Event()
        kill_at: list[float] = []

        led_at: list[float] = []

        def watch_standby() -> None:  # from the kill: when does the standby say it leads?
            wait_until(lambda: (engine_state(e2) or {}).get("leader"), 30, "the standby to lead", every=0.02)
            led_at.append(time.monotonic())

        def submit(i: int) -> None:
            body = {"model": "demo-image", "prompt": f"job {i}", "seed": i, "id": f"job-{i}"}
            order = [g1, g2] if i % 2 else [g2, g1]
            for attempt in range(40):
                srv = order[attempt % 2]
                if srv.proc is None:
                    continue
                try:
                    r = httpx.post(srv.url + "/v1/jobs", json=body, timeout=30)
                except httpx.HTTPError:
                    continue  # that gateway died: the same client id, to the other one
                if r.status_code in (200, 201, 202):
                    with lock:
                        accepted[i] = r.json()["id"]
                        n = len(accepted)
                    if n == JOBS // 2 and not leader_killed.is_set():
                        leader_killed.set()
                        kill_at.append(time.monotonic())
                        kill9(e1)
                        threading.Thread(target=watch_standby, daemon=True).start()
                    if n == 3 * JOBS // 4 and not gateway_killed.is_set():
                        gateway_killed.set()
                        kill9(g1)
                    return
            raise AssertionError(f"job {i} was never accepted")

        with ThreadPoolExecutor(6) as ex:
            list(ex.map(submit, range(JOBS)))
        assert len(accepted) == JOBS and leader_killed.is_set() and gateway_killed.is_set()

        # The standby leads, and says so, within 10 s of the kill.
        wait_until(lambda: led_at, 30, "the standby to lead")
        failover_s = led_at[0] - kill_at[0]
        assert failover_s < 10.0
        print(f"standby leading {failover_s:.2f}s after the kill")

        def all_done():
            with psycopg.connect(pg_database) as db:
                return db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()[0] == 0
        wait_until(all_done, 300, "every job to end")

        with psycopg.connect(pg_database) as db:
            jobs = db.execute("SELECT id, client_id, status, results FROM jobs").fetchall()
            wins = dict(db.execute("SELECT job_id, COUNT(*) FROM attempts WHERE code IS NULL AND ended IS NOT NULL"
                                   " GROUP BY job_id").fetchall())
            crashed = db.execute("SELECT COUNT(*) FROM attempts WHERE code = 'worker_crashed'").fetchone()[0]
        by_client = {cid: (jid, status, json.loads(res)) for jid, cid, status, res in jobs}
        assert len(jobs) == JOBS + 1  # no job twice (client ids), none lost
        for i, jid in accepted.items():
            got = by_client[f"job-{i}"]
            assert got[0] == jid and got[1] == "succeeded", (i, got)
            assert wins.get(jid) == 1, (i, wins.get(jid))  # exactly one successful attempt
            assert len(got[2]) == 1 and (data / "results" / got[2][0]["key"]).is_file()
        print(f"{crashed} attempt(s) ended by the kill")

        reader.join(timeout=120)
        assert not reader.is_alive()
        assert stream[-1][0] == "succeeded", stream[-3:]
        assert wins.get(long_job) == 1
    finally:
        for s in servers:
            if s.proc is not None:
                s.stop(kill=True)
