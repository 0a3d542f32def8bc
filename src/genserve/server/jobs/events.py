"""Per-job event history and live subscribers, for Server-Sent Events.

History is kept in memory only while a job is live: its terminal event is handed to the current
subscribers and then the job's history is dropped, so memory follows the live jobs, not every job
ever run. A later subscriber (a finished job, an old job, or after a restart) gets the milestones
rebuilt from the job record by the API.

On shutdown (``close_streams``) every open stream, and any opened after, receives one ``reconnect``
event and ends: the job is durable, so the client reconnects (to this server after its restart, or
to another) with ``Last-Event-ID`` and continues.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from ..status import is_terminal
from .listeners import JOB_EVENTS, Event

RECONNECT = "reconnect"  # not a job event: the stream ends, the client should reconnect


class EventHub:
    """A runtime listener: keeps each live job's events (the SSE stream) and hands them to subscribers."""

    def __init__(self, max_jobs: int = 10_000, retry_ms: int = 2000) -> None:
        self.max_jobs = max_jobs
        self.retry_ms = retry_ms  # what a reconnect event asks clients to wait before reconnecting
        self.history: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.subscribers: dict[str, set[asyncio.Queue]] = {}
        self.closed = False

    def on_event(self, ev: Event) -> None:
        if ev.job_id is not None and ev.kind in JOB_EVENTS:
            self.emit(ev.job_id, ev.kind, dict(ev.data))

    def emit(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        hist = self.history.get(job_id)
        if hist is None:
            hist = self.history[job_id] = []
            while len(self.history) > self.max_jobs:
                self.history.popitem(last=False)
        ev = {"id": len(hist) + 1, "event": event, "data": data}
        hist.append(ev)
        for q in self.subscribers.get(job_id, ()):
            q.put_nowait(ev)
        if is_terminal(event):
            # Current subscribers have it queued; later ones replay from the job record.
            del self.history[job_id]

    def known(self, job_id: str) -> bool:
        return job_id in self.history

    def subscribe(self, job_id: str) -> tuple[list[dict[str, Any]], asyncio.Queue]:
        q: asyncio.Queue = asyncio.Queue()
        if self.closed:
            q.put_nowait(self.reconnect_event())
        self.subscribers.setdefault(job_id, set()).add(q)
        return list(self.history.get(job_id, ())), q

    def unsubscribe(self, job_id: str, q: asyncio.Queue) -> None:
        subs = self.subscribers.get(job_id)
        if subs is not None:
            subs.discard(q)
            if not subs:
                del self.subscribers[job_id]

    def close_streams(self, reason: str = "server shutting down") -> int:
        """End every open stream with a ``reconnect`` event (and any opened from now on). Returns
        how many subscribers were told."""
        self.closed = True
        n = 0
        for subs in self.subscribers.values():
            for q in subs:
                q.put_nowait(self.reconnect_event(reason))
                n += 1
        return n

    def reconnect_event(self, reason: str = "server shutting down") -> dict[str, Any]:
        # No id: the client's Last-Event-ID stays at the last job event it saw.
        return {"id": None, "event": RECONNECT, "data": {"reason": reason, "retry_ms": self.retry_ms}}
