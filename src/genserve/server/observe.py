"""The observer: the runtime's hooks for metrics, cost accounting, device usage and job logs.

The runtime calls one method per event (a line each); the decisions stay in the engine and the
arithmetic in the pure modules (``cost``, ``usage``, ``stats``). Everything here runs on the event
loop, like the runtime, so it reads the runtime's state without locks.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest

from .cost import apportion, cost_usd, device_type, job_weight
from .metrics import Metrics, Snapshot, StateCollector, nvml_stats
from .stats import breakdown, timeseries, window_stats
from .usage import UsageLedger

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("genserve.jobs")

BUSY_WINDOW_S = 60.0


class Observer:
    def __init__(self, rt: "Runtime") -> None:
        self.rt = rt
        self.prices = rt.config.prices
        self.metrics = Metrics()
        self.metrics.registry.register(StateCollector(self.snapshot))
        self.usage = UsageLedger()
        self._batch_start: dict[str, float] = {}  # batch id -> dispatch time
        self._up: set[str] = set()  # workers the ledger knows are up

    # ---- hooks (called by the runtime) -----------------------------------------------------------

    def job_queued(self, job_id: str, model: str, priority: str) -> None:
        log.info("job queued", extra={"job_id": job_id, "model": model, "stage": "queued"})

    def batch_dispatched(self, batch_id: str, worker: str, model: str, job_ids: tuple[str, ...], cold: bool,
                         now: float) -> None:
        self._batch_start[batch_id] = now
        self.metrics.batch_size.labels(model).observe(len(job_ids))
        for j in job_ids:
            log.info("job dispatched", extra={"job_id": j, "batch_id": batch_id, "worker": worker, "model": model,
                                              "stage": "dispatched", "timings": {"batch_size": len(job_ids), "cold": cold}})

    def model_loaded(self, worker: str, msg: dict[str, Any]) -> None:
        if msg.get("cached"):
            return
        model, tier = msg["model"], msg.get("tier") or "disk"
        took = max(0.0, msg["load_end"] - msg["load_start"])
        self.metrics.cold_starts.labels(model, tier).inc()
        self.metrics.cold_start_seconds.labels(model, tier).observe(took)
        log.info("model loaded", extra={"worker": worker, "model": model, "stage": "loaded", "tier": tier,
                                        "timings": {"load_s": took, "bytes": msg.get("bytes")}})

    def job_requeued(self, job_id: str, reason: str) -> None:
        job = self.rt.store.get(job_id)
        if job is not None:
            self.metrics.retries.labels(job["model"], reason).inc()
            log.warning("job requeued", extra={"job_id": job_id, "model": job["model"], "stage": "requeued", "code": reason})

    def job_finished(self, job_id: str) -> None:
        job = self.rt.store.get(job_id)
        if job is None:
            return
        model, status = job["model"], job["status"]
        self.metrics.jobs.labels(model, status, job["error_code"] or "none").inc()
        spans = breakdown(job)
        if status == "succeeded":
            self.metrics.latency.labels(model).observe(spans["total"] or 0.0)
            for stage in ("queue_wait", "cold_start", "inference", "output_write"):
                if spans[stage] is not None:
                    self.metrics.stage.labels(model, stage).observe(spans[stage])
        log.info(f"job {status}", extra={"job_id": job_id, "batch_id": job["batch_id"], "worker": job["worker"],
                                         "model": model, "stage": "finished", "status": status,
                                         "code": job["error_code"], "timings": _rounded(spans)})

    def batch_ended(self, batch_id: str, worker: str, job_ids: tuple[str, ...], now: float) -> None:
        """Charge the batch's device time (dispatch to end) to its jobs, by work share."""
        jobs = [j for j in (self.rt.store.get(i) for i in job_ids) if j is not None]
        start = self._batch_start.pop(batch_id, None)
        if start is None:
            start = min((j["t_dispatched"] for j in jobs if j["t_dispatched"] is not None), default=now)
        dtype = self._device_type(worker)
        price = self.prices.get(dtype, 0.0)
        weights = [job_weight(j["params"]["width"], j["params"]["height"], j["params"]["num_frames"]) for j in jobs]
        for job, share in zip(jobs, apportion(max(0.0, now - start), weights)):
            c = cost_usd(share, price)
            self.rt.store.update([job["id"]], device_seconds=share, cost_usd=c, device_type=dtype)
            self.metrics.device_seconds.labels(job["model"], dtype).inc(share)
            self.metrics.cost.labels(job["model"], dtype).inc(c)
            log.info("job charged", extra={"job_id": job["id"], "batch_id": batch_id, "worker": worker,
                                           "model": job["model"], "stage": "charged", "device_seconds": share,
                                           "cost_usd": c})

    def sync(self, now: float) -> None:
        """Bring the usage ledger in line with the engine's workers (up, busy, resident). Called after
        every engine step, so transitions are recorded within the same event-loop turn."""
        engine_workers = self.rt.engine.workers
        for wid, st in engine_workers.items():
            if wid not in self._up:
                self.usage.worker_up(wid, self._device_type(wid), now)
                self._up.add(wid)
            self.usage.resident(wid, st.resident, now)
            (self.usage.idle if st.idle else self.usage.busy)(wid, now)
        for wid in list(self._up - set(engine_workers)):
            self.usage.worker_down(wid, now)
            self._up.discard(wid)

    # ---- reads (API, /metrics) -------------------------------------------------------------------

    def _device_type(self, worker: str) -> str:
        h = self.rt.pool.workers.get(worker)
        if h is None:
            return "cpu"
        return device_type(h.device, h.info.get("device_name"), self.prices)

    def snapshot(self) -> Snapshot:
        rt, now = self.rt, time.time()
        s = Snapshot()
        for name in rt.config.models:
            s.queue_depth[(name, "any")] = rt.engine.queue_depth(name)
        for b in rt.batches.values():
            if b.loading:
                k = (b.key.model, self._device_type(b.worker))
                s.queue_depth[k] = s.queue_depth.get(k, 0) + len(b.job_ids)
        s.workers = {"starting": 0, "idle": 0, "busy": 0}
        for wid, h in rt.pool.workers.items():
            st = rt.engine.workers.get(wid)
            state = "starting" if not h.ready or st is None else ("idle" if st.idle else "busy")
            s.workers[state] += 1
            for m in (st.resident if st else ()):
                k = (m, self._device_type(wid))
                s.models_resident[k] = s.models_resident.get(k, 0) + 1
        for wid, u in self.usage.totals(now).items():
            s.busy_s[(wid, u.device_type)] = u.busy_s
            for kind, secs in (("warm", u.idle_warm_s), ("empty", u.idle_empty_s)):
                k = (u.device_type, kind)
                s.idle_cost[k] = s.idle_cost.get(k, 0.0) + cost_usd(secs, self.prices.get(u.device_type, 0.0))
        for wid, u in self.usage.window(now - BUSY_WINDOW_S, now).workers.items():
            s.busy_fraction[(wid, u.device_type)] = u.busy_fraction
        s.gpu = nvml_stats({w: h.device for w, h in rt.pool.workers.items()})
        return s

    def prometheus_text(self) -> bytes:
        return generate_latest(self.metrics.registry)

    def stats(self, window_s: float, now: float) -> dict[str, Any]:
        since = now - window_s
        recs = self.rt.store.active_since(since)
        out = window_stats(recs, since, now, n_workers=max(1, len(self.rt.pool.workers)),
                           usage=self.usage.window(since, now), prices=self.prices, models=self.rt.config.models)
        for name, st in out["models"].items():
            st["queue_depth"] = self.rt.engine.queue_depth(name) if name in self.rt.config.models else 0
        return out

    def series(self, window_s: float, step_s: float, now: float) -> list[dict[str, Any]]:
        since = now - window_s
        return timeseries(self.rt.store.active_since(since), since, now, step_s,
                          utilization=self.usage.series(since, now, step_s))


def _rounded(spans: dict[str, float | None]) -> dict[str, float]:
    return {f"{k}_s": round(v, 4) for k, v in spans.items() if v is not None}
