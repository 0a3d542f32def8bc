"""Failure drills with a real server and real worker processes, faults injected inside the workers.

Each drill counts jobs submitted / completed / failed / lost / duplicated. Completed: succeeded.
Failed: ended with a specific error code (only where the drill expects it). Lost: accepted but
never reached an end. Duplicated: more than one successful attempt, more than one result, or more
than one file in the job's result directory. The figures are printed (``pytest -s``) and quoted in
docs/failure-handling.md.
"""
import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from genserve.bench.live import LiveServer, wait_for, wait_until

pytestmark = pytest.mark.slow

FAULTS_ON = {"GENSERVE_ENABLE_FAULTS": "1"}
SECRET = "whsec_" + base64.b64encode(b"genserve-test-secret-0123456789").decode()


def config(models: Path, server: str = "", faults: str = "", **image) -> str:
    """A catalog for drills: ``image`` overrides demo-image's keys (max_wait_ms=0, fallback=…)."""
    keys = {"max_batch_size": 8, "max_wait_ms": 300, "default_steps": 2, **image}
    image_keys = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    return f"""
[server]
retry_backoff_s = 0.2
retry_backoff_max_s = 1.0
heartbeat_s = 0.5
{server}

[models.demo-image]
kind = "image"
source = "{models / 'demo-image'}"
sizes = ["64x64"]
default_guidance = 1.0
{image_keys}

[models.backup-image]
kind = "image"
source = "{models / 'demo-image'}"
max_batch_size = 8
sizes = ["64x64"]
default_steps = 2
default_guidance = 1.0

[models.flaky-image]
kind = "image"
source = "{models / 'demo-image'}"
sizes = ["64x64"]
default_steps = 2
default_guidance = 1.0

{faults}
"""


def submit(c: httpx.Client, **body) -> str:
    r = c.post("/v1/jobs", json={"model": "demo-image", "prompt": "a drill", **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def tally(name: str, c: httpx.Client, data_dir: Path, ids: list[str]) -> dict:
    """Submitted / completed / failed / lost / duplicated, from the API and the result store."""
    jobs = [c.get(f"/v1/jobs/{j}").json() for j in ids]
    completed = [j for j in jobs if j["status"] == "succeeded"]
    failed = [j for j in jobs if j["status"] == "failed" and j["error"]["code"]]
    dup = 0
    for j in jobs:
        # outputs only: a job's directory also holds its thumbnail (and its stored inputs)
        files = list((data_dir / "results" / j["id"]).glob("output*")) if (data_dir / "results" / j["id"]).exists() else []
        wins = [a for a in j["attempts"] if a["code"] is None and a["ended"] is not None]
        if len(files) > 1 or len(wins) > 1 or len(j["results"]) > 1:
            dup += 1
    figures = {"submitted": len(ids), "completed": len(completed), "failed": len(failed),
               "lost": len(ids) - len(completed) - len(failed), "duplicated": dup}
    print(f"\nDRILL {name}: " + " ".join(f"{k}={v}" for k, v in figures.items()))
    return figures


def workers(c: httpx.Client) -> dict:
    return {w["id"]: w for w in c.get("/v1/workers").json()["data"]}


def test_oom_on_a_batch_of_8_splits_and_all_8_succeed(demo_models, tmp_path):
    cfg = config(demo_models, faults="[faults]\noom_above_batch = 4\nlives = 99")
    with LiveServer(tmp_path, cfg, workers=1, env=FAULTS_ON) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        # n=8 through the OpenAI route: all 8 are queued before the engine decides, so one batch of 8.
        r = c.post("/v1/images/generations", json={"model": "demo-image", "prompt": "oom", "n": 8})
        assert r.status_code == 200, r.text
        ids = [d["url"].rsplit("/", 2)[-2] for d in r.json()["data"]]
        assert tally("oom-split", c, tmp_path, ids) == {"submitted": 8, "completed": 8, "failed": 0, "lost": 0, "duplicated": 0}
        for j in ids:
            job = c.get(f"/v1/jobs/{j}").json()
            first, last = job["attempts"][0], job["attempts"][-1]
            assert (first["code"], first["batch_size"]) == ("out_of_memory", 8)
            assert last["code"] is None and last["batch_size"] == 4 and job["batch"]["size"] == 4
        # The split did not use up an attempt and the remembered size sticks: the next 8 run as 2 × 4.
        r = c.post("/v1/images/generations", json={"model": "demo-image", "prompt": "oom again", "n": 8})
        assert r.status_code == 200, r.text
        again = [c.get(f"/v1/jobs/{d['url'].rsplit('/', 2)[-2]}").json() for d in r.json()["data"]]
        assert all(j["status"] == "succeeded" and len(j["attempts"]) == 1 for j in again)
        sizes = {}
        for j in again:
            sizes[j["batch"]["id"]] = j["batch"]["size"]
        assert sorted(sizes.values()) == [4, 4], sizes


def test_crash_mid_batch_with_two_workers_loses_nothing_and_quarantines_the_crasher(demo_models, tmp_path):
    # w0 kills itself at the first step of every batch it starts, in every life; after 2 exits it is benched.
    cfg = config(demo_models, server="quarantine_after = 2",
                 faults='[faults]\ncrash_on_batch = 1\nworkers = ["w0"]\nlives = 99',
                 max_batch_size=4, max_wait_ms=200)
    with LiveServer(tmp_path, cfg, workers=2, env=FAULTS_ON) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        ids = [submit(c, seed=i) for i in range(12)]
        first = [wait_for(c, j, timeout=180) for j in ids]
        assert all(j["status"] == "succeeded" for j in first), [(j["status"], j["error"]) for j in first]
        crashed = [j for j in first if any(a["code"] == "worker_crashed" for a in j["attempts"])]
        assert crashed, "w0 never got a batch: the drill did not drill"
        assert all(j["batch"]["worker"] == "w1" for j in crashed)  # retried on the other worker
        assert all(a["worker"] == "w0" for j in crashed for a in j["attempts"] if a["code"])
        # Wait for w0's restart, then keep w1 busy so w0 gets a batch again: its second exit benches it.
        w0 = wait_until(lambda: (w := workers(c)["w0"])["state"] == "idle" and w, 120, what="w0 restarted and idle",
                        every=0.2)
        assert w0["restarts"] == 1
        # 20 steps keep warm w1 busy with the first 4 while the next 4 go to w0.
        more = [submit(c, seed=100 + i, steps=20) for i in range(8)]
        second = [wait_for(c, j, timeout=180) for j in more]
        assert all(j["status"] == "succeeded" for j in second)
        w0 = wait_until(lambda: (w := workers(c)["w0"])["quarantined"] and w, 30, what="w0 quarantined", every=0.2)
        assert w0["state"] == "quarantined" and w0["exits"] == 2
        assert c.get("/readyz").status_code == 200  # w1 still serves
        figures = tally("worker-crash", c, tmp_path, ids + more)
        assert figures == {"submitted": 20, "completed": 20, "failed": 0, "lost": 0, "duplicated": 0}


def test_readyz_is_503_while_the_only_worker_is_down_and_200_once_it_is_back(demo_models, tmp_path):
    # issue 22.3: with every worker down a drill saw /readyz 200 ({"workers": {"w0": false}}).
    with LiveServer(tmp_path, config(demo_models), workers=1) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["workers"] == {"w0": True}
        pid = workers(c)["w0"]["pid"]
        os.kill(pid, signal.SIGKILL)
        down = wait_until(lambda: (r := c.get("/readyz")).status_code == 503 and r, 30, what="/readyz 503",
                          every=0.02)
        assert down.json() == {"ready": False, "draining": False, "role": "all", "workers": {"w0": False}}
        assert c.get("/healthz").status_code == 200  # alive, only not ready
        assert submit(c)  # and it still accepts jobs meanwhile
        up = wait_until(lambda: (r := c.get("/readyz")).status_code == 200 and r, 240, what="/readyz 200 again")
        assert up.json()["workers"] == {"w0": True} and workers(c)["w0"]["pid"] != pid


def test_hang_inside_a_step_times_out_within_deadline_plus_grace_then_next_jobs_run(demo_models, tmp_path):
    cfg = config(demo_models, server="stop_grace_s = 2\nhang_timeout_s = 120",
                 faults="[faults]\nhang_on_batch = 1", max_wait_ms=0)
    with LiveServer(tmp_path, cfg, workers=1, env=FAULTS_ON) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        # Load the model first (an operator load is not a batch): on a busy machine a cold start can
        # take longer than the job's 4 s deadline, and the job would time out before its batch ever
        # reached the step that hangs.
        assert c.post("/v1/models/demo-image/load").json()["loading_on"] == ["w0"]
        wait_until(lambda: any(m["model"] == "demo-image" and not m["loading"]
                               for m in workers(c)["w0"]["resident_models"]), 60, what="demo-image loaded on w0")
        stuck = submit(c, timeout_s=4)
        wait_for(c, stuck, statuses=("running",))
        after = [submit(c, seed=i) for i in range(3)]
        job = wait_for(c, stuck, timeout=60)
        assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
        assert job["timestamps"]["inference_start"] is not None, "the batch never started: the drill did not drill"
        took = job["timestamps"]["finished"] - job["timestamps"]["received"]
        assert 4.0 <= took <= 4.0 + 1.0, took  # failed at its deadline, not at the kill
        assert job["attempts"][-1]["code"] == "timeout"
        # The worker, stuck inside the step, was killed after the grace period and restarted.
        done = [wait_for(c, j, timeout=180) for j in after]
        assert [j["status"] for j in done] == ["succeeded"] * 3
        w0 = workers(c)["w0"]
        assert w0["restarts"] == 1 and not w0["quarantined"]
        log = srv.log()
        assert "killing worker w0: worker did not stop within 2s" in log
        figures = tally("hang", c, tmp_path, [stuck] + after)
        assert figures == {"submitted": 4, "completed": 3, "failed": 1, "lost": 0, "duplicated": 0}


def test_persistent_load_failure_falls_back_and_without_fallback_fails_with_the_code(demo_models, tmp_path):
    cfg = config(demo_models, fallback="backup-image",
                 faults='[faults]\nfail_load = ["demo-image", "flaky-image"]\nlives = 99')
    with LiveServer(tmp_path, cfg, workers=1, env=FAULTS_ON) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        saved = wait_for(c, submit(c), timeout=120)
        assert saved["status"] == "succeeded", saved
        assert saved["model"] == "demo-image" and saved["served_by"] == "backup-image"
        assert [(a["model"], a["code"]) for a in saved["attempts"]] == [
            ("demo-image", "model_load_failed"), ("demo-image", "model_load_failed"), ("backup-image", None)]
        # A backoff separated attempts 2 and 3 (retry_backoff_s = 0.2 ± 20 %).
        assert saved["attempts"][2]["started"] - saved["attempts"][1]["ended"] >= 0.15
        assert all(a["duration_s"] >= 0 and a["worker"] == "w0" for a in saved["attempts"])
        failed = wait_for(c, submit(c, model="flaky-image"), timeout=120)
        assert failed["status"] == "failed" and failed["error"]["code"] == "model_load_failed"
        assert failed["error"]["retryable"] and "attempt 3 of 3" in failed["error"]["message"]
        assert [a["code"] for a in failed["attempts"]] == ["model_load_failed"] * 3
        figures = tally("fallback", c, tmp_path, [saved["id"], failed["id"]])
        assert figures == {"submitted": 2, "completed": 1, "failed": 1, "lost": 0, "duplicated": 0}


def test_kill_9_of_the_server_with_100_queued_jobs_all_complete_after_restart(demo_models, tmp_path):
    cfg = config(demo_models, max_wait_ms=0, default_steps=4)
    srv = LiveServer(tmp_path, cfg, workers=1).start()
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        ids = [submit(c, id=f"drill-{i}", seed=i) for i in range(100)]
    srv.stop(kill=True)
    killed_at = time.time()
    srv = LiveServer(tmp_path, cfg, workers=1).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            done = [wait_for(c, j, timeout=300) for j in ids]
            assert all(j["status"] == "succeeded" for j in done)
            # Clients retrying their submissions after the crash see the same jobs, not new ones.
            again = [c.post("/v1/jobs", json={"model": "demo-image", "prompt": "a drill", "id": f"drill-{i}", "seed": i})
                     for i in range(100)]
            assert [r.json()["id"] for r in again] == ids
            assert all(r.headers.get("idempotent-replayed") == "true" for r in again)
            figures = tally("server-kill-9", c, tmp_path, ids)
            before = sum(any(a["code"] is None and a["ended"] < killed_at for a in j["attempts"]) for j in done)
            interrupted = sum(any(a["message"] == "the server stopped during the attempt" for a in j["attempts"])
                              for j in done)
            print(f"DRILL server-kill-9: {before} completed before the kill, {interrupted} were running, "
                  f"{100 - before - interrupted} were queued")
            assert before < 100  # the kill landed mid-drill
            assert figures == {"submitted": 100, "completed": 100, "failed": 0, "lost": 0, "duplicated": 0}
            assert len(list((tmp_path / "results").iterdir())) == 100
    finally:
        srv.stop()


class Receiver:
    """A local webhook endpoint that answers from a script (503 / 429 / 200) and records requests."""

    def __init__(self, refuse: int) -> None:
        self.refuse = refuse  # refuse this many requests first (-1: all, until changed)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                refused = outer.refuse != 0
                outer.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                                       "refused": refused, "at": time.time()})
                if outer.refuse > 0:
                    outer.refuse -= 1
                self.send_response((503 if len(outer.requests) % 2 else 429) if refused else 204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self, event: str | None = None) -> list[dict]:
        return [r for r in self.requests if not r["refused"]
                and (event is None or json.loads(r["body"])["type"] == f"job.{event}")]

    def wait(self, n: int, event: str, timeout: float = 60) -> list[dict]:
        """The accepted ``job.<event>`` deliveries, once there are at least ``n``."""
        return wait_until(lambda: len(got := self.accepted(event)) >= n and got, timeout,
                          what=f"{n} accepted job.{event} webhook(s)", every=0.05)


def verify(req: dict, secret: str = SECRET) -> bool:
    """Standard Webhooks verification, written from the spec (not the server's code)."""
    h = req["headers"]
    key = base64.b64decode(secret[len("whsec_"):])
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + req["body"]
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    if abs(time.time() - int(h["webhook-timestamp"])) > 300:
        return False
    return any(hmac.compare_digest(sig.split(",", 1)[1], expected) for sig in h["webhook-signature"].split())


def test_webhooks_signed_retried_throttled_and_persisted_across_kill_9(demo_models, tmp_path):
    cfg = config(demo_models, server=f'webhook_secret = "{SECRET}"\nwebhook_backoff_s = 0.2',
                 max_wait_ms=0, max_steps=400)
    hook = Receiver(refuse=2)
    cfg += f'\n[webhooks]\nallow = ["{hook.url.split("/")[2].split(":")[0]}/32"]  # the receiver is on loopback\n'
    srv = LiveServer(tmp_path, cfg, workers=1).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            # Refused twice (503, then 429), delivered on the third try, signed, same id each time.
            job = wait_for(c, submit(c, webhook=hook.url))
            [ok] = hook.wait(1, "completed")
            assert len(hook.requests) == 3 and [r["refused"] for r in hook.requests] == [True, True, False]
            assert len({r["headers"]["webhook-id"] for r in hook.requests}) == 1
            assert all(verify(r) for r in hook.requests)
            assert not verify(ok, "whsec_" + base64.b64encode(b"another-secret-entirely-xx").decode())
            tampered = dict(ok, body=ok["body"].replace(b"succeeded", b"failed"))
            assert not verify(tampered)
            payload = json.loads(ok["body"])
            assert payload["data"]["id"] == job["id"] and payload["data"]["status"] == "succeeded"
            [delivery] = c.get(f"/v1/jobs/{job['id']}").json()["webhook"]["deliveries"]
            assert delivery["status"] == "delivered" and delivery["attempts"] == 3

            # All events: started, progress (≥ 500 ms apart), completed. 120 steps take a second or more on a CPU.
            hook.refuse, hook.requests = 0, []
            slow = wait_for(c, submit(c, webhook=hook.url, webhook_events=["started", "progress", "completed"],
                                      steps=120), timeout=180)
            hook.wait(1, "completed")
            types = [json.loads(r["body"])["type"] for r in hook.accepted()]
            # Deliveries are concurrent (no ordering promise): count them instead.
            assert types.count("job.started") == 1 and types.count("job.completed") == 1 and slow["status"] == "succeeded"
            progress = [r["at"] for r in hook.accepted("progress")]
            assert progress and all(b - a >= 0.45 for a, b in zip(progress, progress[1:]))
            assert len(progress) < 120  # throttled, not one per step

            # A pending delivery survives a kill -9 of the server.
            hook.refuse, hook.requests = -1, []
            pending = wait_for(c, submit(c, webhook=hook.url))["id"]
            wait_until(lambda: hook.requests, 30, what="a first (refused) delivery attempt", every=0.05)
            assert not hook.accepted()
        srv.stop(kill=True)
        hook.refuse = 0
        srv = LiveServer(tmp_path, cfg, workers=1).start()
        [late] = hook.wait(1, "completed")
        assert json.loads(late["body"])["data"]["id"] == pending and verify(late)
        assert late["headers"]["webhook-id"] == hook.requests[0]["headers"]["webhook-id"]
    finally:
        srv.stop()
        hook.server.shutdown()


def test_fault_injection_is_refused_unless_enabled(demo_models, tmp_path):
    cfg = tmp_path / "genserve.toml"
    cfg.write_text(config(demo_models, faults="[faults]\ncrash_on_batch = 1"))
    p = subprocess.run([sys.executable, "-m", "genserve.cli", "serve", "--config", str(cfg), "--data-dir",
                        str(tmp_path / "d")], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "GENSERVE_ENABLE_FAULTS"})
    assert p.returncode == 2 and "faults: fault injection is for tests" in p.stderr
