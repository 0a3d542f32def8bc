"""Run inside a fresh network namespace (``unshare -rn``) by test_ssrf.py: public-looking addresses
are put on this namespace's own loopback interface, so deliveries to them never leave the machine
(the namespace has no other interface: nothing can). Prints what each receiver got as JSON."""
from __future__ import annotations

import asyncio
import http.server
import json
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from genserve.config.network import WebhookPolicy
from genserve.server.jobs.jobstore import JobStore
from genserve.server.jobs.webhooks import WebhookSender
from genserve.server.security.ssrf import WebhookGuard

V4, V6 = "1.2.3.4", "2606:4700:10::1"
HOOK_PORT, SERVER_PORT, TLS_PORT = 8080, 9000, 8443
SECRET = sys.argv[2]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Rx(http.server.BaseHTTPRequestHandler):
    got: list[dict] = []

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["content-length"]))
        Rx.got.append({"to": f"{self.server.server_address[0]}:{self.server.server_address[1]}",
                       "path": self.path, "host": self.headers["host"]})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


class V6Server(http.server.ThreadingHTTPServer):
    address_family = __import__("socket").AF_INET6


def serve(cls, addr):
    srv = cls(addr, Rx)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


async def main() -> dict:
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "addr", "add", f"{V4}/32", "dev", "lo")
    sh("ip", "-6", "addr", "add", f"{V6}/128", "dev", "lo", "nodad")
    for addr in ((V4, HOOK_PORT), (V4, SERVER_PORT), ("127.0.0.1", HOOK_PORT)):
        serve(http.server.ThreadingHTTPServer, addr)
    serve(V6Server, (V6, HOOK_PORT))
    # HTTPS: a certificate for hooks.example only, trusted by the sender as its CA.
    tmp = Path(sys.argv[1])
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=hooks.example",
       "-addext", "subjectAltName=DNS:hooks.example", "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    tls = serve(http.server.ThreadingHTTPServer, (V4, TLS_PORT))
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)

    async def resolve(host: str, port: int) -> list[str]:
        return {"hooks.example": [V4], "hooks6.example": [V6], "rebind.example": ["127.0.0.1"],
                "other.example": [V4]}[host]

    store = JobStore(Path(sys.argv[1]) / "jobs.db")
    guard = WebhookGuard(WebhookPolicy(), resolve=resolve, own_port=SERVER_PORT)
    sender = WebhookSender(store, SECRET, guard=guard, backoff_s=0.01, max_attempts=1,
                           tls_verify=str(tmp / "cert.pem"))
    urls = {
        "name": f"http://hooks.example:{HOOK_PORT}/name",
        "name6": f"http://hooks6.example:{HOOK_PORT}/name6",
        "decimal": f"http://16909060:{HOOK_PORT}/decimal",  # 1.2.3.4
        "v6": f"http://[{V6}]:{HOOK_PORT}/v6",
        "own_port": f"http://{V4}:{SERVER_PORT}/v1/models/m/unload",  # this machine, the server's port
        "rebind": f"http://rebind.example:{HOOK_PORT}/rebind",
        "tls": f"https://hooks.example:{TLS_PORT}/tls",  # connects to 1.2.3.4, verifies hooks.example
        "tls_wrong_name": f"https://other.example:{TLS_PORT}/wrong",  # same address, a name the cert lacks
    }
    submit = {}
    for k, url in urls.items():
        try:
            await guard.check(url)
            submit[k] = "ok"
        except ValueError as e:
            submit[k] = str(e)
    sender.start()
    for i, (k, url) in enumerate(urls.items()):
        sender.notify(f"job-{k}", url, ("completed",), "completed", {}, time.time())
    deadline = time.monotonic() + 30
    while store.pending_deliveries() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await sender.close()
    rows = {r["job_id"].removeprefix("job-"): (r["status"], r["last_error"])
            for r in (dict(x) for x in store.db.execute("SELECT * FROM webhook_deliveries"))}
    return {"submit": submit, "rows": rows, "received": Rx.got}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
