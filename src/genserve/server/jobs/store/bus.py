"""Jobs and job events between processes, through the database (PostgreSQL LISTEN/NOTIFY): never a
second queue (DESIGN §6).

Channels:
- ``genserve_jobs`` (payload: a job id): a job was inserted. Sent by a trigger when the insert
  commits (migrations.py), so whoever hears it can read the row. The leading engine listens.
- ``genserve_cancels`` (a job id): a gateway recorded a cancel request; the leading engine acts on it.
- ``genserve_events`` (JSON ``{kind, job_id, now, data}``): a job event, as the SSE streams show it.
  ``queued`` comes from the insert trigger; the leading engine publishes the rest (``EventPublisher``,
  a runtime listener). Every gateway listens and feeds its event hub, so an SSE client on any
  gateway follows any job; all gateways hear one commit order, so they number a job's events alike.

A notification is not stored: a listener that was disconnected missed what was sent meanwhile.
``Listen`` therefore calls ``on_connect`` after every (re)connect, once LISTEN is in place: the
bounded catch-up read of what the listener's owner may have missed (the engine: queued jobs it does
not hold; a gateway: the records of the jobs its streams follow). Nothing is lost between the read
and the notifications: the LISTEN is registered first.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import psycopg

from ..listeners import JOB_EVENTS, Event

log = logging.getLogger("genserve.bus")

JOBS, CANCELS, EVENTS = "genserve_jobs", "genserve_cancels", "genserve_events"
MAX_PAYLOAD = 7900  # PostgreSQL refuses NOTIFY payloads of 8000 bytes or more
RECONNECT_S = (0.2, 0.5, 1.0, 2.0)  # waits between reconnect tries (then the last, repeatedly)


class Listen:
    """One dedicated connection LISTENing on ``channels``; ``on_notify(channel, payload)`` runs in
    the event loop for each notification, ``on_connect()`` after every (re)connect."""

    def __init__(self, dsn: str, channels: tuple[str, ...], on_notify: Callable[[str, str], None],
                 on_connect: Callable[[], None] | None = None) -> None:
        self.dsn, self.channels = dsn, channels
        self.on_notify, self.on_connect = on_notify, on_connect
        self.connected = asyncio.Event()
        self.connects = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                    for ch in self.channels:
                        await conn.execute(f"LISTEN {ch}")
                    failures = 0
                    self.connects += 1
                    self.connected.set()
                    if self.on_connect is not None:
                        self.on_connect()
                    async for n in conn.notifies():
                        try:
                            self.on_notify(n.channel, n.payload)
                        except Exception:  # one bad notification must not end the listening
                            log.exception("handling a notification on %s failed", n.channel)
            except psycopg.Error as e:
                self.connected.clear()
                wait = RECONNECT_S[min(failures, len(RECONNECT_S) - 1)]
                failures += 1
                log.warning("LISTEN connection lost (%s); reconnecting in %gs", e, wait)
                await asyncio.sleep(wait)


def event_payload(ev: Event) -> str:
    """The event as NOTIFY carries it, under PostgreSQL's size limit (a long error message is cut)."""
    data = dict(ev.data)
    body = json.dumps({"kind": ev.kind, "job_id": ev.job_id, "now": ev.now, "data": data})
    if len(body.encode()) > MAX_PAYLOAD and isinstance(data.get("error"), dict):
        data["error"] = {**data["error"], "message": str(data["error"].get("message"))[:1000]}
        body = json.dumps({"kind": ev.kind, "job_id": ev.job_id, "now": ev.now, "data": data})
    if len(body.encode()) > MAX_PAYLOAD:  # nothing else is that big; keep the kind, drop the detail
        body = json.dumps({"kind": ev.kind, "job_id": ev.job_id, "now": ev.now, "data": {}})
    return body


def parse_event(payload: str) -> dict[str, Any] | None:
    try:
        ev = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(ev, dict) or ev.get("kind") not in JOB_EVENTS or not isinstance(ev.get("job_id"), str):
        return None
    return ev


class EventPublisher:
    """A runtime listener on the leading engine: each job event to every gateway. ``queued`` of a
    new job is the insert trigger's; a job re-entered after a failover is announced again
    (``restored``), so streams see that it waits once more. ``progress`` goes out at most every
    ``PROGRESS_INTERVAL_S`` per job (and always for the last step): one NOTIFY per denoising step of
    every running job would be most of the database's traffic on a large fleet."""

    PROGRESS_INTERVAL_S = 0.2

    def __init__(self, notify: Callable[[str, str], None]) -> None:
        self.notify = notify
        self._last_progress: dict[str, float] = {}  # running job -> when its last progress went out

    def on_event(self, ev: Event) -> None:
        if ev.job_id is None or ev.kind not in JOB_EVENTS:
            return
        if ev.kind == "queued" and not ev.data.get("restored"):
            return
        if ev.kind == "progress":
            last = self._last_progress.get(ev.job_id)
            if last is not None and ev.now - last < self.PROGRESS_INTERVAL_S and ev.data.get("step") != ev.data.get("total"):
                return
            self._last_progress[ev.job_id] = ev.now
        else:
            self._last_progress.pop(ev.job_id, None)
        self.notify(EVENTS, event_payload(ev))
