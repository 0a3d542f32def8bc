"""One stream of events out of the runtime, and the listeners that consume it (the SSE hub, the
webhook sender, the observer). The runtime publishes; listeners only read what an event carries —
none of them writes job records, which the runtime owns (the webhook sender keeps its own
deliveries table)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# Events about one job, in the order a job can see them; the last three are terminal. These are
# also the SSE event names.
JOB_EVENTS = ("queued", "started", "progress", "retrying", "succeeded", "failed", "canceled")
# Events about the fleet have no job id: "batch_dispatched", "batch_ended" (with each job's charge),
# "model_loaded", "recompiled" (torch.compile compiled during a batch), and "synced" after every
# engine step (the fleet's state may have changed).


@dataclass(frozen=True)
class Event:
    kind: str
    now: float
    job_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)  # what SSE clients see, for job events
    record: Mapping[str, Any] | None = None  # the job's record, on "retrying" and terminal events


class Listener(Protocol):
    def on_event(self, ev: Event) -> None: ...
