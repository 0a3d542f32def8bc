"""Retention: deletes what ``[retention]`` says has lived long enough (docs/operations.md).

A periodic sweep, run by the runtime on its event loop (not by the engine, which does no I/O):
  1. results of jobs finished more than ``results_days`` ago: files deleted, record kept
     (``results`` emptied, ``t_results_deleted`` set; the result URL answers 410);
  2. job records finished more than ``jobs_days`` ago: results and record deleted;
  3. while stored result bytes exceed ``max_data_bytes``: the results of the oldest finished jobs.
``DELETE /v1/jobs/{id}`` goes through ``delete_job``. Deletion only ever calls the result store's
``delete(key)`` (for each object a result record names: the output and its thumbnail), so the
local and the S3 stores behave the same.

It is also a runtime listener: a job that succeeds adds its result bytes to the stored total, so
the ``genserve_result_bytes_stored`` gauge is exact without rescanning the store.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ...config.retention import DAY_S, RetentionConfig
from ...storage.results import ResultStore, stored_objects
from ..status import JobStatus, is_terminal
from .store.interface import Store
from .listeners import Event

log = logging.getLogger("genserve.retention")

REASONS = ("results_days", "jobs_days", "max_data_bytes", "api")


class Retention:
    def __init__(self, config: RetentionConfig, store: Store, results: ResultStore, registry: CollectorRegistry,
                 clock: Callable[[], float]) -> None:
        self.config = config
        self.store = store
        self.results = results
        self.clock = clock
        self.stored = store.stored_result_bytes()
        self.stored_gauge = Gauge("genserve_result_bytes_stored", "Bytes of job results in the result store",
                                  registry=registry)
        self.stored_gauge.set_function(lambda: self.stored)
        self.deleted_bytes = Counter("genserve_result_bytes_deleted", "Result bytes deleted, by reason",
                                     ["reason"], registry=registry)
        self.deleted_jobs = Counter("genserve_jobs_deleted", "Job records deleted, by reason", ["reason"],
                                    registry=registry)
        for r in REASONS:  # every series exists from the start: rate() works from the first deletion
            self.deleted_bytes.labels(r)
            self.deleted_jobs.labels(r)
        self._timer: asyncio.TimerHandle | None = None

    # ---- listener ----------------------------------------------------------------------------------

    def on_event(self, ev: Event) -> None:
        if ev.kind == JobStatus.SUCCEEDED and ev.record is not None:
            self.stored += sum(n for r in ev.record["results"] for _key, n in stored_objects(r))

    # ---- the sweep ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self.config.enabled:
            self._timer = asyncio.get_running_loop().call_later(0, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _tick(self) -> None:
        try:
            self.sweep(self.clock())
        except Exception:  # a failed sweep is retried at the next one; it must not stop them
            log.exception("retention sweep failed")
        self._timer = asyncio.get_running_loop().call_later(self.config.sweep_interval_s, self._tick)

    def sweep(self, now: float) -> dict[str, int]:
        """One pass; returns what it deleted: {"results": n, "jobs": n, "bytes": n}. Each query
        takes at most ``sweep_batch`` rows; what is left waits for the next sweep."""
        c, n = self.config, self.config.sweep_batch
        out = {"results": 0, "jobs": 0, "bytes": 0}
        if c.jobs_days is not None:
            for job in self.store.finished_before(now - c.jobs_days * DAY_S, n):
                out["bytes"] += self._delete_results(job["results"], "jobs_days")
                self._delete_inputs(job)
                self.store.delete_job(job["id"])
                self.deleted_jobs.labels("jobs_days").inc()
                out["jobs"] += 1
        if c.results_days is not None:
            for job in self.store.finished_with_results(now - c.results_days * DAY_S, n):
                out["bytes"] += self._results_gone(job, "results_days", now)
                out["results"] += 1
        if c.max_data_bytes is not None and self.stored > c.max_data_bytes:
            for job in self.store.finished_with_results(None, n):  # oldest first
                if self.stored <= c.max_data_bytes:
                    break
                out["bytes"] += self._results_gone(job, "max_data_bytes", now)
                out["results"] += 1
        if out["results"] or out["jobs"]:
            log.info("retention: deleted %d results and %d job records (%d bytes)", out["results"], out["jobs"],
                     out["bytes"])
        return out

    def delete_job(self, job: dict[str, Any]) -> bool:
        """``DELETE /v1/jobs/{id}`` of a finished job: its results, then its record."""
        assert is_terminal(job["status"])
        self._delete_results(job["results"], "api")
        self._delete_inputs(job)
        gone = self.store.delete_job(job["id"])
        if gone:
            self.deleted_jobs.labels("api").inc()
        return gone

    def _results_gone(self, job: dict[str, Any], reason: str, now: float) -> int:
        freed = self._delete_results(job["results"], reason)
        self._delete_inputs(job)
        self.store.results_deleted(job["id"], now)
        return freed

    def _delete_inputs(self, job: dict[str, Any]) -> None:
        """A finished job's stored image inputs (server/jobs/inputs.py) go with its results."""
        from .inputs import input_keys

        for key in input_keys(job.get("params") or {}):
            self.results.delete(key)

    def _delete_results(self, refs: list[dict[str, Any]], reason: str) -> int:
        freed = 0
        for ref in refs:
            for key, size in stored_objects(ref):  # the output and its thumbnail
                freed += self.results.delete(key)
                # The record's size is what the gauge counted, whether or not the file was still there.
                self.stored = max(0, self.stored - size)
        self.deleted_bytes.labels(reason).inc(freed)
        return freed
