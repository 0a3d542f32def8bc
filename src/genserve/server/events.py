"""Per-job event history and live subscribers, for Server-Sent Events.

History is kept in memory for recent jobs so a late subscriber gets what it missed; for older jobs
(or after a restart) the API rebuilds the milestones from the job record.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from .listeners import JOB_EVENTS, Event


class EventHub:
    """A runtime listener: keeps each job's events (the SSE stream) and hands them to subscribers."""

    def __init__(self, max_jobs: int = 10_000) -> None:
        self.max_jobs = max_jobs
        self.history: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.subscribers: dict[str, set[asyncio.Queue]] = {}

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

    def known(self, job_id: str) -> bool:
        return job_id in self.history

    def subscribe(self, job_id: str) -> tuple[list[dict[str, Any]], asyncio.Queue]:
        q: asyncio.Queue = asyncio.Queue()
        self.subscribers.setdefault(job_id, set()).add(q)
        return list(self.history.get(job_id, ())), q

    def unsubscribe(self, job_id: str, q: asyncio.Queue) -> None:
        subs = self.subscribers.get(job_id)
        if subs is not None:
            subs.discard(q)
            if not subs:
                del self.subscribers[job_id]
