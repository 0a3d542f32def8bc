"""The asyncio driver: feeds the engine events with the clock and carries out its decisions.

No polling loop: it runs on API calls and worker messages, plus one timer armed for
``engine.next_deadline()`` (batching windows, retry backoffs, deadlines, hang checks). The clock is
injected and read once per event, so everything one event causes happens at one ``now``.

It owns the job store: every write to a job record happens here. Everything else learns what
happened from one stream of events (``listeners.Event``): the SSE hub, the webhook sender and the
observer (metrics, usage, logs). Failure handling (docs/failure-handling.md) is the engine's
decisions carried out here: every attempt is recorded, a job is finished at most once, and an
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
from collections.abc import Callable
from typing import Any, assert_never

from ..config import DEMO_SOURCES, GIB, Config, engine_settings
from ..engine import (
    CancelRunning,
    Decision,
    Engine,
    ErrorCode,
    FailJob,
    JobDequeued,
    KillWorker,
    LoadModel,
    Priority,
    RestartPolicy,
    RetireWorker,
    RetryJob,
    RunBatch,
    ScaleTo,
    UnloadModel,
)
from ..engine.types import RunningBatch
from ..requests import JobParams
from ..status import JobStatus, is_terminal
from ..storage import OUTPUT_TYPES, LocalResultStore, ResultRef, output_name
from ..workers import protocol as P
from ..workers.base import OnExit, OnMessage, Pool, PoolFactory
from ..workers.pool import LocalPool, detect_devices
from .cost import apportion, cost_usd, device_type, job_weight
from .events import EventHub
from .jobstore import JobStore
from .listeners import Event, Listener
from .observe import Observer
from .views import ResidentView, WorkerView
from .webhooks import WebhookSender

log = logging.getLogger("genserve.runtime")

Clock = Callable[[], float]


class QueueFull(Exception):
    def __init__(self, model: str, retry_after_s: float) -> None:
        super().__init__(f"queue for {model} is full")
        self.model, self.retry_after_s = model, retry_after_s


def initial_devices(config: Config, detected: list[str]) -> list[str]:
    """The fleet to start with. With autoscaling, the provider may start up to ``max_devices``
    (never more GPUs than exist) and begins with ``server.workers`` clamped to the limits."""
    a = config.autoscale
    if a is None:
        return detected
    if detected and detected[0].startswith("cuda"):
        return detected[: max(a.min_devices, min(len(detected), a.max_devices))]
    return ["cpu"] * max(a.min_devices, min(config.server.workers, a.max_devices))


def local_pool(config: Config, results_root: str) -> PoolFactory:
    """The default pool: worker processes on this machine."""
    s, faults = config.server, config.faults

    def make(devices: list[str], on_message: OnMessage, on_exit: OnExit) -> Pool:
        return LocalPool(devices, results_root, on_message, on_exit, heartbeat_s=s.heartbeat_s,
                         restart=RestartPolicy(quarantine_after=s.quarantine_after, window_s=s.quarantine_window_s),
                         faults=faults.for_worker if faults else None, cpu_memory_bytes=int(s.worker_memory_gb * GIB),
                         host_cache_bytes=int(s.host_cache_gb * GIB))
    return make


class Runtime:
    def __init__(self, config: Config, *, devices: list[str] | None = None, clock: Clock = time.time,
                 pool: PoolFactory | None = None) -> None:
        self.config = config
        self.clock = clock
        s = config.server
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(s.data_dir / "jobs.db")
        self.results = LocalResultStore(s.data_dir / "results")
        # The batch-id prefix is unique per start: restarts share one database.
        self.engine = Engine(engine_settings(config, batch_id_prefix=f"b{secrets.token_hex(3)}"))
        self.events = EventHub()
        self.webhooks = WebhookSender(self.store, s.webhook_secret, max_attempts=s.webhook_max_attempts,
                                      backoff_s=s.webhook_backoff_s)
        detected = devices if devices is not None else detect_devices(s.workers)
        self.gpus = [d for d in detected if d.startswith("cuda")]
        self.devices = initial_devices(config, detected)
        self.pool: Pool = (pool or local_pool(config, str(self.results.root)))(self.devices, self._on_message,
                                                                                self._on_exit)
        self.observer = Observer(config.prices, config.models, self, self.store, clock)
        self.listeners: list[Listener] = [self.events, self.webhooks, self.observer]
        self._reported: dict[str, dict[str, Any]] = {}  # what each worker last said of its memory
        self._residency_log: list[dict[str, Any]] = []  # recent loads/unloads, newest last (bounded)
        # Dispatched batches whose model is still loading: batch id -> (worker, model, job ids).
        self._awaiting_load: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        self._progress: dict[str, tuple[int, int]] = {}  # running job -> (step, total)
        self.models_ready = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(None, self._build_demo_models)
        self.models_ready = True
        now = self.clock()
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
            self._publish(Event("queued", now, job["id"], {"model": job["model"], "priority": job["priority"],
                                                           "restored": True}))
        self.webhooks.start()
        self.pool.start()
        self._pump(now)

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

    # ---- Control: what the API asks -------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.models_ready and self.pool.all_ready()

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
        now = self.clock()
        self.store.insert(job_id, client_id, params.to_dict(), now)  # durable before acknowledged
        self._watch_hooks(job_id, params)
        self.engine.submit(job_id, params.key, Priority.parse(params.priority), now,
                           deadline=self._deadline(params, now))
        self._publish(Event("queued", now, job_id, {"model": params.model, "priority": params.priority}))
        return self.store.get(job_id), True

    def submit_many(self, params: list[JobParams]) -> list[dict[str, Any]]:
        """Submit jobs that should share a batch: all are queued before the engine decides."""
        model = params[0].model
        adm = self.engine.admit(model)
        if not adm.accepted or self.engine.queue_depth(model) + len(params) > self.config.models[model].max_queue:
            raise QueueFull(model, adm.retry_after_s or 1.0)
        return [self.submit(p, None)[0] for p in params]

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        job = self.store.get(job_id)
        if job is None or is_terminal(job["status"]):
            return job
        now = self.clock()
        self.store.update([job_id], cancel_requested=1)
        self._execute(self.engine.cancel(job_id, now), now)
        return self.store.get(job_id)

    def kick(self) -> None:
        """Let the engine decide now (called after API events)."""
        self._pump()

    def queue_position(self, job_id: str) -> int | None:
        return self.engine.queue_position(job_id, self.clock())

    def progress(self, job_id: str) -> tuple[int, int] | None:
        return self._progress.get(job_id)

    def load_model(self, model: str, worker: str | None) -> list[str]:
        """Operator: load ``model`` (on ``worker`` or wherever it fits). Returns the workers chosen."""
        now = self.clock()
        decisions = self.engine.request_load(model, now, worker)
        self._execute(decisions, now)
        self._pump(now)
        return [d.worker for d in decisions if isinstance(d, LoadModel)]

    def unload_model(self, model: str, worker: str | None) -> list[str]:
        now = self.clock()
        decisions = self.engine.request_unload(model, now, worker)
        self._execute(decisions, now)
        self._pump(now)
        return [d.worker for d in decisions if isinstance(d, UnloadModel)]

    # ---- FleetView: what the API and the observer read --------------------------------------------------

    def worker_views(self, now: float) -> list[WorkerView]:
        out = []
        for wid, h in self.pool.workers.items():
            st = self.engine.workers.get(wid)
            dtype = device_type(h.device, h.info.get("device_name"), self.config.prices)
            if st is None or not h.ready:
                out.append(WorkerView(wid, h.device, dtype, h.state, False, h.quarantined, h.restarts, len(h.exits)))
                continue
            out.append(WorkerView(
                wid, h.device, dtype, "busy" if not st.idle else ("loading" if st.loading else "idle"), True,
                h.quarantined, h.restarts, len(h.exits), h.info.get("pid"), st.capacity, st.used,
                self._reported.get(wid, {}).get("used_bytes"), round(st.busy.utilization(now), 4), st.batch_id,
                tuple(ResidentView(m, r.bytes, r.last_used, r.pinned, r.loading) for m, r in sorted(st.resident.items()))))
        return out

    def queue_depth(self, model: str) -> int:
        return self.engine.queue_depth(model)

    def jobs_waiting_for_loads(self) -> list[tuple[str, str, int]]:
        return [(model, worker, len(jobs)) for worker, model, jobs in self._awaiting_load.values()]

    def residency_changes(self) -> list[dict[str, Any]]:
        return self._residency_log[-50:]

    # ---- the engine loop -------------------------------------------------------------------------

    def _publish(self, ev: Event) -> None:
        for listener in self.listeners:
            try:
                listener.on_event(ev)
            except Exception:  # a listener's bug must not stop the others, nor the runtime
                log.exception("listener %r failed on %s", listener, ev.kind)

    def _pump(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        self._execute(self.engine.step(now), now)
        self._publish(Event("synced", now))
        self._arm_timer(now)

    def _arm_timer(self, now: float) -> None:
        if self._timer:
            self._timer.cancel()
            self._timer = None
        deadline = self.engine.next_deadline(now)
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_later(max(0.0, deadline - now) + 0.001, self._pump)

    def _execute(self, decisions: list[Decision], now: float) -> None:
        for d in decisions:
            try:
                self._carry_out(d, now)
            except Exception:  # one decision failing must not drop the ones after it
                log.exception("carrying out %r failed", d)

    def _carry_out(self, d: Decision, now: float) -> None:
        match d:
            case LoadModel():
                m = self.config.models[d.model]
                spec = {"path": str(self.config.model_dir(d.model)), "kind": m.kind, "dtype": m.dtype}
                log.info("loading %s on %s (%s)", d.model, d.worker, d.reason)
                self.pool.send(d.worker, {"op": P.LOAD, "model": d.model, "spec": spec, "reason": d.reason})
            case UnloadModel():
                log.info("unloading %s from %s (%s)", d.model, d.worker, d.reason)
                self._log_residency(now, "unload", d.worker, d.model, reason=d.reason)
                self.pool.send(d.worker, {"op": P.UNLOAD, "model": d.model})
            case RunBatch():
                self._run_batch(d, now)
            case CancelRunning():
                self.pool.send(d.worker, {"op": P.CANCEL, "batch_id": d.batch_id, "job_ids": list(d.job_ids)})
            case JobDequeued():
                self._finish(d.job_id, JobStatus.CANCELED, now, code=ErrorCode.CANCELED, message="canceled by request")
            case FailJob():
                self._finish(d.job_id, JobStatus.FAILED, now, code=d.code, message=d.message)
            case RetryJob():
                self._retry(d, now)
            case ScaleTo():
                self._scale_to(d)
            case RetireWorker():
                log.info("retiring worker %s (%s)", d.worker, d.reason)
                self.pool.retire(d.worker)
            case KillWorker():
                log.warning("killing worker %s: %s", d.worker, d.message)
                self.pool.kill(d.worker)
            case _:
                assert_never(d)

    def _scale_to(self, d: ScaleTo) -> None:
        """The local provider: start workers until ``d.devices`` are up or starting (GPU workers
        only on GPUs not already in use). Surplus ones are retired by the engine, one by one."""
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
        self.store.update([d.job_id], status=JobStatus.QUEUED, attempts=d.attempts, batch_id=None, batch_size=None,
                          worker=None, t_dispatched=None, t_load_start=None, t_load_end=None, load_tier=None,
                          t_inference_start=None, t_inference_end=None)
        self._progress.pop(d.job_id, None)
        self._publish(Event("retrying", now, d.job_id, {"code": d.code, "message": d.message, "attempts": d.attempts,
                                                        "not_before": d.not_before, "model": d.model,
                                                        "counted": d.counted}, record=self.store.get(d.job_id)))

    def _run_batch(self, d: RunBatch, now: float) -> None:
        m = self.config.models[d.key.model]
        jobs = [self.store.get(j) for j in d.job_ids]
        if d.waits_for_load:
            self._awaiting_load[d.batch_id] = (d.worker, d.key.model, d.job_ids)
        self.store.update(d.job_ids, status=JobStatus.RUNNING, batch_id=d.batch_id, batch_size=len(d.job_ids),
                          worker=d.worker, t_dispatched=now, served_model=d.key.model)
        self.store.start_attempts(d.job_ids, d.worker, d.key.model, d.batch_id, now)
        self._publish(Event("batch_dispatched", now, data={"batch_id": d.batch_id, "worker": d.worker,
                                                          "model": d.key.model, "job_ids": d.job_ids,
                                                          "cold": d.needs_load}))
        for j in d.job_ids:
            self._publish(Event("started", now, j, {"batch_id": d.batch_id, "batch_size": len(d.job_ids),
                                                    "worker": d.worker, "model": d.key.model,
                                                    "cold_start": d.waits_for_load}))
        params = {"width": d.key.width, "height": d.key.height, "num_frames": d.key.num_frames,
                  "steps": d.key.steps, "guidance": d.key.guidance, "fps": m.fps}
        payload = [{"id": j["id"], "prompt": j["params"]["prompt"], "negative_prompt": j["params"]["negative_prompt"],
                    "seed": j["params"]["seed"]} for j in jobs]
        self.pool.send(d.worker, {"op": P.RUN, "batch_id": d.batch_id, "model": d.key.model, "kind": m.kind,
                                  "params": params, "jobs": payload})

    def _finish(self, job_id: str, status: JobStatus, now: float, *, code: str | None = None,
                message: str | None = None, **extra: Any) -> None:
        """The one place a job becomes terminal; a terminal job never changes again."""
        job = self.store.get(job_id)
        if job is None or is_terminal(job["status"]):
            return
        failed = status is JobStatus.FAILED
        self.store.end_attempt(job_id, None if status is JobStatus.SUCCEEDED else code, message, now)
        self.store.update([job_id], status=status, t_finished=now, error_code=code if failed else None,
                          error_message=message if failed else None, **extra)
        self._progress.pop(job_id, None)
        data: dict[str, Any] = {"status": status.value}
        if failed:
            data["error"] = {"code": code, "message": message}
        self._publish(Event(status.value, now, job_id, data, record=self.store.get(job_id)))

    def _adopt_output(self, job_id: str, now: float, how: str) -> bool:
        """If the job's output is already in the result store (its worker or the server died
        between writing it and reporting it), finish the job with it instead of running it again."""
        job = self.store.get(job_id)
        kind = self.config.models[job["served_model"] or job["model"]].kind
        key = f"{job_id}/{output_name(kind)}"
        if is_terminal(job["status"]) or not self.results.exists(key):
            return False
        stat = self.results.local_path(key).stat()
        log.info("job %s: output %s", job_id, how)
        self.store.update([job_id], results=[ResultRef(key, OUTPUT_TYPES[kind], stat.st_size).to_dict()],
                          t_output_written=stat.st_mtime)
        self._finish(job_id, JobStatus.SUCCEEDED, now)
        return True

    def _charge(self, batch: RunningBatch, now: float) -> None:
        """Charge the batch's device time (dispatch to end) to its jobs, by work share."""
        jobs = [j for j in (self.store.get(i) for i in batch.job_ids) if j is not None]
        h = self.pool.workers.get(batch.worker)
        dtype = device_type(h.device, h.info.get("device_name"), self.config.prices) if h else "cpu"
        price = self.config.prices.get(dtype, 0.0)
        weights = [job_weight(j["params"]["width"], j["params"]["height"], j["params"]["num_frames"]) for j in jobs]
        charges = []
        for job, share in zip(jobs, apportion(max(0.0, now - batch.started_at), weights)):
            c = cost_usd(share, price)
            self.store.update([job["id"]], device_seconds=share, cost_usd=c, device_type=dtype)
            charges.append({"job_id": job["id"], "model": job["model"], "device_seconds": share, "cost_usd": c})
        self._publish(Event("batch_ended", now, data={"batch_id": batch.id, "worker": batch.worker,
                                                     "device_type": dtype, "charges": charges}))

    def _deadline(self, params: JobParams, received: float) -> float:
        return received + (params.timeout_s or self.config.models[params.model].timeout_s)

    def _watch_hooks(self, job_id: str, params: JobParams) -> None:
        if params.webhook is not None:
            self.webhooks.watch(job_id, params.webhook, params.webhook_events)

    def _log_residency(self, now: float, action: str, worker: str, model: str, **info: Any) -> None:
        self._residency_log.append({"t": now, "action": action, "worker": worker, "model": model, **info})
        del self._residency_log[:-500]

    # ---- worker events ---------------------------------------------------------------------------

    def _on_message(self, worker_id: str, msg: dict[str, Any]) -> None:
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
            self._reported[worker_id] = {"used_bytes": 0, "resident": []}
        elif ev == "loaded":
            self._loaded(worker_id, msg, now)
        elif ev == "unloaded":
            self._reported[worker_id] = {"used_bytes": msg["used_bytes"], "resident": msg["resident"]}
        elif ev == "load_failed":
            self.engine.model_load_failed(worker_id, msg["model"], now)
            log.error("worker %s failed to load %s: %s", worker_id, msg["model"], msg["message"])
        elif ev == "started" and batch:
            self.store.update(list(batch.jobs), t_inference_start=msg["t"])
        elif ev == "progress" and batch:
            for j in batch.jobs:  # every step: from memory, not a store read per job
                self._progress[j] = (msg["step"], msg["total"])
                self._publish(Event("progress", now, j, {"step": msg["step"], "total": msg["total"]}))
        elif ev == "job_canceled":
            self.engine.job_ended(msg["job_id"], now)
            self._finish(msg["job_id"], JobStatus.CANCELED, msg["t"], code=ErrorCode.CANCELED,
                         message="canceled by request")
        elif ev == "job_done":
            self.engine.job_ended(msg["job_id"], now)
            job = self.store.get(msg["job_id"])
            if job is not None and not is_terminal(job["status"]):  # e.g. it timed out while its last step ran
                self.store.update([msg["job_id"]], results=[msg["result"]], t_inference_start=msg["inference_start"],
                                  t_inference_end=msg["inference_end"], t_output_written=msg["output_written"])
                self._finish(msg["job_id"], JobStatus.SUCCEEDED, now)
        elif ev == "batch_done" and batch:
            self._awaiting_load.pop(batch.id, None)
            self.engine.batch_finished(batch.id, now, msg.get("peak_bytes", 0))
            self._charge(batch, now)
        elif ev == "batch_failed" and batch:
            log.warning("batch %s on %s failed: %s: %s", batch.id, worker_id, msg["code"], msg["message"])
            self._awaiting_load.pop(batch.id, None)
            self._execute(self.engine.batch_failed(batch.id, msg["code"], msg["message"], now), now)
        self._pump(now)

    def _loaded(self, worker_id: str, msg: dict[str, Any], now: float) -> None:
        self.engine.model_loaded(worker_id, msg["model"], msg["bytes"], now)
        self._publish(Event("model_loaded", now, data={"worker": worker_id, **msg}))
        cached = bool(msg.get("cached"))
        if not cached:
            self._log_residency(now, "load", worker_id, msg["model"], tier=msg["tier"], bytes=msg["bytes"],
                                seconds=round(msg["load_end"] - msg["load_start"], 4))
            rep = self._reported.setdefault(worker_id, {"used_bytes": 0, "resident": []})
            rep["used_bytes"] += msg["bytes"]
            rep["resident"] = sorted({*rep["resident"], msg["model"]})
        for batch_id, (worker, model, job_ids) in list(self._awaiting_load.items()):
            if worker == worker_id and model == msg["model"]:
                if not cached:
                    self.store.update(job_ids, t_load_start=msg["load_start"], t_load_end=msg["load_end"],
                                      load_tier=msg["tier"])
                del self._awaiting_load[batch_id]

    def _on_exit(self, worker_id: str, code: int | None) -> None:
        now = self.clock()
        lost = self.engine.batches_on(worker_id)
        for b in lost:
            self._awaiting_load.pop(b.id, None)
            for j in b.job_ids:
                if self._adopt_output(j, now, "written before its worker died"):
                    self.engine.job_ended(j, now)
        # Each job still in the engine's batch has a failed attempt: retried or failed by policy.
        self._execute(self.engine.worker_down(worker_id, now), now)
        self._reported.pop(worker_id, None)
        log.warning("worker %s lost (exit code %s) with %d batch(es)", worker_id, code, len(lost))
        self._pump(now)
