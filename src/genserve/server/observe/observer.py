"""The observer: metrics, device usage and job logs, as a listener of the runtime's events.

It reads what the events carry and the read models it is given (``FleetView`` for workers,
``JobReader`` for stats windows); it never writes the job store. The arithmetic lives in the pure
modules (``cost``, ``usage``, ``stats``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import generate_latest

from ..jobs.cost import cost_usd
from ..jobs.listeners import Event
from ..jobs.views import FleetView, JobReader
from ..status import JobStatus, is_terminal
from .metrics import Metrics, Snapshot, StateCollector, nvml_stats
from .stats import breakdown, timeseries, window_stats
from .usage import UsageLedger

log = logging.getLogger("genserve.jobs")

BUSY_WINDOW_S = 60.0


class Observer:
    def __init__(self, prices: Mapping[str, float], models: Mapping[str, Any], fleet: FleetView, jobs: JobReader,
                 clock: Callable[[], float]) -> None:
        self.prices = prices
        self.models = models  # name -> ModelConfig
        self.fleet = fleet
        self.jobs = jobs
        self.clock = clock
        self.metrics = Metrics()
        self.metrics.registry.register(StateCollector(self.snapshot))
        self.usage = UsageLedger()
        self._up: set[str] = set()  # workers the ledger knows are up

    def on_event(self, ev: Event) -> None:
        handler = _HANDLERS.get(ev.kind)
        if handler is not None:
            handler(self, ev)
        elif is_terminal(ev.kind) and ev.record is not None:
            self._job_finished(ev.record)

    # ---- event handlers --------------------------------------------------------------------------

    def _queued(self, ev: Event) -> None:
        log.info("job queued", extra={"job_id": ev.job_id, "model": ev.data.get("model"), "stage": "queued"})

    def _batch_dispatched(self, ev: Event) -> None:
        d = ev.data
        self.metrics.batch_size.labels(d["model"]).observe(len(d["job_ids"]))
        for j in d["job_ids"]:
            log.info("job dispatched", extra={"job_id": j, "batch_id": d["batch_id"], "worker": d["worker"],
                                              "model": d["model"], "stage": "dispatched",
                                              "timings": {"batch_size": len(d["job_ids"]), "cold": d["cold"]}})

    def _lora_used(self, ev: Event) -> None:
        """A job's adapters on its worker: each a hit (resident, tier ``device``) or a load."""
        for tier in ev.data.get("tiers") or ():
            if tier == "device":
                self.metrics.lora_hits.inc()
            else:
                self.metrics.lora_loads.labels(tier).inc()

    def _model_loaded(self, ev: Event) -> None:
        msg = ev.data
        if msg.get("cached"):
            return
        model, tier = msg["model"], msg.get("tier") or "disk"
        took = max(0.0, msg["load_end"] - msg["load_start"])
        if msg.get("compiles"):
            self.metrics.compiles.labels(model, "load").inc(msg["compiles"])
        self.metrics.cold_starts.labels(model, tier).inc()
        self.metrics.cold_start_seconds.labels(model, tier).observe(took)
        log.info("model loaded", extra={"worker": msg["worker"], "model": model, "stage": "loaded", "tier": tier,
                                        "timings": {"load_s": took, "bytes": msg.get("bytes")}})

    def _recompiled(self, ev: Event) -> None:
        self.metrics.compiles.labels(ev.data["model"], "recompile").inc(ev.data["compiles"])
        log.warning("recompiled", extra={"worker": ev.data["worker"], "model": ev.data["model"], "stage": "recompiled",
                                         "timings": {"compiles": ev.data["compiles"]}})

    def _retrying(self, ev: Event) -> None:
        if ev.record is None:
            return
        code = ev.data["code"]
        self.metrics.retries.labels(ev.record["model"], code).inc()
        log.warning("job requeued", extra={"job_id": ev.job_id, "model": ev.record["model"], "stage": "requeued",
                                           "code": code})

    def _job_finished(self, job: Mapping[str, Any]) -> None:
        model, status = job["model"], job["status"]
        self.metrics.jobs.labels(model, status, job["error_code"] or "none").inc()
        spans = breakdown(job)
        if status == JobStatus.SUCCEEDED:
            self._execution(model, job.get("execution") or {})
            self.metrics.latency.labels(model).observe(spans["total"] or 0.0)
            for stage in ("queue_wait", "cold_start", "inference", "output_write"):
                if spans[stage] is not None:
                    self.metrics.stage.labels(model, stage).observe(spans[stage])
        log.info(f"job {status}", extra={"job_id": job["id"], "batch_id": job["batch_id"], "worker": job["worker"],
                                         "model": model, "stage": "finished", "status": status,
                                         "code": job["error_code"], "timings": _rounded(spans)})

    def _execution(self, model: str, ex: Mapping[str, Any]) -> None:
        if ex.get("prompt_cache") in ("hit", "miss"):
            self.metrics.prompt_cache.labels(model, ex["prompt_cache"]).inc()
        if ex.get("cache"):
            method = ex["cache"].get("method", "?")
            self.metrics.cache_steps.labels(model, method, "computed").inc(ex.get("steps_computed") or 0)
            self.metrics.cache_steps.labels(model, method, "reused").inc(ex.get("steps_reused") or 0)

    def _batch_ended(self, ev: Event) -> None:
        d = ev.data
        for c in d["charges"]:
            self.metrics.device_seconds.labels(c["model"], d["device_type"]).inc(c["device_seconds"])
            self.metrics.cost.labels(c["model"], d["device_type"]).inc(c["cost_usd"])
            log.info("job charged", extra={"job_id": c["job_id"], "batch_id": d["batch_id"], "worker": d["worker"],
                                           "model": c["model"], "stage": "charged",
                                           "device_seconds": c["device_seconds"], "cost_usd": c["cost_usd"]})

    def _synced(self, ev: Event) -> None:
        """Bring the usage ledger in line with the fleet (up, busy, resident). Runs after every
        engine step, so transitions are recorded within the same event-loop turn."""
        up = self.fleet.up_workers()
        for wid, dtype, busy, resident in up:
            if wid not in self._up:
                self.usage.worker_up(wid, dtype, ev.now)
                self._up.add(wid)
            self.usage.resident(wid, resident, ev.now)
            (self.usage.busy if busy else self.usage.idle)(wid, ev.now)
        for wid in list(self._up - {w[0] for w in up}):
            self.usage.worker_down(wid, ev.now)
            self._up.discard(wid)

    # ---- reads (API, /metrics) -------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        now = self.clock()
        s = Snapshot()
        views = self.fleet.worker_views(now)
        dtype = {v.id: v.device_type for v in views}
        for name in self.models:
            s.queue_depth[(name, "any")] = self.fleet.queue_depth(name)
        for model, worker, n in self.fleet.jobs_waiting_for_loads():
            k = (model, dtype.get(worker, "cpu"))
            s.queue_depth[k] = s.queue_depth.get(k, 0) + n
        s.workers = {"starting": 0, "idle": 0, "busy": 0}
        for v in views:
            s.workers["starting" if not v.up else ("busy" if v.busy else "idle")] += 1
            if v.running_model is not None:
                s.running_jobs[(v.id, v.running_model)] = v.running_jobs
            if v.up:
                s.lora_resident_bytes[(v.id,)] = sum(a["bytes"] for a in v.resident_loras)
            for r in v.resident:
                k = (r.model, v.device_type)
                s.models_resident[k] = s.models_resident.get(k, 0) + 1
        for wid, u in self.usage.totals(now).items():
            s.busy_s[(wid, u.device_type)] = u.busy_s
            for kind, secs in (("warm", u.idle_warm_s), ("empty", u.idle_empty_s)):
                k = (u.device_type, kind)
                s.idle_cost[k] = s.idle_cost.get(k, 0.0) + cost_usd(secs, self.prices.get(u.device_type, 0.0))
        for wid, u in self.usage.window(now - BUSY_WINDOW_S, now).workers.items():
            s.busy_fraction[(wid, u.device_type)] = u.busy_fraction
        s.gpu = nvml_stats({v.id: v.device for v in views})
        return s

    def prometheus_text(self) -> bytes:
        return generate_latest(self.metrics.registry)

    def stats(self, window_s: float, now: float) -> dict[str, Any]:
        since = now - window_s
        recs = self.jobs.active_since(since)
        n_workers = max(1, len(self.fleet.worker_views(now)))
        out = window_stats(recs, since, now, n_workers=n_workers, usage=self.usage.window(since, now),
                           prices=self.prices, models=self.models)
        for name, st in out["models"].items():
            st["queue_depth"] = self.fleet.queue_depth(name) if name in self.models else 0
        return out

    def series(self, window_s: float, step_s: float, now: float) -> list[dict[str, Any]]:
        since = now - window_s
        return timeseries(self.jobs.active_since(since), since, now, step_s,
                          utilization=self.usage.series(since, now, step_s))


_HANDLERS: dict[str, Callable[[Observer, Event], None]] = {
    "queued": Observer._queued, "batch_dispatched": Observer._batch_dispatched, "model_loaded": Observer._model_loaded,
    "retrying": Observer._retrying, "batch_ended": Observer._batch_ended, "synced": Observer._synced,
    "recompiled": Observer._recompiled,
    "lora_used": Observer._lora_used,
}


def _rounded(spans: dict[str, float | None]) -> dict[str, float]:
    return {f"{k}_s": round(v, 4) for k, v in spans.items() if v is not None}
