"""What workers say, turned into engine events and job records: the runtime's half of the worker
protocol (workers/protocol.py) on the way back. Every message ends with an engine step (``pump``);
decisions it returns go to ``execute``. One clock read per message."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from ...engine import Decision, Engine
from ..jobs.listeners import Event
from ..jobs.records import JobRecords
from .fleet import FleetState

log = logging.getLogger("genserve.runtime")


class WorkerEvents:
    def __init__(self, engine: Engine, records: JobRecords, fleet: FleetState, prices: Mapping[str, float],
                 clock: Callable[[], float], execute: Callable[[list[Decision], float], None],
                 pump: Callable[[float], None], publish: Callable[[Event], None]) -> None:
        self.engine, self.records, self.fleet, self.prices, self.clock = engine, records, fleet, prices, clock
        self._execute, self._pump, self._publish = execute, pump, publish

    def on_message(self, worker_id: str, msg: dict[str, Any]) -> None:
        ev = msg["ev"]
        now = self.clock()
        batch = self.engine.running_batch(msg.get("batch_id", ""))
        self.engine.worker_seen(worker_id, now)
        if ev == "heartbeat":
            return self._pump(now)
        for b in self.engine.batches_on(worker_id):  # anything else from a busy worker is a sign of progress
            self.engine.batch_progress(b.id, now)
        if ev == "ready":
            log.info("worker %s ready on %s (pid %s, %s threads, %.1f MiB)", worker_id, msg["device"], msg["pid"],
                     msg["threads"], msg["capacity_bytes"] / (1 << 20))
            self.engine.worker_up(worker_id, now, msg["capacity_bytes"])
            self.fleet.worker_ready(worker_id)
        elif ev == "loaded":
            self._loaded(worker_id, msg, now)
        elif ev == "unloaded":
            self.fleet.unloaded(worker_id, msg)
        elif ev == "load_failed":
            self.engine.model_load_failed(worker_id, msg["model"], now)
            log.error("worker %s failed to load %s: %s", worker_id, msg["model"], msg["message"])
        elif ev == "started" and batch:
            if self.engine.models[batch.key.model].stepped(batch.key):
                return self._pump(now)  # each job reports its own start (job_started)
            self.records.inference_started(list(batch.jobs), msg["t"])
        elif ev == "job_started":
            self.records.inference_started([msg["job_id"]], msg["t"])
        elif ev == "job_paused":
            self._execute(self.engine.job_paused(msg["job_id"], now), now)
        elif ev == "progress" and batch:
            if "jobs" in msg:  # step mode: each job's own count
                for job_id, done, total in msg["jobs"]:
                    self.records.step([job_id], done, total, now)
            else:
                self.records.step(list(batch.jobs), msg["step"], msg["total"], now)
        elif ev == "job_canceled":
            self.engine.job_ended(msg["job_id"], now)
            self.records.canceled(msg["job_id"], msg["t"])
        elif ev == "job_done":
            if msg.get("lora_tiers"):
                self._publish(Event("lora_used", now, msg["job_id"], {"tiers": msg["lora_tiers"], "worker": worker_id}))
            self.engine.job_ended(msg["job_id"], now)
            self.records.output_written(msg["job_id"], msg, now)
        elif ev == "batch_done" and batch:
            if msg.get("compiles"):  # a shape the load's warm-up did not compile: a stall, counted
                self._publish(Event("recompiled", now, data={"worker": worker_id, "model": batch.key.model,
                                                             "compiles": msg["compiles"]}))
            if "loras" in msg:  # the worker's LoRA adapters (measured bytes) replace the engine's plan
                self.engine.loras_reported(worker_id, msg["loras"], now)
            self.fleet.batch_over(batch.id)
            self._execute(self.engine.batch_finished(batch.id, now, msg.get("peak_bytes", 0),
                                                     msg.get("estimated_bytes", 0)), now)
            dtype = self.fleet.device_type(batch.worker)
            self.records.charge(batch, dtype, self.prices.get(dtype, 0.0), now)
        elif ev == "batch_failed" and batch:
            log.warning("batch %s on %s failed: %s: %s", batch.id, worker_id, msg["code"], msg["message"])
            self.fleet.batch_over(batch.id)
            self._execute(self.engine.batch_failed(batch.id, msg["code"], msg["message"], now), now)
        self._pump(now)

    def _loaded(self, worker_id: str, msg: dict[str, Any], now: float) -> None:
        self.engine.model_loaded(worker_id, msg["model"], msg["bytes"], now)
        self._publish(Event("model_loaded", now, data={"worker": worker_id, **msg}))
        for job_ids in self.fleet.loaded(worker_id, msg, now):
            if not msg.get("cached"):  # a batch that waited for a load: its jobs record it
                self.records.model_loaded(job_ids, msg)

    def on_exit(self, worker_id: str, code: int | None) -> None:
        now = self.clock()
        lost = self.engine.batches_on(worker_id)
        for b in lost:
            self.fleet.batch_over(b.id)
            for j in b.job_ids:
                if self.records.adopt_output(j, now, "written before its worker died"):
                    self.engine.job_ended(j, now)
        # Each job still in the engine's batch has a failed attempt: retried or failed by policy.
        self._execute(self.engine.worker_down(worker_id, now), now)
        self.fleet.worker_gone(worker_id)
        log.warning("worker %s lost (exit code %s) with %d batch(es)", worker_id, code, len(lost))
        self._pump(now)
