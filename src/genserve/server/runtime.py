"""The asyncio driver: feeds the engine events with the real clock and carries out its decisions.

No polling loop: it runs on API calls and worker messages, plus one timer armed for
``engine.next_deadline()`` (batching windows, retry backoffs, deadlines, hang checks).

Failure handling (docs/failure-handling.md) is the engine's decisions (RetryJob, FailJob,
KillWorker) carried out here: every attempt is recorded, a job is finished at most once, and an
output already written by a dead worker (or before a server crash) is adopted, never redone.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..config import DEMO_SOURCES, GIB, Config, model_limits
from ..engine import (
    Backoff,
    BatchKey,
    CancelRunning,
    Decision,
    Engine,
    ErrorCode,
    FailJob,
    JobDequeued,
    KillWorker,
    Liveness,
    LoadModel,
    Priority,
    RestartPolicy,
    RetryJob,
    RetireWorker,
    RetryPolicy,
    RunBatch,
    ScaleTo,
    UnloadModel,
)
from ..engine.autoscale import Autoscaler, ScaleLimits
from ..requests import JobParams
from ..workers import protocol as P
from ..workers.pool import LocalPool, detect_devices
from .events import EventHub
from .jobstore import TERMINAL, JobStore
from .observe import Observer
from ..storage import OUTPUT_TYPES, LocalResultStore, ResultRef, output_name
from .webhooks import WebhookSender

log = logging.getLogger("genserve.runtime")


class QueueFull(Exception):
    def __init__(self, model: str, retry_after_s: float) -> None:
        super().__init__(f"queue for {model} is full")
        self.model, self.retry_after_s = model, retry_after_s


@dataclass
class BatchInfo:
    id: str
    worker: str
    key: BatchKey
    job_ids: tuple[str, ...]
    loading: bool
    live: set[str] = field(default_factory=set)  # jobs not yet terminal; ``_finish`` removes them


def _engine(config: Config) -> Engine:
    s = config.server
    retry = RetryPolicy(
        max_attempts=s.max_attempts, fallback_after=s.fallback_after,
        backoff=Backoff(first_s=0.0, base_s=s.retry_backoff_s, factor=2.0, max_s=s.retry_backoff_max_s, jitter=0.2),
        fallbacks={name: m.fallback for name, m in config.models.items() if m.fallback},
    )
    return Engine(
        model_limits(config), aging_s=s.aging_s, retry=retry, autoscaler=_autoscaler(config),
        liveness=Liveness(s.hang_timeout_s, s.heartbeat_timeout_s, s.stop_grace_s),
        residency=s.residency, placement=s.placement, saturation=s.saturation,
        preload=s.preload, preload_min_probability=s.preload_min_probability,
        batch_id_prefix=f"b{secrets.token_hex(3)}",  # unique across restarts sharing one database
    )


def _autoscaler(config: Config) -> Autoscaler | None:
    a = config.autoscale
    if a is None:
        return None
    price = a.price_per_hour if a.price_per_hour is not None else config.prices.get("cpu", 0.0)
    limits = ScaleLimits(a.min_devices, a.max_devices, price, a.budget_per_hour, a.scale_down_delay_s, a.interval_s)
    return Autoscaler(a.policy, limits, **a.params)


def initial_devices(config: Config, detected: list[str]) -> list[str]:
    """The fleet to start with. With autoscaling, the provider may start up to ``max_devices``
    (never more GPUs than exist) and begins with ``server.workers`` clamped to the limits."""
    a = config.autoscale
    if a is None:
        return detected
    if detected and detected[0].startswith("cuda"):
        return detected[: max(a.min_devices, min(len(detected), a.max_devices))]
    return ["cpu"] * max(a.min_devices, min(config.server.workers, a.max_devices))


class Runtime:
    def __init__(self, config: Config, *, devices: list[str] | None = None) -> None:
        self.config = config
        s = config.server
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(s.data_dir / "jobs.db")
        self.results = LocalResultStore(s.data_dir / "results")
        self.engine = _engine(config)
        self.events = EventHub()
        self.webhooks = WebhookSender(self.store, s.webhook_secret, max_attempts=s.webhook_max_attempts,
                                      backoff_s=s.webhook_backoff_s)
        detected = devices if devices is not None else detect_devices(s.workers)
        self.gpus = [d for d in detected if d.startswith("cuda")]
        self.devices = initial_devices(config, detected)
        faults = config.faults
        self.pool = LocalPool(self.devices, str(self.results.root), self._on_message, self._on_exit,
                              heartbeat_s=s.heartbeat_s,
                              restart=RestartPolicy(quarantine_after=s.quarantine_after, window_s=s.quarantine_window_s),
                              faults=faults.for_worker if faults else None,
                              cpu_memory_bytes=int(s.worker_memory_gb * GIB),
                              host_cache_bytes=int(s.host_cache_gb * GIB))
        self.worker_reported: dict[str, dict[str, Any]] = {}  # what each worker last said of its memory
        self.load_log: list[dict[str, Any]] = []  # recent loads/unloads, newest last (bounded)
        self.batches: dict[str, BatchInfo] = {}
        self._hooks: dict[str, tuple[str, tuple[str, ...]]] = {}  # job id -> (webhook url, events), live jobs
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
        # Outputs written just before a crash (worker or server) are adopted, not produced again.
        for job in self.store.unfinished():
            self._adopt_output(job["id"], now, "found after a restart")
        for job in self.store.requeue_unfinished(now):
            params = JobParams.from_dict(job["params"])
            self._watch_hooks(job["id"], params)
            # Re-entered jobs keep their original queue time (their place in line), their deadline
            # and the attempts they have used.
            self.engine.submit(job["id"], params.key, Priority.parse(job["priority"]), job["t_queued"] or now,
                               force=True, deadline=self._deadline(params, job["t_received"]),
                               attempts=job["attempts"])
            self.events.emit(job["id"], "queued", {"model": job["model"], "priority": job["priority"], "restored": True})
        self.webhooks.start()
        self.pool.start()
        self._pump()

    async def close(self) -> None:
        if self._timer:
            self._timer.cancel()
        await self.pool.close()
        await self.webhooks.close()
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
        self._watch_hooks(job_id, params)
        self.engine.submit(job_id, params.key, Priority.parse(params.priority), now,
                           deadline=self._deadline(params, now))
        self.events.emit(job_id, "queued", {"model": params.model, "priority": params.priority})
        self.obs.job_queued(job_id, params.model, params.priority)
        return self.store.get(job_id), True

    def _deadline(self, params: JobParams, received: float) -> float:
        return received + (params.timeout_s or self.config.models[params.model].timeout_s)

    def _watch_hooks(self, job_id: str, params: JobParams) -> None:
        if params.webhook is not None:
            self._hooks[job_id] = (params.webhook, params.webhook_events)

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
            try:
                self._carry_out(d, now)
            except Exception:  # one decision failing must not drop the ones after it
                log.exception("carrying out %r failed", d)

    def _carry_out(self, d: Decision, now: float) -> None:
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
            self._finish(d.job_id, "canceled", now, code=ErrorCode.CANCELED, message="canceled by request")
        elif isinstance(d, FailJob):
            self._finish(d.job_id, "failed", now, code=d.code, message=d.message)
        elif isinstance(d, RetryJob):
            self._retry(d, now)
        elif isinstance(d, ScaleTo):
            self._scale_to(d)
        elif isinstance(d, RetireWorker):
            log.info("retiring worker %s (%s)", d.worker, d.reason)
            self.pool.retire(d.worker)
        elif isinstance(d, KillWorker):
            log.warning("killing worker %s: %s", d.worker, d.message)
            self.pool.kill(d.worker)

    def _scale_to(self, d: ScaleTo) -> None:
        """The local provider: start worker processes until ``d.devices`` are up or starting (GPU
        workers only on GPUs not already in use). Surplus ones are retired by the engine, one by one."""
        active = self.pool.active()
        log.info("autoscale: want %d devices, have %d (%s)", d.devices, len(active), d.reason)
        for _ in range(d.devices - len(active)):
            if self.gpus:
                used = {w.device for w in self.pool.workers.values() if not w.quarantined}  # retiring ones too
                free = [g for g in self.gpus if g not in used]
                if not free:
                    break
                self.pool.add_worker(free[0])
            else:
                self.pool.add_worker("cpu")

    def _retry(self, d: RetryJob, now: float) -> None:
        self.store.end_attempt(d.job_id, d.code, d.message, now)
        self.store.update([d.job_id], status="queued", attempts=d.attempts, batch_id=None, batch_size=None,
                          worker=None, t_dispatched=None, t_load_start=None, t_load_end=None, load_tier=None,
                          t_inference_start=None, t_inference_end=None)
        self.progress.pop(d.job_id, None)
        self.obs.job_requeued(d.job_id, d.code)
        self.events.emit(d.job_id, "retrying", {"code": d.code, "message": d.message, "attempts": d.attempts,
                                                "not_before": d.not_before, "model": d.model, "counted": d.counted})

    def _run_batch(self, d: RunBatch, now: float) -> None:
        m = self.config.models[d.key.model]
        jobs = [self.store.get(j) for j in d.job_ids]
        # A batch placed behind a preload still in flight waits for that load too.
        resident = self.engine.workers[d.worker].resident.get(d.key.model)
        loading = d.needs_load or bool(resident and resident.loading)
        self.batches[d.batch_id] = BatchInfo(d.batch_id, d.worker, d.key, d.job_ids, loading, set(d.job_ids))
        self.store.update(d.job_ids, status="running", batch_id=d.batch_id, batch_size=len(d.job_ids),
                          worker=d.worker, t_dispatched=now, served_model=d.key.model)
        self.store.start_attempts(d.job_ids, d.worker, d.key.model, d.batch_id, now)
        self.obs.batch_dispatched(d.batch_id, d.worker, d.key.model, d.job_ids, d.needs_load, now)
        for j in d.job_ids:
            self._emit(j, "started", {"batch_id": d.batch_id, "batch_size": len(d.job_ids), "worker": d.worker,
                                      "model": d.key.model, "cold_start": loading}, now)
        params = {"width": d.key.width, "height": d.key.height, "num_frames": d.key.num_frames,
                  "steps": d.key.steps, "guidance": d.key.guidance, "fps": m.fps}
        payload = [{"id": j["id"], "prompt": j["params"]["prompt"], "negative_prompt": j["params"]["negative_prompt"],
                    "seed": j["params"]["seed"]} for j in jobs]
        self.pool.send(d.worker, {"op": P.RUN, "batch_id": d.batch_id, "model": d.key.model, "kind": m.kind,
                                  "params": params, "jobs": payload})

    def _finish(self, job_id: str, status: str, now: float, *, code: str | None = None, message: str | None = None,
                **extra: Any) -> None:
        """The one place a job becomes terminal; a terminal job never changes again."""
        if self._is_terminal(job_id):
            return
        self.store.end_attempt(job_id, code if status != "succeeded" else None, message, now)
        self.store.update([job_id], status=status, t_finished=now, error_code=code if status == "failed" else None,
                          error_message=message if status == "failed" else None, **extra)
        self.progress.pop(job_id, None)
        for b in self.batches.values():
            b.live.discard(job_id)
        data: dict[str, Any] = {"status": status}
        if status == "failed":
            data["error"] = {"code": code, "message": message}
        self._emit(job_id, status, data, now)
        self._hooks.pop(job_id, None)
        self.obs.job_finished(job_id)

    def _emit(self, job_id: str, event: str, data: dict[str, Any], now: float) -> None:
        """An SSE event, and the matching webhook event when the job asked for one."""
        self.events.emit(job_id, event, data)
        hook = self._hooks.get(job_id)
        if hook is not None:
            kind = "completed" if event in TERMINAL else event
            self.webhooks.notify(job_id, hook[0], hook[1], kind, data, now)

    def _adopt_output(self, job_id: str, now: float, how: str) -> bool:
        """If the job's output is already in the result store (its worker or the server died
        between writing it and reporting it), finish the job with it instead of running it again."""
        job = self.store.get(job_id)
        kind = self.config.models[job["served_model"] or job["model"]].kind
        key = f"{job_id}/{output_name(kind)}"
        if job["status"] in TERMINAL or not self.results.exists(key):
            return False
        ref = ResultRef(key, OUTPUT_TYPES[kind], self.results.local_path(key).stat().st_size)
        log.info("job %s: output %s", job_id, how)
        self.store.update([job_id], results=[ref.to_dict()], t_output_written=self.results.local_path(key).stat().st_mtime)
        self._finish(job_id, "succeeded", now)
        return True

    # ---- worker events ---------------------------------------------------------------------------

    def _on_message(self, worker_id: str, msg: dict[str, Any]) -> None:
        ev = msg["ev"]
        now = time.time()
        batch = self.batches.get(msg.get("batch_id", ""))
        self.engine.worker_seen(worker_id, now)
        if ev == "heartbeat":
            return self._pump()
        for b in self.batches.values():  # anything else from a busy worker is a sign of progress
            if b.worker == worker_id:
                self.engine.batch_progress(b.id, now)
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
            self.store.update(list(batch.live), t_inference_start=msg["t"])
        elif ev == "progress" and batch:
            for j in batch.live:  # every step: from memory, not a store read per job
                self.progress[j] = (msg["step"], msg["total"])
                self._emit(j, "progress", {"step": msg["step"], "total": msg["total"]}, now)
        elif ev == "job_canceled":
            self.engine.job_ended(msg["job_id"], now)
            self._finish(msg["job_id"], "canceled", msg["t"], code=ErrorCode.CANCELED, message="canceled by request")
        elif ev == "job_done":
            self.engine.job_ended(msg["job_id"], now)
            if not self._is_terminal(msg["job_id"]):  # e.g. it timed out while its last step ran
                self.store.update([msg["job_id"]], results=[msg["result"]], t_inference_start=msg["inference_start"],
                                  t_inference_end=msg["inference_end"], t_output_written=msg["output_written"])
                self._finish(msg["job_id"], "succeeded", now)
        elif ev == "batch_done" and batch:
            self._end_batch(batch, now, msg.get("peak_bytes", 0))
        elif ev == "batch_failed" and batch:
            log.warning("batch %s on %s failed: %s: %s", batch.id, worker_id, msg["code"], msg["message"])
            del self.batches[batch.id]
            self._execute(self.engine.batch_failed(batch.id, msg["code"], msg["message"], now))
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
        for b in lost:
            del self.batches[b.id]
            for j in b.job_ids:
                if self._adopt_output(j, now, "written before its worker died"):
                    self.engine.job_ended(j, now)
        # Each job still in the engine's batch has a failed attempt: retried or failed by policy.
        self._execute(self.engine.worker_down(worker_id, now))
        self.worker_reported.pop(worker_id, None)
        log.warning("worker %s lost (exit code %s) with %d batch(es)", worker_id, code, len(lost))
        self._pump()
