"""Webhooks: Standard Webhooks signatures, what gets queued, and delivery/retry against a local receiver.

The receiver is a tiny HTTP server on 127.0.0.1 in a thread; the sender runs in ``asyncio.run``.
Every wait is on a condition (the store row or the receiver's log) with a timeout.
"""
import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone

import pytest

from genserve.config.network import WebhookPolicy
from genserve.server.jobs.jobstore import JobStore
from genserve.server.jobs.webhooks import PROGRESS_INTERVAL_S, WebhookSender, sign
from genserve.server.security.ssrf import WebhookGuard

SECRET = "whsec_" + base64.b64encode(b"genserve-test-key-0123456789abcd").decode()


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """A receiver's check, written from the spec (not from genserve's code)."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    sigs = headers["webhook-signature"].split(" ")  # the header may list several, space-separated
    return any(s.startswith("v1,") and hmac.compare_digest(s[3:], expected) for s in sigs)


# ---- sign -------------------------------------------------------------------------------------------


def test_sign_matches_the_published_example():
    # The example from the Standard Webhooks / Svix documentation.
    assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                b'{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize("key,msg_id,ts,body", [
    (b"k" * 24, "msg_1", 1700000000, b'{"a": 1}'),
    (os.urandom(32), "msg_" + "f" * 32, 0, b""),
    (os.urandom(64), "msg_x", 2**31, "{\"prompt\": \"caf\u00e9 \u2615\"}".encode()),
])
def test_sign_matches_an_independent_hmac(key, msg_id, ts, body):
    secret = "whsec_" + base64.b64encode(key).decode()
    mac = hmac.new(key, msg_id.encode() + b"." + str(ts).encode() + b"." + body, hashlib.sha256).digest()
    got = sign(secret, msg_id, ts, body)
    assert got == "v1," + base64.b64encode(mac).decode()
    assert verify(secret, {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": got}, body)
    # any change to id, timestamp, body or key changes the signature
    assert sign(secret, msg_id + "x", ts, body) != got
    assert sign(secret, msg_id, ts + 1, body) != got
    assert sign(secret, msg_id, ts, body + b" ") != got
    assert sign("whsec_" + base64.b64encode(key + b"!").decode(), msg_id, ts, body) != got


# ---- notify: what is queued -------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """Deliveries are rows of the job store: both backends (tests/server/jobs/pg_server.py)."""
    if request.param == "sqlite":
        s = JobStore(tmp_path / "jobs.sqlite")
    else:
        from genserve.server.jobs.store.postgres import PgJobStore

        s = PgJobStore(request.getfixturevalue("pg_database"), 2)
    yield s
    s.close()


ALL = ("started", "progress", "completed")


def test_notify_queues_a_signed_payload_row(store):
    sender = WebhookSender(store, SECRET)
    now = 1_700_000_000.25
    sender.notify("job1", "http://127.0.0.1:9/hook", ALL, "started", {"worker": "w0"}, now)
    [row] = store.pending_deliveries()
    assert row["id"].startswith("msg_") and len(row["id"]) > 8
    assert (row["job_id"], row["url"], row["event"], row["attempts"], row["next_at"]) == (
        "job1", "http://127.0.0.1:9/hook", "started", 0, now)
    payload = json.loads(row["payload"])
    assert payload == {"type": "job.started",
                       "timestamp": datetime.fromtimestamp(now, timezone.utc).isoformat(),
                       "data": {"id": "job1", "worker": "w0"}}
    assert payload["timestamp"].startswith("2023-11-14T22:13:20.25")
    sender.notify("job1", "http://127.0.0.1:9/hook", ALL, "completed", {"status": "succeeded"}, now + 1)
    ids = [r["id"] for r in store.pending_deliveries()]
    assert len(ids) == 2 and len(set(ids)) == 2  # every delivery has its own webhook-id


def test_notify_filters(store):
    sender = WebhookSender(store, SECRET)
    sender.notify("j", None, ALL, "started", {}, 1.0)  # no webhook
    sender.notify("j", "http://127.0.0.1:9/", ("completed",), "started", {}, 1.0)  # not wanted
    sender.notify("j", "http://127.0.0.1:9/", ("completed",), "progress", {"step": 1}, 1.0)
    sender.notify("j", "http://127.0.0.1:9/", (), "completed", {}, 1.0)
    WebhookSender(store, None).notify("j", "http://127.0.0.1:9/", ALL, "completed", {}, 1.0)  # webhooks off
    assert store.pending_deliveries() == []
    sender.notify("j", "http://127.0.0.1:9/", ("completed",), "completed", {}, 1.0)
    assert [r["event"] for r in store.pending_deliveries()] == ["completed"]


def test_progress_is_throttled_per_job(store):
    sender = WebhookSender(store, SECRET)
    url = "http://127.0.0.1:9/"
    t0 = 1000.0
    for dt, step in ((0.0, 1), (0.1, 2), (PROGRESS_INTERVAL_S - 0.01, 3), (PROGRESS_INTERVAL_S, 4),
                     (PROGRESS_INTERVAL_S + 0.2, 5), (2 * PROGRESS_INTERVAL_S + 0.05, 6)):
        sender.notify("a", url, ALL, "progress", {"step": step}, t0 + dt)
    sender.notify("b", url, ALL, "progress", {"step": 1}, t0 + 0.1)  # another job has its own clock
    rows = store.pending_deliveries()
    kept = [(r["job_id"], json.loads(r["payload"])["data"]["step"]) for r in rows]
    assert sorted(kept) == [("a", 1), ("a", 4), ("a", 6), ("b", 1)]
    # other events are never throttled
    sender.notify("a", url, ALL, "started", {}, t0 + 2 * PROGRESS_INTERVAL_S + 0.06)
    sender.notify("a", url, ALL, "completed", {}, t0 + 2 * PROGRESS_INTERVAL_S + 0.07)
    assert [r["event"] for r in store.pending_deliveries() if r["job_id"] == "a"].count("completed") == 1
    # completion forgets the job's progress clock (a job id seen again starts fresh)
    sender.notify("a", url, ALL, "progress", {"step": 7}, t0 + 2 * PROGRESS_INTERVAL_S + 0.08)
    assert ("a", 7) in [(r["job_id"], json.loads(r["payload"])["data"].get("step")) for r in store.pending_deliveries()]


# ---- delivery against a local receiver --------------------------------------------------------------


class Receiver:
    """HTTP server on 127.0.0.1 answering POSTs with ``statuses`` in turn (the last one repeats)."""

    def __init__(self, statuses) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[str, dict[str, str], bytes, float]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with outer.lock:
                    i = len(outer.requests)
                    outer.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                                           time.time()))
                    status = outer.statuses[min(i, len(outer.statuses) - 1)]
                self.send_response(status)
                self.send_header("content-length", "2")
                if 300 <= status < 400:
                    self.send_header("location", "/elsewhere")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/genserve"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def receiver_factory():
    made = []

    def make(*statuses):
        r = Receiver(statuses)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch):
    # httpx honours proxy variables; the receiver is local and must be reached directly.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


async def until(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def row(store, delivery_id):
    if store.backend == "postgres":
        with store.pool.connection() as c:
            return c.execute("SELECT * FROM webhook_deliveries WHERE id = %s", (delivery_id,)).fetchone()
    return store.db.execute("SELECT * FROM webhook_deliveries WHERE id = ?", (delivery_id,)).fetchone()


# The receivers are on 127.0.0.1: these tests opt in to private receivers, as an operator with an
# internal receiver would (the default refuses them: tests/server/security/test_ssrf.py).
LOOPBACK_OK = WebhookGuard(WebhookPolicy(allow_private=True))


def run_sender(store, body, **kw):
    async def main():
        sender = WebhookSender(store, SECRET, **{"guard": LOOPBACK_OK, **kw})
        sender.start()
        try:
            return await body(sender)
        finally:
            await sender.close()

    return asyncio.run(main())


def test_delivered_on_2xx_with_verifiable_headers(store, receiver_factory):
    rx = receiver_factory(204)

    async def body(sender):
        await asyncio.sleep(0)  # the delivery task is idle, waiting for work
        t0 = time.time()
        sender.notify("job1", rx.url, ALL, "completed", {"status": "succeeded"}, t0)
        [pending] = store.pending_deliveries()
        r = await until(lambda: (x := row(store, pending["id"]))["status"] == "delivered" and x, what="delivered")
        return pending, r, t0

    pending, r, t0 = run_sender(store, body, backoff_s=0.05)
    assert rx.count() == 1
    path, headers, raw, _ = rx.requests[0]
    assert path == "/hooks/genserve"
    assert raw == pending["payload"].encode()
    assert json.loads(raw)["data"] == {"id": "job1", "status": "succeeded"}
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"] == pending["id"]
    assert abs(int(headers["webhook-timestamp"]) - t0) <= 60
    assert verify(SECRET, headers, raw)
    assert not verify("whsec_" + base64.b64encode(b"another key").decode(), headers, raw)
    assert (r["attempts"], r["last_error"]) == (1, None)
    assert r["delivered"] is not None and r["delivered"] >= t0


def test_500_is_retried_with_backoff_then_delivered(store, receiver_factory):
    rx = receiver_factory(500, 503, 200)

    async def body(sender):
        sender.notify("job1", rx.url, ALL, "started", {}, time.time())
        [pending] = store.pending_deliveries()
        return await until(lambda: (x := row(store, pending["id"]))["status"] == "delivered" and x, what="delivered")

    r = run_sender(store, body, backoff_s=0.02)
    assert rx.count() == 3
    assert r["attempts"] == 3 and r["last_error"] is None
    ids = {h["webhook-id"] for _, h, _, _ in rx.requests}
    assert ids == {r["id"]}  # retries keep the webhook-id, so receivers can deduplicate
    assert all(verify(SECRET, h, b) for _, h, b, _ in rx.requests)
    times = [t for *_, t in rx.requests]
    assert times[1] - times[0] >= 0.02 * 0.9 - 0.005  # first retry waits backoff_s (±10% jitter)
    assert times[2] - times[1] >= 0.04 * 0.9 - 0.005  # the next one twice that


def test_500_schedules_the_next_attempt_in_the_future(store, receiver_factory):
    rx = receiver_factory(500)

    async def body(sender):
        sender.notify("job1", rx.url, ALL, "started", {}, time.time())
        [pending] = store.pending_deliveries()
        r = await until(lambda: (x := row(store, pending["id"]))["attempts"] == 1 and x, what="first attempt")
        return r, time.time()

    r, seen = run_sender(store, body, backoff_s=30.0)
    assert r["status"] == "pending"
    assert r["last_error"] == "delivery failed"  # not the receiver's status: no port scanning
    assert r["delivered"] is None
    first = rx.requests[0][3]
    assert 30.0 * 0.9 - 0.5 <= r["next_at"] - first <= 30.0 * 1.1 + 5  # backoff_s ±10% jitter (+ slack for a slow CI)
    assert r["next_at"] > seen
    assert rx.count() == 1  # nothing was sent again before next_at
    assert [d["id"] for d in store.pending_deliveries()] == [r["id"]]  # still pending: a restart resumes it


def test_retries_stop_after_max_attempts(store, receiver_factory):
    rx = receiver_factory(500)

    async def body(sender):
        sender.notify("job1", rx.url, ALL, "completed", {}, time.time())
        [pending] = store.pending_deliveries()
        return await until(lambda: (x := row(store, pending["id"]))["status"] == "failed" and x, what="failed")

    r = run_sender(store, body, backoff_s=0.01, max_attempts=3)
    assert (r["attempts"], r["last_error"]) == (3, "delivery failed")
    assert rx.count() == 3
    assert store.pending_deliveries() == []


@pytest.mark.parametrize("status", [400, 404, 302])
def test_other_answers_are_final(store, receiver_factory, status):
    rx = receiver_factory(status)

    async def body(sender):
        sender.notify("job1", rx.url, ALL, "completed", {}, time.time())
        [pending] = store.pending_deliveries()
        return await until(lambda: (x := row(store, pending["id"]))["status"] != "pending" and x, what="final")

    r = run_sender(store, body, backoff_s=0.01)
    assert (r["status"], r["attempts"], r["last_error"]) == ("failed", 1, "delivery failed")
    assert rx.count() == 1  # a redirect is not followed either


def test_429_is_retried(store, receiver_factory):
    rx = receiver_factory(429, 200)

    async def body(sender):
        sender.notify("job1", rx.url, ALL, "completed", {}, time.time())
        [pending] = store.pending_deliveries()
        return await until(lambda: (x := row(store, pending["id"]))["status"] != "pending" and x, what="final")

    r = run_sender(store, body, backoff_s=0.01)
    assert (r["status"], r["attempts"]) == ("delivered", 2)
    assert rx.count() == 2


def test_connection_errors_are_retried(store):
    with socket.socket() as s:  # a port on 127.0.0.1 nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def body(sender):
        sender.notify("job1", f"http://127.0.0.1:{port}/", ALL, "completed", {}, time.time())
        [pending] = store.pending_deliveries()
        return await until(lambda: (x := row(store, pending["id"]))["status"] != "pending" and x, what="final")

    r = run_sender(store, body, backoff_s=0.01, max_attempts=2, timeout_s=5.0)
    assert (r["status"], r["attempts"]) == ("failed", 2)
    assert r["last_error"] == "delivery failed"  # the same as an answer: nothing tells ports apart


def test_pending_rows_from_before_a_restart_are_delivered(store, receiver_factory):
    rx = receiver_factory(200)
    now = time.time()
    store.add_delivery("msg_old1", "job1", rx.url, "completed", '{"type": "job.completed"}', now - 5)
    store.add_delivery("msg_old2", "job2", rx.url, "started", '{"type": "job.started"}', now - 4)
    store.update_delivery("msg_old2", attempts=2, last_error="HTTP 500")

    async def body(sender):
        return await until(lambda: not store.pending_deliveries(), what="all delivered")

    run_sender(store, body, backoff_s=0.01)
    assert sorted(h["webhook-id"] for _, h, _, _ in rx.requests) == ["msg_old1", "msg_old2"]
    assert row(store, "msg_old2")["attempts"] == 3  # counting on from the stored attempts
    assert all(verify(SECRET, h, b) for _, h, b, _ in rx.requests)


def test_as_a_listener_it_forwards_a_watched_jobs_events_and_forgets_it_when_done(tmp_path):
    from genserve.server.jobs.listeners import Event

    store = JobStore(tmp_path / "jobs.db")
    sender = WebhookSender(store, SECRET)
    sender.watch("j1", "http://127.0.0.1:9/hook", ("started", "completed"))
    sender.on_event(Event("queued", 1.0, "j1", {"model": "m"}))  # not a webhook event
    sender.on_event(Event("started", 2.0, "j1", {"batch_id": "b"}))
    sender.on_event(Event("progress", 3.0, "j1", {"step": 1, "total": 2}))  # not wanted by this job
    sender.on_event(Event("started", 2.0, "j2", {"batch_id": "b"}))  # an unwatched job
    sender.on_event(Event("failed", 4.0, "j1", {"status": "failed"}))
    sender.on_event(Event("succeeded", 5.0, "j1", {"status": "succeeded"}))  # after the end: ignored
    rows = store.deliveries("j1")
    assert [r["event"] for r in rows] == ["started", "completed"] and not store.deliveries("j2")
    payload = json.loads(store.pending_deliveries()[-1]["payload"])
    assert payload["type"] == "job.completed" and payload["data"] == {"id": "j1", "status": "failed"}
    store.close()
