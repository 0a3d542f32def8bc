"""The webhook SSRF defence (issue 11, item 4): every spelling of an internal address is refused
at submit (400 naming ``webhook``) and never delivered; delivery re-resolves and connects to the
address it checked (no DNS rebinding); internal receivers need an explicit opt-in.

Traffic only ever goes to listeners on this machine's loopback, or inside a network namespace
the test creates (public-looking addresses on that namespace's own loopback)."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from genserve.config.network import WebhookPolicy
from genserve.server.jobs.jobstore import JobStore
from genserve.server.jobs.webhooks import WebhookSender
from genserve.server.security.ssrf import Refused, WebhookGuard, embedded_ipv4, is_public, literal_address

from ..http.test_input_hardening import SECRET, with_app


class Listener:
    """A TCP listener that counts connections (and answers 204 to anything HTTP)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    self.requests.append(data)
                    conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener():
    rx = Listener()
    yield rx
    rx.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def refused_spellings(port: int) -> list[str]:
    """Every way we know to say "this machine" or "the internal network"."""
    return [f"http://{h}:{port}/hook" for h in (
        "127.0.0.1", "127.0.0.1.", "127.1", "127.000.000.001", "2130706433", "0x7f.1", "0x7f000001", "0x7F.0.0.1",
        "0177.0.0.1", "017700000001", "localhost", "LOCALHOST", "localhost.", "api.localhost",
        "0.0.0.0", "0", "[::1]", "[0:0:0:0:0:0:0:1]", "[::]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
        "[::127.0.0.1]", "[2002:7f00:1::]", "[64:ff9b::127.0.0.1]", "[::ffff:169.254.169.254]",
        "169.254.169.254", "10.0.0.1", "172.16.0.1", "192.168.1.1", "100.64.0.1", "198.18.0.1", "224.0.0.1",
        "239.255.255.250", "240.0.0.1", "255.255.255.255", "192.0.2.1", "[fe80::1]", "[fc00::1]", "[ff02::1]",
        "[2001:db8::1]", "[fec0::1]", "internal.example", "mixed.example",
    )] + [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        f"http://user:pw@127.0.0.1:{port}/hook", f"http://user:pw@public.example:{port}/hook",
        f"http://@public.example:{port}/hook", f"http://127.0.0.1:{port}@public.example/hook",
        "http://1.2.3.4.5/", "http://256.0.0.1/", "http://0x100000000/", "http://1.2.3.0x100/",
        "ftp://public.example/", "http:///nohost", f"http://public.example:{port}99999/",
    ]


async def fake_resolve(host: str, port: int) -> list[str]:
    table = {"internal.example": ["127.0.0.1"], "mixed.example": ["93.184.215.14", "10.1.2.3"],
             "public.example": ["93.184.215.14"]}
    if host not in table:
        raise socket.gaierror(socket.EAI_NONAME, "unknown")
    return table[host]


# ---- spellings --------------------------------------------------------------------------------------


@pytest.mark.parametrize("host,addr", [
    ("2130706433", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"), ("127.0.0.1.", "127.0.0.1"), ("16909060", "1.2.3.4"), ("1.2.772", "1.2.3.4"),
    ("0", "0.0.0.0"), ("[::ffff:7f00:1]", "::ffff:7f00:1"), ("[fe80::1%25eth0]", "fe80::1"),
])
def test_numeric_hosts_are_read_as_the_address_they_spell(host, addr):
    assert literal_address(host.replace("%25", "%")) == ipaddress.ip_address(addr)


@pytest.mark.parametrize("host", ["example.com", "1.2.3.4.example", "0x7f.example", "localhost"])
def test_names_are_names(host):
    assert literal_address(host) is None


@pytest.mark.parametrize("addr,v4", [
    ("::ffff:127.0.0.1", "127.0.0.1"), ("::127.0.0.1", "127.0.0.1"), ("2002:a00:1::", "10.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "169.254.169.254"), ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),
])
def test_ipv6_addresses_are_judged_by_the_ipv4_they_carry(addr, v4):
    ip = ipaddress.ip_address(addr)
    assert embedded_ipv4(ip) == ipaddress.ip_address(v4)
    assert not is_public(ip)
    assert is_public(ipaddress.ip_address("::ffff:93.184.215.14"))


def test_public_addresses_are_public():
    for a in ("93.184.215.14", "1.1.1.1", "2606:4700:4700::1111", "8.8.8.8"):
        assert is_public(ipaddress.ip_address(a)), a


# ---- refused at submit, never delivered ------------------------------------------------------------


def test_every_internal_spelling_is_400_at_submit_and_nothing_is_stored_or_sent(tmp_path, listener):
    async def test(c, rt):
        rt.webhooks.guard.resolve = fake_resolve
        for url in refused_spellings(listener.port):
            r = await c.post("/v1/jobs", json={"model": "img", "prompt": "a cat", "webhook": url})
            assert r.status_code == 400, (url, r.text)
            assert r.json()["error"]["field"] == "webhook", (url, r.json())
        assert rt.store.recent(10) == []
        ok = await c.post("/v1/jobs", json={"model": "img", "prompt": "a cat",
                                            "webhook": "https://public.example/hook"})
        assert ok.status_code == 202, ok.text  # a public receiver is fine (never contacted: the job never ends)

    with_app(tmp_path, test)
    assert listener.accepted == 0


def run_sender(store, guard, rows, until_done=True):
    async def main():
        sender = WebhookSender(store, SECRET, guard=guard, backoff_s=0.01, max_attempts=2, timeout_s=5)
        sender.start()
        deadline = time.monotonic() + 30
        while store.pending_deliveries() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await sender.close()

    asyncio.run(main())
    return {r["id"]: dict(r) for r in store.db.execute("SELECT * FROM webhook_deliveries")}


def test_stored_deliveries_to_internal_addresses_are_never_sent(tmp_path, listener):
    """Rows an older version queued (or a URL that turned internal since): refused at delivery."""
    store = JobStore(tmp_path / "jobs.db")
    urls = [u for u in refused_spellings(listener.port)]
    for i, url in enumerate(urls):
        store.add_delivery(f"msg_{i}", f"job{i}", url, "completed", "{}", time.time())
    rows = run_sender(store, WebhookGuard(WebhookPolicy(), resolve=fake_resolve), urls)
    assert listener.accepted == 0
    assert all(r["status"] == "failed" and r["attempts"] == 1 for r in rows.values()), rows
    assert all(r["last_error"].startswith("refused: the URL ") for r in rows.values())
    assert not any(w in r["last_error"] for r in rows.values() for w in ("Connect", "HTTP", "Errno"))
    store.close()


def test_dns_rebinding_public_at_submit_loopback_at_delivery_is_not_delivered(tmp_path, listener):
    answers = iter([["93.184.215.14"], ["127.0.0.1"], ["127.0.0.1"], ["127.0.0.1"]])

    async def rebinding(host, port):
        return next(answers)

    guard = WebhookGuard(WebhookPolicy(), resolve=rebinding)
    url = f"http://rebind.example:{listener.port}/hook"
    asyncio.run(guard.check(url))  # the submit-time check saw a public address
    store = JobStore(tmp_path / "jobs.db")
    store.add_delivery("msg_1", "job1", url, "completed", "{}", time.time())
    rows = run_sender(store, guard, [url])
    assert listener.accepted == 0
    assert rows["msg_1"]["status"] == "failed" and rows["msg_1"]["last_error"].startswith("refused")
    store.close()


def test_delivery_connects_to_the_address_it_checked(tmp_path, listener):
    """The resolver is asked once per delivery and the connection goes to that answer, with the
    URL's host in the Host header (here: an allowlisted internal name)."""
    calls = []

    async def resolve(host, port):
        calls.append(host)
        return ["127.0.0.1"]

    guard = WebhookGuard(WebhookPolicy(allow_hosts=frozenset({"hooks.internal"})), resolve=resolve)
    store = JobStore(tmp_path / "jobs.db")
    url = f"http://hooks.internal:{listener.port}/hook"
    store.add_delivery("msg_1", "job1", url, "completed", "{}", time.time())
    rows = run_sender(store, guard, [url])
    assert rows["msg_1"]["status"] == "delivered", rows
    assert calls == ["hooks.internal"] and listener.accepted == 1
    assert f"host: hooks.internal:{listener.port}\r\n".encode() in listener.requests[0].lower()
    store.close()


def test_allowlist_admits_only_what_it_lists(tmp_path, listener):
    async def test(c, rt):
        body = {"model": "img", "prompt": "a cat"}
        r = await c.post("/v1/jobs", json={**body, "webhook": f"http://127.0.0.1:{listener.port}/hook"})
        assert r.status_code == 202, r.text
        for url in (f"http://[::1]:{listener.port}/", f"http://10.0.0.1:{listener.port}/",
                    "http://169.254.169.254/latest/meta-data/"):
            r = await c.post("/v1/jobs", json={**body, "webhook": url})
            assert r.status_code == 400, url
        jid = (await c.post("/v1/jobs", json={**body, "webhook": f"http://2130706433:{listener.port}/hook"})).json()["id"]
        await c.post(f"/v1/jobs/{jid}/cancel")  # completes the job: its webhook is sent
        for _ in range(3000):
            deliveries = (await c.get(f"/v1/jobs/{jid}")).json()["webhook"]["deliveries"]
            if deliveries and deliveries[0]["status"] != "pending":
                break
            await asyncio.sleep(0.01)
        assert deliveries[0]["status"] == "delivered", deliveries

    with_app(tmp_path, test, '[webhooks]\nallow = ["127.0.0.0/8"]\n')
    assert listener.accepted == 1


def test_allow_private_admits_internal_receivers_but_never_the_server_itself(tmp_path, listener):
    own = Listener()  # stands in for the server's own port
    try:
        guard = WebhookGuard(WebhookPolicy(allow_private=True), own_port=own.port)
        asyncio.run(guard.check(f"http://127.0.0.1:{listener.port}/"))
        asyncio.run(guard.check(f"http://10.0.0.1:{own.port}/"))  # another machine's port is its own business
        for url in (f"http://127.0.0.1:{own.port}/v1/models/m/unload", f"http://0x7f.1:{own.port}/",
                    f"http://[::ffff:127.0.0.1]:{own.port}/", f"http://0.0.0.0:{own.port}/"):
            with pytest.raises(Refused):
                asyncio.run(guard.check(url))
        store = JobStore(tmp_path / "jobs.db")
        store.add_delivery("msg_1", "job1", f"http://127.0.0.1:{own.port}/v1/models/m/unload", "completed", "{}",
                           time.time())
        rows = run_sender(store, guard, [])
        assert rows["msg_1"]["status"] == "failed" and own.accepted == 0
        store.close()
    finally:
        own.close()


def _netns_missing() -> str | None:
    """Why this machine cannot make a network namespace for the test, or None when it can."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    return None if probe.returncode == 0 else f"cannot create a network namespace: {probe.stderr.decode()[:200]}"


def test_public_addresses_are_delivered_to_inside_a_private_network_namespace(tmp_path):
    """Public-looking addresses (1.2.3.4, 2606:4700:10::1) live on the loopback of a network
    namespace made for this test, so the deliveries to them stay on this machine. Skipped where no
    namespace can be made, except under .ci/run (GENSERVE_REQUIRE_NETNS), where that is a failure."""
    missing = _netns_missing()
    if missing:
        if os.environ.get("GENSERVE_REQUIRE_NETNS"):
            pytest.fail(f"GENSERVE_REQUIRE_NETNS is set: {missing}")
        pytest.skip(missing)
    script = Path(__file__).with_name("netns_delivery.py")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[3] / "src"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    out = subprocess.run(["unshare", "-rn", sys.executable, str(script), str(tmp_path), SECRET],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["submit"]["name"] == got["submit"]["decimal"] == got["submit"]["v6"] == "ok"
    assert got["submit"]["own_port"] != "ok" and got["submit"]["rebind"] != "ok"
    rows = got["rows"]
    assert {k: s for k, (s, _) in rows.items()} == {
        "name": "delivered", "name6": "delivered", "decimal": "delivered", "v6": "delivered", "tls": "delivered",
        "own_port": "failed", "rebind": "failed", "tls_wrong_name": "failed"}, rows
    assert rows["tls_wrong_name"][1] == "delivery failed"  # the certificate did not match other.example
    received = sorted((r["path"], r["to"], r["host"]) for r in got["received"])
    assert received == sorted([
        ("/name", "1.2.3.4:8080", "hooks.example:8080"),  # connected to the checked address, Host kept
        ("/name6", "2606:4700:10::1:8080", "hooks6.example:8080"),
        ("/decimal", "1.2.3.4:8080", "16909060:8080"),
        ("/v6", "2606:4700:10::1:8080", "[2606:4700:10::1]:8080"),
        ("/tls", "1.2.3.4:8443", "hooks.example:8443"),  # TLS to the pinned address, verified for the name
    ]), received  # nothing reached the server's port or 127.0.0.1
