"""Webhook delivery: signed per Standard Webhooks, persisted, retried with exponential backoff.

Every delivery is a row in SQLite before anything is sent, so a restart resumes what was pending.
One asyncio task sends what is due and sleeps until the next row is due or a new one arrives (no
polling). Retries keep the same ``webhook-id``, so receivers can drop duplicates.

Where a webhook may go is ssrf.py's decision, made at submit and again at every delivery, which
connects to the address it checked. What a job's owner sees of a failed delivery is a class
("delivery failed", "refused: …"), never the receiver's status or the connection error: those
would make webhooks a port scanner; the server log has the detail.

Signature (https://www.standardwebhooks.com): ``webhook-signature: v1,<base64 HMAC-SHA256>`` over
``"<webhook-id>.<webhook-timestamp>.<body>"``, keyed with the base64 part of ``whsec_<base64>``.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import httpx

from ...config.network import WebhookPolicy
from ...engine.policies.retry import Backoff
from ..security.ssrf import Refused, WebhookGuard
from ..status import is_terminal
from .store.interface import Store
from .listeners import Event

log = logging.getLogger("genserve.webhooks")

PROGRESS_INTERVAL_S = 0.5  # progress events to one job's webhook are at least this far apart
MAX_BACKOFF_S = 300.0


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def _retryable(status: int | None) -> bool:
    """Connection errors, timeouts, 5xx and 429 are worth another try; other answers are final."""
    return status is None or status >= 500 or status == 429


class WebhookSender:
    def __init__(self, store: Store, secret: str | None, *, guard: WebhookGuard | None = None,
                 max_attempts: int = 8, backoff_s: float = 1.0, timeout_s: float = 10.0,
                 tls_verify: Any = True) -> None:
        self.store = store
        self.guard = guard or WebhookGuard(WebhookPolicy())  # the default: public receivers only
        self.secret = secret
        self.max_attempts = max_attempts
        self.backoff = Backoff(first_s=backoff_s, base_s=2 * backoff_s, factor=2.0, max_s=MAX_BACKOFF_S, jitter=0.1)
        self.timeout_s = timeout_s
        self.tls_verify = tls_verify  # httpx's ``verify``: True (system CAs) or a CA bundle / SSLContext
        self._hooks: dict[str, tuple[str, tuple[str, ...]]] = {}  # live job id -> (url, events it wants)
        self._last_progress: dict[str, float] = {}
        self._inflight: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None

    # ---- producing ---------------------------------------------------------------------------------

    def watch(self, job_id: str, url: str, events: tuple[str, ...]) -> None:
        """The job asked for signed events at ``url``: its events from now on are delivered."""
        self._hooks[job_id] = (url, tuple(events))

    def on_event(self, ev: Event) -> None:
        """A runtime listener: a watched job's started / progress / terminal ("completed") events."""
        hook = self._hooks.get(ev.job_id or "")
        if hook is None:
            return
        done = is_terminal(ev.kind)
        self.notify(ev.job_id, hook[0], hook[1], "completed" if done else ev.kind, dict(ev.data), ev.now)
        if done:  # nothing of a finished job stays in memory (its deliveries are rows in the store)
            del self._hooks[ev.job_id]
            self._last_progress.pop(ev.job_id, None)

    def notify(self, job_id: str, url: str | None, wanted: tuple[str, ...], event: str, data: dict[str, Any],
               now: float) -> None:
        """Queue ``event`` (started | progress | completed) for the job's webhook, if it wants it."""
        if url is None or event not in wanted or self.secret is None:
            return
        if event == "progress":
            if now - self._last_progress.get(job_id, float("-inf")) < PROGRESS_INTERVAL_S:
                return
            self._last_progress[job_id] = now
        elif event == "completed":
            self._last_progress.pop(job_id, None)
        payload = {"type": f"job.{event}", "timestamp": datetime.fromtimestamp(now, timezone.utc).isoformat(),
                   "data": {"id": job_id, **data}}
        self.store.add_delivery(f"msg_{uuid.uuid4().hex}", job_id, url, event, json.dumps(payload), now)
        if self._wake is not None:
            self._wake.set()

    # ---- delivering --------------------------------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        # No redirects (a 30x to an internal address would bypass the check), no proxy from the
        # environment (the pinned address must be what the connection goes to), and no kept-alive
        # connections: the pool is keyed by the pinned address, so a TLS connection verified for
        # one host name could otherwise carry a request for another name on the same address.
        self._client = httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False, trust_env=False,
                                         limits=httpx.Limits(max_keepalive_connections=0), verify=self.tls_verify)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._client is not None:
            await self._client.aclose()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            now = time.time()
            rows = [r for r in self.store.pending_deliveries() if r["id"] not in self._inflight]
            for r in rows:
                if r["next_at"] <= now:
                    self._inflight.add(r["id"])
                    asyncio.get_running_loop().create_task(self._deliver(r))
            later = [r["next_at"] for r in rows if r["next_at"] > now]
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(later) - now if later else None)
            except asyncio.TimeoutError:
                pass

    async def _deliver(self, row: dict[str, Any]) -> None:
        assert self._client is not None and self.secret is not None and self._wake is not None
        body = row["payload"].encode()
        ts = int(time.time())
        headers = {"content-type": "application/json", "user-agent": "genserve-webhooks",
                   "webhook-id": row["id"], "webhook-timestamp": str(ts),
                   "webhook-signature": sign(self.secret, row["id"], ts, body)}
        status: int | None = None
        error = "delivery failed"  # all the job's owner learns (see the module docstring)
        try:
            target = await self.guard.target(row["url"])
            headers["host"] = target.host_header
            ext = {"sni_hostname": target.server_name} if target.server_name else {}
            resp = await self._client.post(target.url, content=body, headers=headers, extensions=ext)
            status, detail = resp.status_code, f"HTTP {resp.status_code}"
        except Refused as e:
            status, error, detail = 0, f"refused: the URL {e.reason}", "refused by the webhook policy"
        except httpx.HTTPError as e:
            detail = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 — a bad URL must not kill the delivery task
            detail = f"{type(e).__name__}: {e}"
            status = 0
        if not (status is not None and 200 <= status < 300):
            log.info("webhook %s for job %s to %s: %s", row["id"], row["job_id"], row["url"], detail)
        attempts = row["attempts"] + 1
        now = time.time()
        try:
            if status is not None and 200 <= status < 300:
                self.store.update_delivery(row["id"], status="delivered", attempts=attempts, delivered=now,
                                           last_error=None)
            elif _retryable(status) and attempts < self.max_attempts:
                self.store.update_delivery(row["id"], attempts=attempts, last_error=error,
                                           next_at=now + self.backoff.delay(attempts, row["id"]))
            else:
                log.warning("webhook %s for job %s gave up after %d attempts: %s", row["id"], row["job_id"],
                            attempts, detail)
                self.store.update_delivery(row["id"], status="failed", attempts=attempts, last_error=error)
        finally:
            self._inflight.discard(row["id"])
            self._wake.set()
