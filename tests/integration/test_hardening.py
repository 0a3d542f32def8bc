"""Hardening against a real server (uvicorn, worker processes, the demo model): a job whose input
breaks the pipeline fails alone while its batch-mates succeed, and the body limit holds on a real
socket while the health check keeps answering."""
from __future__ import annotations

import socket
import time

import httpx
import pytest

from genserve.bench.live import LiveServer, post_concurrently, wait_for, wait_until

from .test_failures import FAULTS_ON, config

pytestmark = pytest.mark.slow


def test_a_job_whose_input_breaks_the_pipeline_fails_alone_and_its_batch_mates_succeed(demo_models, tmp_path):
    # The worker's pipeline call raises for any batch holding a prompt with POISON in it (as a
    # tokenizer does for an input it cannot take); four jobs arrive together and share a batch.
    cfg = config(demo_models, faults='[faults]\nfail_prompt = "POISON"\nlives = 99', max_wait_ms=1500)
    with LiveServer(tmp_path, cfg, workers=1, env=FAULTS_ON) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        bodies = [{"model": "demo-image", "prompt": p, "seed": i}
                  for i, p in enumerate(["a cat", "a POISON dog", "a bird", "a fish"])]
        rs = post_concurrently(srv.url, bodies)
        assert all(r.status_code == 202 for r in rs), [r.text for r in rs]
        jobs = [wait_for(c, r.json()["id"]) for r in rs]
        statuses = {j["params"]["prompt"]: j["status"] for j in jobs}
        assert statuses == {"a cat": "succeeded", "a POISON dog": "failed", "a bird": "succeeded",
                            "a fish": "succeeded"}, statuses
        bad = jobs[1]
        assert bad["error"]["code"] == "internal" and bad["error"]["retryable"] is False
        assert bad["attempts"][-1]["batch_size"] == 1  # it failed alone
        first = {j["attempts"][0]["batch_id"] for j in jobs}
        assert len(first) == 1 and jobs[0]["attempts"][0]["batch_size"] == 4  # they did share a batch
        for j in (jobs[0], jobs[2], jobs[3]):
            assert j["attempts"][0]["code"] == "internal"  # the shared batch failed...
            assert j["attempts"][-1]["code"] is None  # ...and each ran again without the poison
            assert j["batch"]["id"] != bad["batch"]["id"]


def test_body_limit_on_a_real_socket(demo_models, tmp_path):
    cfg = config(demo_models) + "\n[http]\nmax_body_bytes = 65536\n"
    with LiveServer(tmp_path, cfg, workers=1) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        host, port = "127.0.0.1", srv.port
        # Declares 200 MB: refused before a byte of it is read.
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 209715200\r\n\r\n" + b"{" * 1024)
            head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
        # Chunked, no length: counted as it arrives; the server answers 413 once past the limit.
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (16384, b" " * 16384)
            got = b""
            sent = 0
            deadline = time.monotonic() + 20
            s.settimeout(0.05)
            while b"\r\n\r\n" not in got and time.monotonic() < deadline:
                try:
                    s.sendall(chunk)
                    sent += 16384
                except OSError:
                    pass
                try:
                    got += s.recv(4096)
                except (TimeoutError, socket.timeout):
                    pass
                except OSError:
                    break
                assert c.get("/healthz").status_code == 200  # the server keeps answering meanwhile
        assert got.startswith(b"HTTP/1.1 413"), got[:200]
        assert sent < 4 << 20  # it did not read on for megabytes
        assert c.get("/v1/jobs").json()["data"] == []  # nothing was stored


def _read_response(s: socket.socket) -> bytes:
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def test_half_open_connections_are_closed_and_connections_are_capped(demo_models, tmp_path):
    # issue 22.4: headers never finished held a connection forever, and nothing capped their number.
    cfg = config(demo_models, server="header_timeout_s = 1.0\nmax_connections = 6")
    with LiveServer(tmp_path, cfg, workers=0) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        addr = ("127.0.0.1", srv.port)
        # Half-open: a request line and one header, never the blank line that ends them; and a
        # connection that sends nothing at all. Both are closed (recv sees EOF) after the timeout.
        idle = socket.create_connection(addr, timeout=30)
        with socket.create_connection(addr, timeout=30) as s:
            start = time.monotonic()
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            assert s.recv(4096) == b""  # closed by the server (the old server never closed it: a timeout here)
            assert time.monotonic() - start >= 0.9  # not before header_timeout_s
        assert idle.recv(4096) == b""
        idle.close()
        # Six connections held open the honest way (headers complete, the body still to come)...
        held: list[socket.socket] = []

        def hold_six() -> None:
            """Six held connections. One the server answered (a 503 while a connection closed above
            was still counted: the server sees that close a moment later) is replaced."""
            for h in list(held):
                h.setblocking(False)
                try:
                    answered = h.recv(4096) is not None
                except BlockingIOError:
                    answered = False
                h.setblocking(True)
                if answered:
                    held.remove(h)
                    h.close()
            while len(held) < 6:
                h = socket.create_connection(addr, timeout=30)
                h.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n")
                held.append(h)

        try:
            # ...and a seventh connection's request gets 503 with Retry-After and is closed (asked
            # again, bounded, while the six are still being settled).
            deadline = time.monotonic() + 60
            while True:
                hold_six()
                s = socket.create_connection(addr, timeout=30)
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                head = _read_response(s)
                if head.startswith(b"HTTP/1.1 503") or time.monotonic() > deadline:
                    break
                s.close()
            with s:
                assert head.startswith(b"HTTP/1.1 503"), head[:300]
                assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
                assert b"too_many_connections" in head or b"too_many_connections" in s.recv(4096)
            # The probes still answer.
            assert c.get("/healthz").status_code == 200
        finally:
            for s in held:
                s.close()
        # Once they are gone the API answers again.
        assert wait_until(lambda: c.get("/v1/models").status_code == 200, timeout=30, what="API answers again")
