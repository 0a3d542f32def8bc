"""The asyncio driver: feeds the engine events with the clock and carries out its decisions.

No polling loop: it runs on API calls and worker messages, plus one timer armed for
``engine.next_deadline()`` (batching windows, retry backoffs, deadlines, hang checks). The clock is
injected and read once per event, so everything one event causes happens at one ``now``.

It owns the job store, through ``JobRecords`` (records.py), the only writer of job records; the
fleet's read model is ``FleetState`` (fleet.py). Everything else learns what happened from one
stream of events (``listeners.Event``): the SSE hub, the webhook sender and the observer (metrics,
usage, logs). Failure handling (docs/failure-handling.md) is the engine's
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

from ...config.auth import DEFAULT_TENANT
from ...config.load import DEMO_SOURCES, GIB, Config, engine_settings
from ...engine import (
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
    JoinBatch,
    PauseRunning,
    RetryJob,
    RunBatch,
    ScaleTo,
    UnloadModel,
)
from ...storage.open import open_store
from ...workers import protocol as P
from ...workers.base import OnExit, OnMessage, Pool, PoolFactory
from ...workers.pool import LocalPool, detect_devices
from ...workers.ray_pool import RayPool, RaySettings
from ..jobs.events import EventHub
from ..jobs.listeners import Event, Listener
from ..jobs.loras import open_registry, register_config_sources
from ..jobs.records import JobRecords
from ..jobs.store.open import open_job_store
from ..jobs.sweeper import Retention
from ..jobs.webhooks import WebhookSender
from ..observe.observer import Observer
from ..requests import JobParams
from ..security.files import private_dir
from ..security.ssrf import WebhookGuard
from ..status import JobStatus, is_terminal
from .fleet import FleetState
from .messages import join_message, load_message, run_message
from .reattach import HeldJobs
from .worker_events import WorkerEvents

log = logging.getLogger("genserve.runtime")

Clock = Callable[[], float]


class QueueFull(Exception):
    """429 ``queue_full``: the model's queue is full, or (``share`` > 0) the tenant holds its share
    of it while other tenants wait (engine/policies/admission.py)."""

    def __init__(self, model: str, retry_after_s: float, tenant: str | None = None, share: int = 0) -> None:
        super().__init__(f"queue for {model} is full")
        self.model, self.retry_after_s, self.tenant, self.share = model, retry_after_s, tenant, share

    def message(self, retry: str) -> str:
        if self.share:
            return (f"tenant {self.tenant} holds its share ({self.share} jobs) of the queue for {self.model} while "
                    f"other tenants wait; retry after {retry}s")
        return f"the queue for {self.model} is full; retry after {retry}s"


def initial_devices(config: Config, detected: list[str]) -> list[str]:
    """The fleet to start with. With autoscaling, the provider may start up to ``max_devices``
    (never more GPUs than exist) and begins with ``server.workers`` clamped to the limits."""
    a = config.autoscale
    if a is None:
        return detected
    if detected and detected[0].startswith("cuda"):
        return detected[: max(a.min_devices, min(len(detected), a.max_devices))]
    return ["cpu"] * max(a.min_devices, min(config.server.workers, a.max_devices))


def local_pool(config: Config, results: dict[str, Any]) -> PoolFactory:
    """The default pool: worker processes on this machine."""
    s, faults = config.server, config.faults

    def make(devices: list[str], on_message: OnMessage, on_exit: OnExit) -> Pool:
        return LocalPool(devices, results, on_message, on_exit, heartbeat_s=s.heartbeat_s,
                         restart=RestartPolicy(quarantine_after=s.quarantine_after, window_s=s.quarantine_window_s),
                         faults=faults.for_worker if faults else None, cpu_memory_bytes=int(s.worker_memory_gb * GIB),
                         host_cache_bytes=int(s.host_cache_gb * GIB), threads=s.worker_threads)
    return make


def ray_pool(config: Config, results: dict[str, Any]) -> PoolFactory:
    """``[cluster] provider = "ray"``: one Ray actor per worker, placed by Ray on any node."""
    s, c = config.server, config.cluster
    settings = RaySettings(c.address, c.namespace, c.name, c.device_resource, c.cpus_per_worker, c.model_cache,
                           s.heartbeat_s, int(s.worker_memory_gb * GIB), int(s.host_cache_gb * GIB),
                           threads=s.worker_threads)

    def make(devices: list[str], on_message: OnMessage, on_exit: OnExit) -> Pool:
        return RayPool(len(devices), results, on_message, on_exit, settings,
                       RestartPolicy(quarantine_after=s.quarantine_after, window_s=s.quarantine_window_s))
    return make
def scale_local(pool: Pool, gpus: list[str], d: ScaleTo) -> list[str]:
    """The provider: start workers until ``d.devices`` are up or starting (GPU workers only on GPUs
    not already in use). Returns the workers started. Surplus ones are retired by the engine,
    pending ones first (a pool cancels a worker that is not ready yet)."""
    active = pool.active()
    log.info("autoscale: want %d devices, have %d (%s)", d.devices, len(active), d.reason)
    started = []
    for _ in range(d.devices - len(active)):
        if gpus:
            used = {w.device for w in pool.workers.values() if not w.quarantined}  # retiring ones too
            free = [g for g in gpus if g not in used]
            if not free:
                break
            started.append(pool.add_worker(free[0]))
        else:
            started.append(pool.add_worker("cpu"))
    return started


def build_demo_models(config: Config) -> None:
    """Build the demo pipelines the catalog uses, once each. In a child process: the server
    process itself never needs the ML stack loaded."""
    for name, m in config.models.items():
        if m.source in DEMO_SOURCES:
            out = config.model_dir(name)
            if not (out / "model_index.json").exists():
                log.info("building demo model %s into %s", m.source, out)
                proc = subprocess.run(
                    [sys.executable, "-m", "genserve.backends.demo", m.source.removeprefix("demo:"), str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"building demo model {m.source} failed:\n{proc.stderr[-4000:]}")



def planned_devices(config: Config, devices: list[str] | None) -> list[str]:
    """The devices to run workers on (given, else detected); with Ray, Ray finds the devices and
    this is only how many workers to ask for."""
    if config.cluster.provider == "ray":
        n = config.cluster.workers if config.cluster.workers is not None else config.server.workers
        return devices if devices is not None else ["ray"] * n
    return devices if devices is not None else detect_devices(config.server.workers)


def needs_workers(config: Config, devices: list[str]) -> bool:
    """Readiness needs a worker unless the fleet may be empty by design: an API-only node
    (workers = 0) or autoscaling down to zero (a first job is what brings a worker up)."""
    return bool(devices) and (config.autoscale is None or config.autoscale.min_devices > 0)


def deadline_of(config: Config, params: JobParams, received: float) -> float:
    return received + (params.timeout_s or config.models[params.model].timeout_s)

class Runtime:
    def __init__(self, config: Config, *, devices: list[str] | None = None, clock: Clock = time.time,
                 pool: PoolFactory | None = None) -> None:
        self.config = config
        self.clock = clock
        s = config.server
        private_dir(s.data_dir)
        self.store = open_job_store(config)  # [store]: SQLite in data_dir, or PostgreSQL
        results_spec = config.results.spec(s.data_dir)
        self.results = open_store(results_spec)
        self.loras = open_registry(config, self.results)  # adapters (docs/lora.md)
        # The batch-id prefix is unique per start: restarts share one database.
        self.engine = Engine(engine_settings(config, batch_id_prefix=f"b{secrets.token_hex(3)}"))
        self.events = EventHub()
        self.webhooks = WebhookSender(self.store, s.webhook_secret, max_attempts=s.webhook_max_attempts,
                                      backoff_s=s.webhook_backoff_s, guard=WebhookGuard(config.webhooks, own_port=s.port))
        ray = config.cluster.provider == "ray"
        detected = planned_devices(config, devices)
        self.gpus = [d for d in detected if d.startswith("cuda")]
        self.devices = initial_devices(config, detected)
        pool = pool or (ray_pool if ray else local_pool)(config, results_spec)
        # The pool reports to ``worker_events``, made below once the records exist it writes to.
        self.pool: Pool = pool(self.devices, self._on_worker_message, self._on_worker_exit)
        self.fleet = FleetState(self.engine, self.pool, config.prices)
        self.observer = Observer(config.prices, config.models, self.fleet, self.store, clock)
        self.listeners: list[Listener] = [self.events, self.webhooks, self.observer]
        self.records = JobRecords(self.store, self.results, config.models, self._publish)
        self.held = HeldJobs(self.store, self.records, self.restore)  # see start()
        self.worker_events = WorkerEvents(self.engine, self.records, self.fleet, config.prices, clock, self._execute,
                                          self._pump, self._publish)
        self.retention = Retention(config.retention, self.store, self.results, self.observer.metrics.registry, clock)
        self.listeners.append(self.retention)
        self.models_ready = False
        self.draining = False
        self.needs_workers = needs_workers(config, self.devices)
        self._drained: asyncio.Event | None = None  # set when a drain has no batch left running
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(None, build_demo_models, self.config)
        register_config_sources(self.loras, self.config)
        self.models_ready = True
        # First the pool: cluster workers that outlived the old server say which of its jobs they
        # still run; those are held (not run again) until the worker is ready or lost (reattach.py).
        self.pool.start()
        now = self.clock()
        held = self.held.hold(self.pool.in_flight())
        for wid in self.pool.workers:  # pending until ready (a survivor busy with held jobs is up)
            if wid not in self.held.workers():
                self.engine.worker_starting(wid)
        # Outputs written just before a crash (worker or server) are adopted, not produced again.
        for job in self.store.unfinished():
            self.records.adopt_output(job["id"], now, "found after a restart")
        for job in self.store.requeue_unfinished(now, keep=held):
            if job["id"] not in held:
                self.restore(job, now)
        self.webhooks.start()
        self.retention.start()
        self._pump(now)

    def restore(self, job: dict[str, Any], now: float, announce: bool = True) -> None:
        """A queued job from the store enters the engine: after a restart, or one another process
        stored (a gateway, docs/ha.md: its insert announced it already, ``announce=False``)."""
        if job.get("cancel_requested"):  # asked while no engine held it (a gateway's cancel, docs/ha.md)
            self.records.canceled(job["id"], now)
            return
        try:
            params = JobParams.from_dict(job["params"])
            priority = Priority.parse(job["priority"])
            params.key, self.config.models[params.model]  # noqa: B018 — a model no longer configured
        except (TypeError, ValueError, KeyError) as e:
            # Written by an older version, or for a model since removed: it cannot run, and must
            # not stop the server from starting.
            log.warning("job %s cannot be restored: %s: %s", job["id"], type(e).__name__, e)
            self.records.finish(job["id"], JobStatus.FAILED, now, code=ErrorCode.INVALID_REQUEST,
                                message="the stored request can no longer be run by this server")
            return
        self._watch_hooks(job["id"], params)
        # Re-entered jobs keep their original queue time (their place in line), their deadline
        # and the attempts they have used.
        self.engine.submit(job["id"], params.key, priority, job["t_queued"] or now,
                           force=True, deadline=deadline_of(self.config, params, job["t_received"]),
                           attempts=job["attempts"], tenant=job["tenant"],
                           weight=self.config.access.tenant(job["tenant"]).weight,
                           loras=self.loras.sizes(i for _, _, i in params.loras))
        if announce:
            self.records.restored(job, now)

    async def drain(self, drain_s: float) -> None:
        """Graceful shutdown, before the HTTP server stops (docs/operations.md): unready at once,
        no new batches; running batches get up to ``drain_s`` to finish; what is still running
        then is requeued durably (not counted as an attempt) and its workers are stopped; open
        SSE streams and waiting OpenAI calls are told to come back."""
        now = self.clock()
        self.draining = True
        self.engine.drain(now)
        log.warning("draining: no new batches; %d running get up to %gs", len(self.engine.busy_workers()), drain_s)
        self._pump(now)
        if self.engine.has_running() and self._loop is not None:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), drain_s)
            except asyncio.TimeoutError:
                pass
        if self.engine.has_running():
            now = self.clock()
            busy = self.engine.busy_workers()
            log.warning("drain: %gs are up; requeueing the jobs of %d running batch(es)", drain_s, len(busy))
            self._execute(self.engine.interrupt_running(now), now)
            for w in busy:
                self.pool.kill(w)
            await self.pool.close()  # closes at once: the killed workers are neither reported nor restarted
        self.events.close_streams()

    async def close(self) -> None:
        if self._timer:
            self._timer.cancel()
        self.retention.close()
        await self.pool.close()
        await self.webhooks.close()
        self.loras.close()
        self.store.close()

    def _on_worker_message(self, worker_id: str, msg: dict[str, Any]) -> None:
        if worker_id not in self.pool.workers:
            return  # retired before it was ready (a canceled pending worker): the engine forgot it
        if msg["ev"] == "ready" and self.held:  # after a re-attach: what it ran for the old server is done
            self.held.release(worker_id, self.clock(), msg.get("finished_before"))
        self.worker_events.on_message(worker_id, msg)

    def _on_worker_exit(self, worker_id: str, code: int | None) -> None:
        if self.held:
            self.held.release(worker_id, self.clock())
        self.worker_events.on_exit(worker_id, code)

    # ---- Control: what the API asks -------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The API accepts jobs (models built, not draining) and at least one worker can run them:
        ready, or held (a cluster worker that outlived the old server, finishing its batch: it is
        up and will be ready next). With every worker down, not ready, whatever came before."""
        if not self.models_ready or self.draining:
            return False
        return not self.needs_workers or any(self.worker_readiness().values())

    def worker_readiness(self) -> dict[str, bool]:
        """Each worker not being retired: ready or held."""
        held = self.held.workers()
        return {wid: h.ready or wid in held for wid, h in self.pool.workers.items() if not h.retiring}

    def submit(self, params: JobParams, client_id: str | None, tenant: str = DEFAULT_TENANT,
               job_id: str | None = None) -> tuple[dict[str, Any], bool]:
        """Persist then queue a job of ``tenant`` (``job_id``: chosen by the caller, who stored the
        job's inputs under it). Returns (job record, created)."""
        if client_id is not None:
            existing = self.store.get_by_client_id(client_id, tenant)
            if existing is not None:
                return existing, False
        weight = self.config.access.tenant(tenant).weight
        adm = self.engine.admit(params.model, tenant, weight)
        if not adm.accepted:
            raise QueueFull(params.model, adm.retry_after_s, tenant, adm.share)
        job_id = job_id or uuid.uuid4().hex
        now = self.clock()
        job = self.records.queued(job_id, client_id, params.to_dict(), now, tenant)
        self._watch_hooks(job_id, params)
        self.engine.submit(job_id, params.key, Priority.parse(params.priority), now,
                           deadline=deadline_of(self.config, params, now), tenant=tenant,
                           weight=weight, loras=self.loras.sizes(i for _, _, i in params.loras))
        return job, True

    def submit_many(self, params: list[JobParams], tenant: str = DEFAULT_TENANT) -> list[dict[str, Any]]:
        """Submit jobs that should share a batch: all are queued before the engine decides."""
        model = params[0].model
        adm = self.engine.admit(model, tenant, self.config.access.tenant(tenant).weight, n=len(params))
        if not adm.accepted:
            raise QueueFull(model, adm.retry_after_s or 1.0, tenant, adm.share)
        return [self.submit(p, None, tenant)[0] for p in params]

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        job = self.store.get(job_id)
        if job is None or is_terminal(job["status"]):
            return job
        now = self.clock()
        self.records.cancel_requested(job_id)
        self._execute(self.engine.cancel(job_id, now), now)
        return self.store.get(job_id)

    def delete_job(self, job_id: str) -> bool:
        """Delete a finished job's results and record (server/jobs/sweeper.py). False: no such finished job."""
        job = self.store.get(job_id)
        return job is not None and is_terminal(job["status"]) and self.retention.delete_job(job)

    def kick(self) -> None:
        """Let the engine decide now (called after API events)."""
        self._pump()

    def queue_position(self, job_id: str) -> int | None:
        return self.engine.queue_position(job_id, self.clock())

    def progress(self, job_id: str) -> tuple[int, int] | None:
        return self.records.progress_of(job_id)

    def load_model(self, model: str, worker: str | None) -> list[str]:
        """Operator: load ``model`` (on ``worker`` or wherever it fits). Returns the workers chosen."""
        return self._operate(self.engine.request_load, LoadModel, model, worker)

    def unload_model(self, model: str, worker: str | None) -> list[str]:
        return self._operate(self.engine.request_unload, UnloadModel, model, worker)

    def _operate(self, request, kind: type, model: str, worker: str | None) -> list[str]:
        now = self.clock()
        decisions = request(model, now, worker)
        self._execute(decisions, now)
        self._pump(now)
        return [d.worker for d in decisions if isinstance(d, kind)]

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
        if self._drained is not None and not self.engine.has_running():
            self._drained.set()

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
                log.info("loading %s on %s (%s)", d.model, d.worker, d.reason)
                self.pool.send(d.worker, load_message(self.config, d))
            case UnloadModel():
                log.info("unloading %s from %s (%s)", d.model, d.worker, d.reason)
                self.fleet.log(now, "unload", d.worker, d.model, reason=d.reason)
                self.pool.send(d.worker, {"op": P.UNLOAD, "model": d.model})
            case RunBatch():
                self._run_batch(d, now)
            case JoinBatch():
                self.pool.send(d.worker, join_message(d, self.records.dispatched(d, now)))
            case CancelRunning():
                self.pool.send(d.worker, {"op": P.CANCEL, "batch_id": d.batch_id, "job_ids": list(d.job_ids)})
            case PauseRunning():
                self.pool.send(d.worker, {"op": P.PAUSE, "batch_id": d.batch_id, "job_ids": list(d.job_ids)})
            case JobDequeued():
                self.records.canceled(d.job_id, now)
            case FailJob():
                self.records.finish(d.job_id, JobStatus.FAILED, now, code=d.code, message=d.message)
            case RetryJob():
                self.records.retry(d, now)
            case ScaleTo():
                for wid in scale_local(self.pool, self.gpus, d):
                    self.engine.worker_starting(wid)
            case RetireWorker():
                log.info("retiring worker %s (%s)", d.worker, d.reason)
                self.pool.retire(d.worker)
            case KillWorker():
                log.warning("killing worker %s: %s", d.worker, d.message)
                self.pool.kill(d.worker)
            case _:
                assert_never(d)

    def _run_batch(self, d: RunBatch, now: float) -> None:
        if d.waits_for_load:
            self.fleet.await_load(d.batch_id, d.worker, d.key.model, d.job_ids)
        self.pool.send(d.worker, run_message(self.config, d, self.records.dispatched(d, now)))

    def _watch_hooks(self, job_id: str, params: JobParams) -> None:
        if params.webhook is not None:
            self.webhooks.watch(job_id, params.webhook, params.webhook_events)

    # ---- worker events ---------------------------------------------------------------------------
