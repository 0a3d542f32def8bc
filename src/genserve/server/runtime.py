"""The asyncio driver: feeds the engine events with the real clock and carries out its decisions.

No polling loop: it runs on API calls and worker messages, plus one timer armed for
``engine.next_deadline()``.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..config import DEMO_SOURCES, GIB, Config, model_limits
from ..engine import (
    BatchKey,
    CancelRunning,
    Decision,
    Engine,
    FailJob,
    JobDequeued,
    LoadModel,
    Priority,
    RunBatch,
    UnloadModel,
)
from ..requests import JobParams
from ..workers import protocol as P
from ..workers.pool import LocalPool, detect_devices
from .events import EventHub
from .jobstore import JobStore
from .observe import Observer
from .results import LocalResultStore

log = logging.getLogger("genserve.runtime")


class QueueFull(Exception):
    def __init__(self, model: str, retry_after_s: float) -> None:
        super().__init__(f"queue for {model} is full")
        self.model, self.retry_after_s = model, retry_after_s


class IdConflict(Exception):
    pass


@dataclass
class BatchInfo:
    id: str
    worker: str
    key: BatchKey
    job_ids: tuple[str, ...]
    loading: bool


class Runtime:
    def __init__(self, config: Config, *, devices: list[str] | None = None) -> None:
        self.config = config
        data = config.server.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(data / "jobs.db")
        self.results = LocalResultStore(data / "results")
        srv = config.server
        self.engine = Engine(
            model_limits(config), aging_s=srv.aging_s, max_attempts=srv.max_attempts,
            residency=srv.residency, placement=srv.placement, saturation=srv.saturation,
            preload=srv.preload, preload_min_probability=srv.preload_min_probability,
            batch_id_prefix=f"b{secrets.token_hex(3)}",  # unique across restarts sharing one database
        )
        self.events = EventHub()
        self.devices = devices if devices is not None else detect_devices(config.server.workers)
        self.pool = LocalPool(self.devices, str(self.results.root), self._on_message, self._on_exit,
                              cpu_memory_bytes=int(srv.worker_memory_gb * GIB),
                              host_cache_bytes=int(srv.host_cache_gb * GIB))
        self.worker_reported: dict[str, dict[str, Any]] = {}  # what each worker last said of its memory
        self.load_log: list[dict[str, Any]] = []  # recent loads/unloads, newest last (bounded)
        self.batches: dict[str, BatchInfo] = {}
        self.progress: dict[str, tuple[int, int]] = {}
        self.models_ready = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.obs = Observer(self)  # metrics, cost, usage, job logs: one hook per event below

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(None, self._build_demo_models)
        self.models_ready = True
        now = time.time()
        for job in self.store.requeue_unfinished():
            p = job["params"]
            key = JobParams(**p).key
            # Re-entered jobs keep their original queue time, so they keep their place in line.
            self.engine.submit(job["id"], key, Priority.parse(job["priority"]), job["t_queued"] or now, force=True)
            self.events.emit(job["id"], "queued", {"model": job["model"], "priority": job["priority"], "restored": True})
        self.pool.start()

    async def close(self) -> None:
        if self._timer:
            self._timer.cancel()
        await self.pool.close()
        self.store.close()

    def _build_demo_models(self) -> None:
        # In a child process: the server process itself never needs the ML stack loaded.
        for name, m in self.config.models.items():
            if m.source in DEMO_SOURCES:
                out = self.config.model_dir(name)
                if not (out / "model_index.json").exists():
                    log.info("building demo model %s into %s", m.source, out)
                    proc = subprocess.run(
                        [sys.executable, "-m", "genserve.backends.demo", DEMO_SOURCES[m.source], str(out)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    if proc.returncode != 0:
                        raise RuntimeError(f"building demo model {m.source} failed:\n{proc.stderr[-4000:]}")

    @property
    def ready(self) -> bool:
        return self.models_ready and self.pool.all_ready()

    # ---- API-facing ------------------------------------------------------------------------------

    def submit(self, params: JobParams, client_id: str | None) -> tuple[dict[str, Any], bool]:
        """Persist then queue a job. Returns (job record, created)."""
        if client_id is not None:
            existing = self.store.get_by_client_id(client_id)
            if existing is not None:
                return existing, False
        adm = self.engine.admit(params.model)
        if not adm.accepted:
            raise QueueFull(params.model, adm.retry_after_s)
        job_id = uuid.uuid4().hex
        now = time.time()
        self.store.insert(job_id, client_id, params.to_dict(), now)  # durable before acknowledged
        self.engine.submit(job_id, params.key, Priority.parse(params.priority), now)
        self.events.emit(job_id, "queued", {"model": params.model, "priority": params.priority})
        self.obs.job_queued(job_id, params.model, params.priority)
        return self.store.get(job_id), True

    def submit_many(self, params: list[JobParams]) -> list[dict[str, Any]]:
        """Submit jobs that should share a batch: all are queued before the engine decides."""
        adm = self.engine.admit(params[0].model)
        if not adm.accepted or self.engine.queue_depth(params[0].model) + len(params) > self.config.models[params[0].model].max_queue:
            raise QueueFull(params[0].model, adm.retry_after_s or 1.0)
        return [self.submit(p, None)[0] for p in params]

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        job = self.store.get(job_id)
        if job is None or job["status"] in ("succeeded", "failed", "canceled"):
            return job
        self.store.update([job_id], cancel_requested=1)
        self._execute(self.engine.cancel(job_id, time.time()))
        return self.store.get(job_id)

    def queue_position(self, job_id: str) -> int | None:
        return self.engine.queue_position(job_id, time.time())

    def kick(self) -> None:
        """Let the engine decide now (called after API events)."""
        self._pump()

    # ---- the engine loop -------------------------------------------------------------------------

    def _pump(self) -> None:
        now = time.time()
        self._execute(self.engine.step(now))
        self.obs.sync(now)
        self._arm_timer(now)

    def _arm_timer(self, now: float) -> None:
        if self._timer:
            self._timer.cancel()
            self._timer = None
        deadline = self.engine.next_deadline(now)
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_later(max(0.0, deadline - now) + 0.001, self._pump)

    def _execute(self, decisions: list[Decision]) -> None:
        now = time.time()
        for d in decisions:
            if isinstance(d, LoadModel):
                m = self.config.models[d.model]
                spec = {"path": str(self.config.model_dir(d.model)), "kind": m.kind, "dtype": m.dtype}
                log.info("loading %s on %s (%s)", d.model, d.worker, d.reason)
                self.pool.send(d.worker, {"op": P.LOAD, "model": d.model, "spec": spec, "reason": d.reason})
            elif isinstance(d, UnloadModel):
                log.info("unloading %s from %s (%s)", d.model, d.worker, d.reason)
                self._log_residency("unload", d.worker, d.model, reason=d.reason)
                self.pool.send(d.worker, {"op": P.UNLOAD, "model": d.model})
            elif isinstance(d, RunBatch):
                self._run_batch(d, now)
            elif isinstance(d, CancelRunning):
                self.pool.send(d.worker, {"op": P.CANCEL, "batch_id": d.batch_id, "job_ids": list(d.job_ids)})
            elif isinstance(d, JobDequeued):
                self._finish(d.job_id, "canceled", now)
            elif isinstance(d, FailJob):
                self._finish(d.job_id, "failed", now, code=d.code, message=d.message)

    def _run_batch(self, d: RunBatch, now: float) -> None:
        m = self.config.models[d.key.model]
        jobs = [self.store.get(j) for j in d.job_ids]
        # A batch placed behind a preload still in flight waits for that load too.
        resident = self.engine.workers[d.worker].resident.get(d.key.model)
        loading = d.needs_load or bool(resident and resident.loading)
        self.batches[d.batch_id] = BatchInfo(d.batch_id, d.worker, d.key, d.job_ids, loading)
        self.store.update(d.job_ids, status="running", batch_id=d.batch_id, batch_size=len(d.job_ids),
                          worker=d.worker, t_dispatched=now)
        self.obs.batch_dispatched(d.batch_id, d.worker, d.key.model, d.job_ids, d.needs_load, now)
        for j in d.job_ids:
            self.events.emit(j, "started", {"batch_id": d.batch_id, "batch_size": len(d.job_ids), "worker": d.worker,
                                            "cold_start": loading})
        params = {"width": d.key.width, "height": d.key.height, "num_frames": d.key.num_frames,
                  "steps": d.key.steps, "guidance": d.key.guidance, "fps": m.fps}
        payload = [{"id": j["id"], "prompt": j["params"]["prompt"], "negative_prompt": j["params"]["negative_prompt"],
                    "seed": j["params"]["seed"]} for j in jobs]
        self.pool.send(d.worker, {"op": P.RUN, "batch_id": d.batch_id, "model": d.key.model, "kind": m.kind,
                                  "params": params, "jobs": payload})

    def _finish(self, job_id: str, status: str, now: float, *, code: str | None = None, message: str | None = None,
                **extra: Any) -> None:
        self.store.update([job_id], status=status, t_finished=now, error_code=code, error_message=message, **extra)
        self.progress.pop(job_id, None)
        data: dict[str, Any] = {"status": status}
        if code:
            data["error"] = {"code": code, "message": message}
        self.events.emit(job_id, status, data)
        self.obs.job_finished(job_id)

    # ---- worker events ---------------------------------------------------------------------------

    def _on_message(self, worker_id: str, msg: dict[str, Any]) -> None:
        ev = msg["ev"]
        now = time.time()
        batch = self.batches.get(msg.get("batch_id", ""))
        if ev == "ready":
            log.info("worker %s ready on %s (pid %s, %s threads, %.1f MiB)", worker_id, msg["device"], msg["pid"],
                     msg["threads"], msg["capacity_bytes"] / (1 << 20))
            self.engine.worker_up(worker_id, now, msg["capacity_bytes"])
            self.worker_reported[worker_id] = {"used_bytes": 0, "resident": []}
        elif ev == "loaded":
            self.engine.model_loaded(worker_id, msg["model"], msg["bytes"], now)
            self.obs.model_loaded(worker_id, msg)
            if not msg.get("cached"):
                self._log_residency("load", worker_id, msg["model"], tier=msg["tier"], bytes=msg["bytes"],
                                    seconds=round(msg["load_end"] - msg["load_start"], 4))
                rep = self.worker_reported.setdefault(worker_id, {"used_bytes": 0, "resident": []})
                rep["used_bytes"] += msg["bytes"]
                rep["resident"] = sorted({*rep["resident"], msg["model"]})
            for b in self.batches.values():
                if b.worker == worker_id and b.loading and b.key.model == msg["model"]:
                    if not msg.get("cached"):
                        self.store.update(b.job_ids, t_load_start=msg["load_start"], t_load_end=msg["load_end"],
                                          load_tier=msg["tier"])
                    b.loading = False
        elif ev == "unloaded":
            self.worker_reported[worker_id] = {"used_bytes": msg["used_bytes"], "resident": msg["resident"]}
        elif ev == "load_failed":
            self.engine.model_load_failed(worker_id, msg["model"], now)
            log.error("worker %s failed to load %s: %s", worker_id, msg["model"], msg["message"])
        elif ev == "started" and batch:
            live = [j for j in batch.job_ids if not self._is_terminal(j)]
            self.store.update(live, t_inference_start=msg["t"])
        elif ev == "progress" and batch:
            for j in batch.job_ids:
                if not self._is_terminal(j):
                    self.progress[j] = (msg["step"], msg["total"])
                    self.events.emit(j, "progress", {"step": msg["step"], "total": msg["total"]})
        elif ev == "job_canceled":
            self._finish(msg["job_id"], "canceled", msg["t"])
        elif ev == "job_done":
            self.store.update([msg["job_id"]], results=[msg["result"]], t_inference_start=msg["inference_start"],
                              t_inference_end=msg["inference_end"], t_output_written=msg["output_written"])
            self._finish(msg["job_id"], "succeeded", now)
        elif ev == "batch_done" and batch:
            self._end_batch(batch, now, msg.get("peak_bytes", 0))
        elif ev == "batch_failed" and batch:
            for j in batch.job_ids:
                if not self._is_terminal(j):
                    self._finish(j, "failed", now, code=msg["code"], message=msg["message"])
            self._end_batch(batch, now)
        self._pump()

    def _end_batch(self, batch: BatchInfo, now: float, peak_bytes: int = 0) -> None:
        del self.batches[batch.id]
        self.engine.batch_finished(batch.id, now, peak_bytes)
        self.obs.batch_ended(batch.id, batch.worker, batch.job_ids, now)

    def _log_residency(self, action: str, worker: str, model: str, **info: Any) -> None:
        self.load_log.append({"t": time.time(), "action": action, "worker": worker, "model": model, **info})
        del self.load_log[:-500]

    def load_model(self, model: str, worker: str | None) -> list[str]:
        """Operator: load ``model`` (on ``worker`` or wherever it fits). Returns the workers chosen."""
        decisions = self.engine.request_load(model, time.time(), worker)
        self._execute(decisions)
        self._pump()
        return [d.worker for d in decisions if isinstance(d, LoadModel)]

    def unload_model(self, model: str, worker: str | None) -> list[str]:
        decisions = self.engine.request_unload(model, time.time(), worker)
        self._execute(decisions)
        self._pump()
        return [d.worker for d in decisions if isinstance(d, UnloadModel)]

    def _is_terminal(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return job is None or job["status"] in ("succeeded", "failed", "canceled")

    def _on_exit(self, worker_id: str, code: int | None) -> None:
        now = time.time()
        lost = [b for b in self.batches.values() if b.worker == worker_id]
        decisions = self.engine.worker_down(worker_id, now)
        ended = {getattr(d, "job_id", None) for d in decisions}
        for b in lost:
            del self.batches[b.id]
            requeued = [j for j in b.job_ids if j not in ended and not self._is_terminal(j)]
            self.store.update(requeued, status="queued", batch_id=None, batch_size=None, worker=None,
                              t_dispatched=None, t_load_start=None, t_load_end=None, load_tier=None,
                              t_inference_start=None)
            for j in requeued:
                self.progress.pop(j, None)
                self.events.emit(j, "requeued", {"reason": "worker_crashed", "worker": worker_id})
                self.obs.job_requeued(j, "worker_crashed")
        self._execute(decisions)
        log.warning("worker %s lost (exit code %s); %d batch(es) requeued", worker_id, code, len(lost))
        self._pump()
