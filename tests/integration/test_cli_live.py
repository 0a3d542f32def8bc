"""The CLI against a real server: submit --json/--no-wait/--webhook, jobs filters, cancel, result,
queue position while queued, the event stream surviving a server crash and restart, and the
optional access log."""
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from genserve.bench.live import LiveServer, wait_for, wait_until

from .conftest import catalog

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def gs(*args, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "genserve.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def spawn(args, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "genserve.cli", *args], stdout=subprocess.PIPE,
                            stderr=open(log, "w"), text=True, env=env)


def test_submit_json_result_jobs_cancel(server, client, tmp_path):
    url = ["--url", server.url]
    out = tmp_path / "a.png"
    p = gs("submit", "a json cat", "--steps", "2", "--size", "64x64", "--json", "-o", str(out), *url)
    assert p.returncode == 0, p.stderr
    job = json.loads(p.stdout)
    assert job["status"] == "succeeded" and job["output"] == str(out) and out.read_bytes()[:4] == b"\x89PNG"
    # result ID -o FILE fetches the same bytes again
    again = tmp_path / "again.png"
    p = gs("result", job["id"], "-o", str(again), *url)
    assert p.returncode == 0 and again.read_bytes() == out.read_bytes(), p.stderr
    # --no-wait prints the id at once; the job waits in slow-lane's 10-minute batching window
    p = gs("submit", "waits", "--model", "slow-lane", "--no-wait", *url)
    assert p.returncode == 0, p.stderr
    queued_id = p.stdout.strip()
    assert client.get(f"/v1/jobs/{queued_id}").json()["status"] == "queued"
    p = gs("jobs", "--status", "queued", "--model", "slow-lane", "--json", *url)
    ids = [j["id"] for j in json.loads(p.stdout)]
    assert queued_id in ids and job["id"] not in ids
    p = gs("jobs", "--status", "succeeded", *url)
    assert p.returncode == 0 and job["id"] in p.stdout and queued_id not in p.stdout
    assert p.stdout.splitlines()[0].split()[:3] == ["ID", "STATUS", "MODEL"]
    # a result that does not exist yet is a one-line error, as is a job that is not there
    p = gs("result", queued_id, *url)
    assert p.returncode == 1 and "409 not_ready" in p.stderr and "Traceback" not in p.stderr
    p = gs("cancel", "no-such-job", *url)
    assert p.returncode == 1 and "404 not_found" in p.stderr and "Traceback" not in p.stderr
    p = gs("cancel", queued_id, *url)
    assert p.returncode == 0 and f"job {queued_id}: canceled" in p.stdout, p.stdout + p.stderr
    assert wait_for(client, queued_id)["status"] == "canceled"
    # webhooks need a server secret: the 400 comes back as one line naming the field
    p = gs("submit", "hook", "--webhook", "http://127.0.0.1:9/hook", *url)
    assert p.returncode == 1 and "400" in p.stderr and "webhook" in p.stderr and "Traceback" not in p.stderr
    # the server runs without --access-log: no request lines in its log
    assert "GET /v1/jobs" not in server.log()


def test_queue_position_shown_while_queued(server, client, tmp_path):
    log = tmp_path / "submit.err"
    proc = spawn(["submit", "waits for company", "--model", "slow-lane", "--url", server.url], log)
    try:
        wait_until(lambda: "queued (0 ahead)" in log.read_text(), 60, what="the queue position in the progress line")
        jid = wait_until(lambda: next((j["id"] for j in client.get("/v1/jobs", params={"model": "slow-lane",
                         "status": "queued"}).json()["data"] if j["params"]["prompt"] == "waits for company"), None),
                         30, what="the job")
        client.post(f"/v1/jobs/{jid}/cancel")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert f"job {jid} canceled" in log.read_text()


def test_submit_survives_a_server_crash_and_restart(demo_models, tmp_path):
    text = catalog(demo_models) + """
# Waits 4 s for company: a job is still queued when the server is killed.
[models.patient]
kind = "image"
source = "%s"
max_batch_size = 8
max_wait_ms = 4000
sizes = ["64x64"]
default_steps = 2
""" % (demo_models / "demo-image")
    srv = LiveServer(tmp_path / "srv", text, workers=1, extra_args=["--access-log", "--log-level", "info"]).start()
    log = tmp_path / "submit.err"
    out = tmp_path / "survivor.png"
    proc = spawn(["submit", "survivor", "--model", "patient", "--id", "survivor-1", "-o", str(out),
                  "--url", srv.url], log)
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            wait_until(lambda: any(j["client_id"] == "survivor-1" for j in c.get("/v1/jobs").json()["data"]), 60,
                       what="the job to be stored")
            # the access log is on: request lines reach the server's log, a key in a URL does not
            wait_until(lambda: '"GET /v1/jobs HTTP/1.1" 200' in srv.log(), 30, what="an access-log line")
            secret = "gsk_" + "NotARealKeyButLooksLikeOne0123456789abcdefgh"
            c.get(f"/v1/jobs?limit=1&api_key={secret}")
            wait_until(lambda: '"GET /v1/jobs?limit=1&api_key=[REDACTED] HTTP/1.1"' in srv.log(), 30,
                       what="the redacted access-log line")
            assert secret not in srv.log()
        srv.stop(kill=True)
        wait_until(lambda: "reconnecting" in log.read_text(), 60, what="the client to notice and reconnect")
        srv.start()
        stdout, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.stop()
    err = log.read_text()
    assert proc.returncode == 0, err
    assert stdout.strip() == str(out) and out.read_bytes()[:4] == b"\x89PNG"
    assert "Traceback" not in err
