"""Jobs that a cluster worker which outlived the server still runs (docs/cluster.md).

A server restarted after a crash re-attaches to the Ray actors that survived it. One of them may be
in the middle of a batch the old server dispatched: it finishes that batch (its outputs reach the
result store) before it takes the new server's ``hello`` and says ready again. Those jobs are held
out of the queue meanwhile, their attempt left open; when the worker is ready (or lost) each is
finished with the output it wrote, or queued again if it has none. Queued at once instead, they
would run a second time.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from ..jobs.store.interface import Store
from ..jobs.records import JobRecords
from ..status import JobStatus, is_terminal

log = logging.getLogger("genserve.runtime")


class HeldJobs:
    def __init__(self, store: Store, records: JobRecords,
                 restore: Callable[[dict[str, Any], float], None]) -> None:
        self.store, self.records, self.restore = store, records, restore
        self.held: dict[str, str] = {}  # job id -> the surviving worker still running it

    def __bool__(self) -> bool:
        return bool(self.held)

    def workers(self) -> set[str]:
        """The surviving workers still busy with the old server's batches (up, not yet ready)."""
        return set(self.held.values())

    def hold(self, in_flight: Mapping[str, str]) -> dict[str, str]:
        """On start, before anything is re-queued: the running jobs that a surviving worker says it
        still runs (``pool.in_flight()``)."""
        running = {j["id"] for j in self.store.unfinished() if j["status"] == JobStatus.RUNNING}
        self.held = {j: w for j, w in in_flight.items() if j in running}
        if self.held:
            log.info("%d job(s) still running on workers that outlived the server: held until they finish",
                     len(self.held))
        return self.held

    def release(self, worker_id: str, now: float, reports: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """``worker_id`` is done with what it ran for the old server (ready again) or is lost.
        ``reports``: job id -> the ``job_done`` timings it kept for us (its ``ready`` carries them)."""
        jobs = [j for j, w in self.held.items() if w == worker_id]
        for j in jobs:
            del self.held[j]
            self.records.adopt_output(j, now, "written by a worker that outlived the server", (reports or {}).get(j))
        rest = [j for j in jobs if not is_terminal(self.store.get(j)["status"])]
        if not rest:
            return
        for job in self.store.requeue_unfinished(now, only=rest):
            if job["id"] not in rest:
                continue
            if job.get("cancel_requested"):  # asked while it was held
                self.records.canceled(job["id"], now)
            else:
                self.restore(job, now)
