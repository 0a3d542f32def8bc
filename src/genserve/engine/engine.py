"""The engine: every scheduling decision, as a pure function of events and ``now``.

It never reads a clock, sleeps, starts threads or does I/O. Drivers (the asyncio server, unit
tests, later the simulator) feed it events and carry out the decisions it returns.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

from .autoscale import Autoscaler, FleetSnapshot
from .batching import BATCHING
from .errors import ErrorCode
from .liveness import BatchWatch, Liveness
from .memory import MemoryModel
from .placement import PLACEMENT
from .preload import TransitionPredictor
from .queues import KeyedQueues, order_key
from .residency import RESIDENCY
from .retry import RetryPolicy
from .types import (
    Admission,
    BatchKey,
    CancelRunning,
    Decision,
    FailJob,
    JobDequeued,
    KillWorker,
    LoadModel,
    ModelLimits,
    Priority,
    QueuedJob,
    Resident,
    RetireWorker,
    RetryJob,
    RunBatch,
    RunningBatch,
    ScaleTo,
    UnloadModel,
    WorkerState,
)

DEFAULT_BATCH_SECONDS = 1.0  # used for Retry-After until a model has run a batch
RECHECK_S = 1.0  # how soon to look again while a batch waits for a busy warm worker
ARRIVAL_TAU_S = 60.0  # time constant of the arrival work-rate average
# A failed warm-pool or preload load is not retried on that worker before 5 s, doubling per failure
# up to 5 min (a batch that needs the model may still ask for it).
LOAD_RETRY_S = (5.0, 300.0)


class Engine:
    def __init__(
        self,
        models: Mapping[str, ModelLimits],
        *,
        aging_s: float = 30.0,
        max_attempts: int = 3,
        batching: str = "greedy",
        placement: str = "warm-first",
        residency: str = "lru",
        saturation: float = 0.9,
        preload: bool = False,
        preload_min_probability: float = 0.2,
        batch_id_prefix: str = "b",
        autoscaler: Autoscaler | None = None,
        retry: RetryPolicy | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        self.models = dict(models)
        self.aging_s = aging_s
        self.retry = retry or RetryPolicy(max_attempts=max_attempts)
        # Off unless the driver configures it: only a driver that hears heartbeats can judge them
        # (the server does; unit tests and the simulator do not).
        self.liveness = liveness or Liveness.OFF
        self.batching = BATCHING[batching]()
        self.placement = PLACEMENT[placement](saturation)
        self.residency = RESIDENCY[residency]()
        self.memory = MemoryModel({m: lim.memory_bytes for m, lim in self.models.items() if lim.memory_bytes})
        self.predictor = TransitionPredictor() if preload else None
        self.preload_min_probability = preload_min_probability
        self.queues = KeyedQueues()
        self.workers: dict[str, WorkerState] = {}
        self.running: dict[str, RunningBatch] = {}
        self._running_job: dict[str, str] = {}  # job id -> batch id
        self._cancel_sent: set[str] = set()
        self._batch_seq = 0
        self._prefix = batch_id_prefix
        self._batch_seconds: dict[str, float] = {}  # model -> EWMA of batch wall time
        self.last_arrival: dict[str, float] = {}
        self.last_key: dict[str, BatchKey] = {}  # each model's most recent request shape
        self._waiting_on_warm = False  # a ready batch is holding out for a busy warm worker
        # Work accounting (device-seconds), for autoscaling and Retry-After.
        self._sec_per_unit: dict[str, float] = {}  # model -> seconds per job-pixel-frame-step
        self._load_seconds: dict[str, float] = {}  # model -> EWMA of load wall time
        self._arrivals = (0.0, 0.0)  # (decayed work sum, at time)
        self.autoscaler = autoscaler
        self._next_scale_at: float | None = None
        self.target_devices: int | None = None
        # Failure handling (see retry.py, liveness.py): jobs waiting out a retry backoff, batch
        # sizes that ran out of memory, each running batch's pulse, when each worker was last
        # heard from, and the workers we asked to be killed (with the code their jobs fail with).
        self._delayed: dict[str, tuple[float, QueuedJob]] = {}
        self._oom_cap: dict[tuple[str, int, int, int, str], int] = {}
        self._watch: dict[str, BatchWatch] = {}
        self._seen: dict[str, float] = {}
        self._killing: dict[str, tuple[str, str]] = {}
        self._deadlines: list[tuple[float, str]] = []  # heap of (deadline, job id); stale entries skipped
        self._any_avoid = False  # some job avoids a worker it failed on
        self._liveness_on = any(x is not None for x in (self.liveness.hang_timeout_s,
                                                         self.liveness.heartbeat_timeout_s, self.liveness.stop_grace_s))
        # Idle unloads are checked only when one can be due: the earliest future due time seen by
        # the last scan, lowered by events that start a countdown, -inf to force a rescan.
        self._unload_next = -math.inf
        self._load_backoff: dict[tuple[str, str], tuple[int, float]] = {}  # (worker, model) -> (failures, retry at)

    # ---- jobs ------------------------------------------------------------------------------------

    def admit(self, model: str) -> Admission:
        """Would a new job for ``model`` be accepted now? Asked before the job is persisted."""
        limits = self.models.get(model)
        if limits is None:
            return Admission(False, "unknown_model")
        depth = self.queues.depth(model)
        if depth >= limits.max_queue:
            return Admission(False, "queue_full", self._drain_estimate(model, depth))
        return Admission(True)

    def submit(self, job_id: str, key: BatchKey, priority: Priority, now: float, *, force: bool = False,
               deadline: float | None = None, attempts: int = 0) -> Admission:
        """Queue a job. ``force`` skips the queue limit: used when re-entering jobs that were already
        accepted (server restart) — an accepted job is never turned away later. ``deadline``: fail
        it with ``timeout`` if it has not finished by then; ``attempts``: failed attempts so far."""
        adm = self.admit(key.model)
        if not adm.accepted and not (force and adm.reason == "queue_full"):
            return adm
        if job_id in self.queues or job_id in self._running_job or job_id in self._delayed:
            return Admission(True)  # idempotent
        self.queues.add(QueuedJob(job_id, key, priority, now, attempts=attempts, deadline=deadline))
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, job_id))
        self.last_key[key.model] = key
        if not force:
            self.last_arrival[key.model] = now
            acc, at = self._arrivals
            self._arrivals = (acc * math.exp(-(now - at) / ARRIVAL_TAU_S) + self.job_work(key), now)
            if self.predictor is not None:
                self.predictor.observe(key.model, now)
        return Admission(True)

    def cancel(self, job_id: str, now: float) -> list[Decision]:
        if job_id in self.queues or job_id in self._delayed:
            self._take_queued(job_id)
            return [JobDequeued(job_id, "canceled")]
        batch_id = self._running_job.get(job_id)
        if batch_id is not None and job_id not in self._cancel_sent:
            self._cancel_sent.add(job_id)
            batch = self.running[batch_id]
            self._stop_requested(batch_id, now)
            return [CancelRunning(batch.worker, batch_id, (job_id,))]
        return []

    def is_queued(self, job_id: str) -> bool:
        """Waiting to run: in a queue, or waiting out a retry backoff."""
        return job_id in self.queues or job_id in self._delayed

    def queue_position(self, job_id: str, now: float) -> int | None:
        """0-based position among all queued jobs of the same model, in service order."""
        if job_id not in self.queues:
            return None
        ordered = self.queues.all_ordered(now, self.aging_s)
        model = next(j.key.model for j in ordered if j.id == job_id)
        same = [j.id for j in ordered if j.key.model == model]
        return same.index(job_id)

    def queue_depth(self, model: str) -> int:
        return self.queues.depth(model)

    def has_pending(self) -> bool:
        """Any job queued, waiting out a retry backoff, or running."""
        return bool(self.queues) or bool(self._delayed) or bool(self.running)

    # ---- workers and models ----------------------------------------------------------------------

    def worker_up(self, worker_id: str, now: float, capacity: int | None = None) -> None:
        self.workers[worker_id] = WorkerState(worker_id, capacity)
        self._seen[worker_id] = now

    def worker_seen(self, worker_id: str, now: float) -> None:
        """Any message from the worker (a heartbeat included): it is alive."""
        if worker_id in self.workers:
            self._seen[worker_id] = now

    def worker_down(self, worker_id: str, now: float) -> list[Decision]:
        """A worker vanished (crashed, or killed on our request). Each of its running jobs has a
        failed attempt — ``worker_crashed``, or the code we killed it for — and goes through the
        retry policy: back to the queue (keeping its place in line) or failed."""
        self._seen.pop(worker_id, None)
        code, message = self._killing.pop(worker_id, (ErrorCode.WORKER_CRASHED, "worker process died"))
        if self.autoscaler is not None and worker_id in self.workers:
            self.target_devices = None  # a device was lost: the next tick asks the provider again
        out: list[Decision] = []
        for batch in [b for b in self.running.values() if b.worker == worker_id]:
            self._release(batch.id, now)
            out.extend(self._fail_attempts(batch.jobs.values(), worker_id, code, message, now))
        self.workers.pop(worker_id, None)
        return out

    def batch_progress(self, batch_id: str, now: float) -> None:
        """The batch moved (model loaded, inference started, a step, an output): not hung."""
        watch = self._watch.get(batch_id)
        if watch is not None:
            watch.last_progress = now
            self._seen[self.running[batch_id].worker] = now

    def job_ended(self, job_id: str, now: float) -> None:
        """A job of a running batch reached its outcome (output written, or canceled) before the
        batch ended: whatever happens to the batch later, this job is not run again."""
        batch_id = self._running_job.pop(job_id, None)
        if batch_id is not None:
            self.running[batch_id].jobs.pop(job_id, None)
            self._cancel_sent.discard(job_id)

    def batch_failed(self, batch_id: str, code: str, message: str, now: float) -> list[Decision]:
        """The worker reported the whole batch failed (and is idle again). Out of memory with more
        than one job: the batch size is remembered as too large for this shape on this worker and
        the jobs are requeued to run in smaller batches, without using up an attempt. Otherwise
        each job has a failed attempt and goes through the retry policy."""
        batch = self._release(batch_id, now)
        if batch is None:
            return []
        if code == ErrorCode.MODEL_LOAD_FAILED:
            self.model_load_failed(batch.worker, batch.key.model, now)
        smaller = self.retry.split(batch.size, code)
        if smaller is None:
            return self._fail_attempts(batch.jobs.values(), batch.worker, code, message, now)
        shape = self._shape(batch.key, batch.worker)
        self._oom_cap[shape] = min(smaller, self._oom_cap.get(shape, smaller))
        out: list[Decision] = []
        for job in batch.jobs.values():
            if self._canceled(job.id, out):
                continue
            self.queues.add(job)
            out.append(RetryJob(job.id, code, f"{message}; retrying in batches of ≤ {smaller}", job.attempts, now,
                                job.key.model, counted=False))
        return out

    def model_loaded(self, worker_id: str, model: str, nbytes: int, now: float) -> None:
        """A worker finished loading ``model``; ``nbytes`` is what it measured it holds."""
        self.memory.observe_weights(model, nbytes)
        w = self.workers.get(worker_id)
        if w is None:
            return
        r = w.resident.get(model)
        if r is None:  # loaded without us asking (e.g. after a restart): account for it all the same
            r = w.resident[model] = Resident(nbytes, now, load_started=now)
        if r.loading:
            took = max(0.0, now - r.load_started)
            old = self._load_seconds.get(model)
            self._load_seconds[model] = took if old is None else 0.7 * old + 0.3 * took
        r.loading = False
        r.bytes = nbytes or r.bytes
        self._unload_next = -math.inf

    def model_load_failed(self, worker_id: str, model: str, now: float) -> None:
        """The load failed: forget the copy, and do not try it on this worker on our own initiative
        (warm pool, preload) until a backoff has passed — a batch asking for it still may."""
        w = self.workers.get(worker_id)
        if w is not None:
            w.resident.pop(model, None)
        n, _ = self._load_backoff.get((worker_id, model), (0, now))
        first, cap = LOAD_RETRY_S
        self._load_backoff[(worker_id, model)] = (n + 1, now + min(cap, first * 2 ** n))

    def _may_load(self, w: WorkerState, model: str, now: float) -> bool:
        entry = self._load_backoff.get((w.id, model))
        return entry is None or now >= entry[1]

    def batch_finished(self, batch_id: str, now: float, peak_bytes: int = 0) -> None:
        """The worker finished a batch (whatever each job's outcome) and is idle again.
        ``peak_bytes``: the working memory the worker measured for it (0 = not measured)."""
        batch = self._release(batch_id, now)
        if batch is None:
            return
        self.memory.observe_batch(batch.key, batch.size, peak_bytes)
        took = max(0.0, now - batch.started_at)
        prev = self._batch_seconds.get(batch.key.model)
        self._batch_seconds[batch.key.model] = took if prev is None else 0.7 * prev + 0.3 * took
        if took > 0 and batch.size:
            per = took / (batch.size * _work_units(batch.key))
            old = self._sec_per_unit.get(batch.key.model)
            self._sec_per_unit[batch.key.model] = per if old is None else 0.7 * old + 0.3 * per

    def request_load(self, model: str, now: float, worker_id: str | None = None, *, pin: bool = False) -> list[Decision]:
        """Operator (or warm pool) asks for ``model`` to be loaded. Returns [] when no worker can."""
        candidates = [self.workers[worker_id]] if worker_id in self.workers else (
            [] if worker_id else list(self.workers.values()))
        candidates = [w for w in candidates if model not in w.resident and w.id not in self._killing
                      and (not pin or self._may_load(w, model, now))]
        fits = [w for w in candidates if self._room_for(w, self.memory.weights(model), set()) is not None]
        if not fits:
            return []
        w = min(fits, key=lambda w: (not w.idle, len(w.resident), w.busy.utilization(now), w.id))
        return self._load(w, model, now, "warm_pool" if pin else "operator", pin=pin)

    def request_unload(self, model: str, now: float, worker_id: str | None = None) -> list[Decision]:
        """Operator asks for ``model`` to be unloaded (from one worker or all). Workers running it
        keep it: unloading under a running batch is refused."""
        out: list[Decision] = []
        for w in self.workers.values():
            if worker_id and w.id != worker_id:
                continue
            r = w.resident.get(model)
            if r is None or r.loading or self._running_model(w) == model:
                continue
            del w.resident[model]
            out.append(UnloadModel(w.id, model, "operator"))
        return out

    def utilization(self, worker_id: str, now: float) -> float:
        return self.workers[worker_id].busy.utilization(now)

    # ---- work and autoscaling ----------------------------------------------------------------------

    def job_work(self, key: BatchKey) -> float:
        """Expected device-seconds for one job of ``key``, at the batch sizes seen so far."""
        per = self._sec_per_unit.get(key.model)
        if per is None:
            return self.models[key.model].est_job_seconds
        return per * _work_units(key)

    def fleet_snapshot(self, now: float) -> FleetSnapshot:
        queued = sum(self.job_work(k) * sum(1 for _ in self.queues.jobs(k)) for k in self.queues.keys())
        running = 0.0
        for b in self.running.values():
            expected = self.job_work(b.key) * b.size
            running += max(0.0, expected - (now - b.started_at))
        acc, at = self._arrivals
        rate = acc * math.exp(-(now - at) / ARRIVAL_TAU_S) / ARRIVAL_TAU_S
        up = len(self.workers)
        pending = max(0, (self.target_devices or 0) - up)
        return FleetSnapshot(now, up, pending, sum(1 for w in self.workers.values() if not w.idle), queued, running,
                             rate, max((m.min_warm for m in self.models.values()), default=0))

    def _autoscale(self, now: float) -> list[Decision]:
        assert self.autoscaler is not None
        out: list[Decision] = []
        if self._next_scale_at is not None and now < self._next_scale_at:
            return out
        self._next_scale_at = now + self.autoscaler.limits.interval_s
        snap = self.fleet_snapshot(now)
        want = self.autoscaler.decide(snap)
        if want != self.target_devices:
            reason = f"{self.autoscaler.policy.name}: queued {snap.queued_work_s:.1f} s of work, " \
                     f"arriving {snap.arrival_work_rate:.2f} dev-s/s, {snap.busy}/{snap.up} busy"
            out.append(ScaleTo(want, reason))
            self.target_devices = want
        surplus = len(self.workers) - want
        if surplus > 0:
            # Retire idle workers, the ones holding the least (no warm-pool copies) first.
            idle = [w for w in self._idle() if not w.loading and not any(r.pinned for r in w.resident.values())]
            for w in sorted(idle, key=lambda w: (w.used, w.busy.utilization(now), w.id))[:surplus]:
                del self.workers[w.id]
                self._seen.pop(w.id, None)  # gone on purpose: no heartbeat is expected any more
                out.append(RetireWorker(w.id, "scale down"))
        return out

    # ---- the decision ----------------------------------------------------------------------------

    def step(self, now: float) -> list[Decision]:
        """Unload what has idled out, fill warm pools, dispatch every ready batch that has a worker
        (best first), then preload into idle memory."""
        out: list[Decision] = self._expire(now)
        out += self._idle_unloads(now)
        if self.autoscaler is not None:
            out += self._autoscale(now)
        out += self._fill_warm_pools(now)
        self._waiting_on_warm = False
        blocked: set[BatchKey] = set()
        while True:
            if not self._has_idle():
                break
            ready = [k for k in self.queues.keys() if k not in blocked and self._ready(k, now)]
            if not ready:
                break
            key = min(ready, key=lambda k: self._head_order(k, now))
            decisions = self._place(key, now)
            if decisions is None:
                blocked.add(key)
            else:
                out += decisions
        if blocked and not any(isinstance(d, RunBatch) for d in out) and self._quiescent():
            # Every worker is idle with nothing in flight, yet nothing fits because every resident
            # model has queued work. No event will ever change that: let the best batch evict them.
            key = min(blocked, key=lambda k: self._head_order(k, now))
            out += self._place(key, now, protect_queued=False) or []
        out += self._fail_unplaceable(now)
        out += self._preload(now)
        return out

    def next_deadline(self, now: float) -> float | None:
        """When ``step`` could next decide something without a new event (None: only events matter)."""
        times = self._failure_deadlines()
        if self._unload_next == -math.inf:
            due_now, nxt = self._unload_scan(now)
            self._unload_next = now if due_now else nxt  # copies due now go at the next step
        if self._unload_next < math.inf:
            times.append(max(self._unload_next, now))
        if self._has_idle():
            idle = self._idle() if self._any_avoid else []
            for key in self.queues.keys():
                if self._any_avoid and not self._allowed(self.queues.ordered(key, now, self.aging_s)[0], idle):
                    continue  # waits for a worker it has not failed on: an event, not a time
                t = self.batching.ready_at(self.queues.size(key), self.queues.oldest_enqueued(key),
                                           self.models[key.model])
                if t is not None and t > now:
                    times.append(t)
            if self._waiting_on_warm:
                times.append(now + RECHECK_S)  # utilization of the busy warm workers keeps rising
        if self.autoscaler is not None:
            times.append(max(now, self._next_scale_at if self._next_scale_at is not None else now))
        times += [at for _, at in self._load_backoff.values() if at > now]  # warm pools may retry then
        return max(min(times), now) if times else None

    # ---- internals: placement and memory ---------------------------------------------------------

    def _quiescent(self) -> bool:
        return bool(self.workers) and not self._killing and all(w.idle and not w.loading for w in self.workers.values())

    def _place(self, key: BatchKey, now: float, *, protect_queued: bool = True) -> list[Decision] | None:
        limits = self.models[key.model]
        ordered = self.queues.ordered(key, now, self.aging_s)
        # Only workers the head job has not failed on (while one is up), and none being killed.
        candidates = self._allowed(ordered[0], [w for w in self.workers.values() if w.id not in self._killing])
        if not candidates:
            return None
        protected = self._protected() if protect_queued else set()

        def evictions(w: WorkerState) -> list[str] | None:
            return self._room_for(w, self._need(w, key, 1), protected | {key.model})

        backlog = math.ceil(self.queues.depth(key.model) / limits.max_batch_size)
        worker = self.placement.choose(key.model, candidates, evictions,
                                       lambda w: w.busy.utilization(now), backlog,
                                       lambda w: self._time_left(w, now),
                                       self._load_seconds.get(key.model, limits.est_load_seconds))
        if worker is None:
            if any(key.model in w.resident and not w.idle for w in self.workers.values()):
                self._waiting_on_warm = True
            return None
        size = min(limits.max_batch_size, self._oom_cap.get(self._shape(key, worker.id), limits.max_batch_size))
        jobs = [j for j in ordered if self._allowed(j, [worker])][:size]
        # The largest prefix of the batch that fits; shrinking beats an OOM.
        n = len(jobs)
        while n > 1 and self._room_for(worker, self._need(worker, key, n), protected | {key.model}) is None:
            n -= 1
        evict = self._room_for(worker, self._need(worker, key, n), protected | {key.model})
        assert evict is not None
        out: list[Decision] = []
        for m in evict:
            del worker.resident[m]
            out.append(UnloadModel(worker.id, m, "lru"))
        needs_load = key.model not in worker.resident
        if needs_load:
            out += self._load(worker, key.model, now, "batch")
        out.append(self._dispatch(key, jobs[:n], worker, now, needs_load))
        return out

    def _time_left(self, w: WorkerState, now: float) -> float:
        """Expected seconds until busy worker ``w`` is free."""
        batch = self.running.get(w.batch_id or "")
        if batch is None:
            return 0.0
        return max(0.0, self.job_work(batch.key) * batch.size - (now - batch.started_at))

    def _need(self, w: WorkerState, key: BatchKey, n: int) -> int:
        """Bytes a batch of ``n`` needs on ``w``: working memory, plus the weights unless resident.
        Guesses (figures from other models) are capped at what the worker could ever hold, so they
        cannot block a job forever: at worst the worker is emptied, the batch runs and is measured."""
        mem = self.memory
        resident = key.model in w.resident
        weights = 0 if resident else mem.weights(key.model)
        working = mem.working(key, n)
        if w.capacity is not None:
            known_weights = resident or bool(mem.known_weights(key.model))
            if not mem.working_is_known(key, n):
                working = min(working, max(0, w.capacity - (weights if known_weights else 0)))
            if not known_weights:
                weights = min(weights, max(0, w.capacity - working))
        return weights + working

    def _room_for(self, w: WorkerState, need: int, protected: set[str]) -> list[str] | None:
        """Models to evict from ``w`` so ``need`` more bytes fit ([] = fits as is; None = cannot)."""
        if w.capacity is None:
            return []
        free = w.capacity - w.used
        evict: list[str] = []
        for m in self.residency.eviction_order(w, protected | {self._running_model(w)} - {None}):
            if free >= need:
                break
            free += w.resident[m].bytes
            evict.append(m)
        return evict if free >= need else None

    def _protected(self) -> set[str]:
        """Models with queued work are never evicted or idle-unloaded (DESIGN: no needless reload)."""
        return {k.model for k in self.queues.keys()}

    def _running_model(self, w: WorkerState) -> str | None:
        return self.running[w.batch_id].key.model if w.batch_id in self.running else None

    def _load(self, w: WorkerState, model: str, now: float, reason: str, *, pin: bool = False) -> list[Decision]:
        out: list[Decision] = []
        if reason != "batch":
            evict = self._room_for(w, self.memory.weights(model), self._protected() | {model})
            for m in evict or []:
                del w.resident[m]
                out.append(UnloadModel(w.id, m, "lru"))
        min_warm = self.models[model].min_warm
        pinned = pin or (min_warm > 0 and self._warm_count(model) < min_warm)
        w.resident[model] = Resident(self.memory.weights(model), now, pinned=pinned, loading=True, load_started=now)
        out.append(LoadModel(w.id, model, reason))
        return out

    def _warm_count(self, model: str) -> int:
        return sum(1 for w in self.workers.values() if model in w.resident and w.resident[model].pinned)

    def _fill_warm_pools(self, now: float) -> list[Decision]:
        out: list[Decision] = []
        for model, limits in self.models.items():
            if limits.min_warm <= 0:
                continue
            # Pin copies that are already resident first, then load onto more workers.
            for w in self.workers.values():
                if self._warm_count(model) >= limits.min_warm:
                    break
                if model in w.resident:
                    w.resident[model].pinned = True
            while self._warm_count(model) < limits.min_warm:
                got = self.request_load(model, now, pin=True)
                if not got:
                    break
                out += got
        return out

    def _idle_unloads(self, now: float) -> list[Decision]:
        if now < self._unload_next:
            return []
        due_now, self._unload_next = self._unload_scan(now)
        out: list[Decision] = []
        for w, m in due_now:
            del w.resident[m]
            out.append(UnloadModel(w.id, m, "idle"))
        return out

    def _unload_scan(self, now: float) -> tuple[list[tuple[WorkerState, str]], float]:
        """Resident copies due for an idle unload now, and the earliest due time after ``now``.
        Copies with queued work, running, pinned or loading are never due."""
        protected = self._protected()
        due_now: list[tuple[WorkerState, str]] = []
        nxt = math.inf
        for w in self.workers.values():
            running = self._running_model(w)
            for m in w.resident:
                if m in protected or m == running:
                    continue
                due = self.residency.unload_at(m, w, self.models[m], self.last_arrival.get(m))
                if due is None:
                    continue
                if due <= now:
                    due_now.append((w, m))
                else:
                    nxt = min(nxt, due)
        return due_now, nxt

    def _preload(self, now: float) -> list[Decision]:
        """Load the model most likely to be requested next into an idle worker's free memory,
        evicting only models that are less likely to be needed."""
        if self.predictor is None:
            return []
        probs = self.predictor.next_probabilities(now)
        everywhere = {m for w in self.workers.values() for m in w.resident}
        wanted = sorted(((p, m) for m, p in probs.items()
                         if m not in everywhere and m in self.models and p >= self.preload_min_probability),
                        reverse=True)
        out: list[Decision] = []
        for p, model in wanted:
            idle = [w for w in self._idle() if not w.loading and self._may_load(w, model, now)]
            hotter = {m for w in idle for m in w.resident if probs.get(m, 0.0) >= p}
            protected = self._protected() | hotter | {model}
            # Room for the weights *and* one job of the shape last asked for: a preload that leaves
            # no room to run would only be evicted again by the batch it was meant for.
            key = self.last_key.get(model)
            need = self.memory.weights(model) + (self.memory.working(key, 1) if key else 0)
            hosts = {w.id: ev for w in idle if (ev := self._room_for(w, need, protected)) is not None}
            if not hosts:
                continue
            w = min((w for w in idle if w.id in hosts), key=lambda w: (len(hosts[w.id]), w.busy.utilization(now), w.id))
            for m in hosts[w.id]:
                del w.resident[m]
                out.append(UnloadModel(w.id, m, "lru"))
            w.resident[model] = Resident(self.memory.weights(model), now, loading=True, load_started=now)
            out.append(LoadModel(w.id, model, "preload"))
        return out

    def _fail_unplaceable(self, now: float) -> list[Decision]:
        """Jobs whose model plus one job's working memory exceed every worker's whole capacity can
        never run: fail them instead of queueing forever."""
        if not self.queues or not self.workers:
            return []
        caps = [w.capacity for w in self.workers.values()]
        if None in caps:
            return []
        biggest = max(caps)
        out: list[Decision] = []
        for key in self.queues.keys():
            # Measured or hinted figures only: a guess never fails a job.
            need = self.memory.known_weights(key.model) + self.memory.working(key, 1, known_only=True)
            if need > biggest:
                for job in list(self.queues.jobs(key)):
                    self._take_queued(job.id)
                    out.append(FailJob(job.id, "out_of_memory",
                                       f"{key.model} at {key.width}x{key.height} needs ~{need} bytes; "
                                       f"the largest worker has {biggest}"))
        return out

    # ---- internals: queues -----------------------------------------------------------------------

    def _ready(self, key: BatchKey, now: float) -> bool:
        return self.batching.ready(self.queues.size(key), self.queues.oldest_enqueued(key), self.models[key.model], now)

    def _head_order(self, key: BatchKey, now: float) -> tuple:
        return min(order_key(j, now, self.aging_s) for j in self.queues.jobs(key))

    def _dispatch(self, key: BatchKey, chosen: list[QueuedJob], worker: WorkerState, now: float,
                  needs_load: bool) -> RunBatch:
        for job in chosen:
            self.queues.remove(job.id)
        if not self.queues.depth(key.model):
            self._unload_next = -math.inf  # copies elsewhere lost their protection
        self._batch_seq += 1
        batch_id = f"{self._prefix}-{self._batch_seq:06d}"
        self.running[batch_id] = RunningBatch(batch_id, worker.id, key, {j.id: j for j in chosen}, now, len(chosen))
        self._watch[batch_id] = BatchWatch(now)
        for job in chosen:
            self._running_job[job.id] = batch_id
        worker.batch_id = batch_id
        worker.batches_run += 1
        worker.busy.start(now)
        worker.resident[key.model].last_used = now
        return RunBatch(batch_id, worker.id, key, tuple(j.id for j in chosen), needs_load)

    def _drain_estimate(self, model: str, depth: int) -> float:
        limits = self.models[model]
        per_batch = self._batch_seconds.get(model, DEFAULT_BATCH_SECONDS)
        workers = max(1, len(self.workers))
        batches = math.ceil(max(1, depth) / limits.max_batch_size)
        # Retry-After is for "when is there room again": one batch's worth of drain is enough.
        return max(1.0, math.ceil(per_batch * min(batches, 1 + batches // workers)))

    # ---- internals: failure handling (policies: retry.py, liveness.py) --------------------------------

    def _release(self, batch_id: str, now: float) -> RunningBatch | None:
        """Take a batch off the running set and free its worker; its jobs are the caller's."""
        batch = self.running.pop(batch_id, None)
        if batch is None:
            return None
        self._watch.pop(batch_id, None)
        for job_id in batch.jobs:
            self._running_job.pop(job_id, None)
        worker = self.workers.get(batch.worker)
        if worker is not None and worker.batch_id == batch_id:
            worker.batch_id = None
            worker.busy.stop(now)
            if batch.key.model in worker.resident:
                worker.resident[batch.key.model].last_used = now
                due = self.residency.unload_at(batch.key.model, worker, self.models[batch.key.model],
                                               self.last_arrival.get(batch.key.model))
                if due is not None:
                    self._unload_next = min(self._unload_next, due)
        return batch

    def _canceled(self, job_id: str, out: list[Decision]) -> bool:
        """A job whose cancel was already sent ends canceled, whatever happened to its batch."""
        if job_id not in self._cancel_sent:
            return False
        self._cancel_sent.discard(job_id)
        out.append(JobDequeued(job_id, "canceled"))
        return True

    def _fail_attempts(self, jobs, worker_id: str, code: str, message: str, now: float) -> list[Decision]:
        out: list[Decision] = []
        for job in list(jobs):
            if self._canceled(job.id, out):
                continue
            job.attempts += 1
            job.avoid.add(worker_id)
            self._any_avoid = True
            retry = self.retry.after_failure(job.id, job.key.model, job.attempts, code, now, job.deadline)
            if retry is None:
                out.append(FailJob(job.id, code, f"{message} (attempt {job.attempts} of {self.retry.max_attempts})"))
                continue
            if retry.model != job.key.model:
                job.key = job.key._replace(model=retry.model)
            if retry.at <= now:
                self.queues.add(job)
            else:
                self._delayed[job.id] = (retry.at, job)
            out.append(RetryJob(job.id, code, message, job.attempts, retry.at, retry.model))
        return out

    def _take_queued(self, job_id: str) -> QueuedJob:
        self._unload_next = -math.inf  # the model may have lost its last queued job
        if job_id in self._delayed:
            return self._delayed.pop(job_id)[1]
        return self.queues.remove(job_id)

    def _stop_requested(self, batch_id: str, now: float) -> None:
        watch = self._watch.get(batch_id)
        if watch is not None and watch.stop_requested is None:
            watch.stop_requested = now

    def _expire(self, now: float) -> list[Decision]:
        """Everything time-driven: retries whose backoff is over rejoin their queue; jobs past their
        deadline fail (a running one is also stopped at its next step); hung, stuck and silent
        workers are killed."""
        out: list[Decision] = []
        for job_id, (at, job) in list(self._delayed.items()):
            if at <= now:
                del self._delayed[job_id]
                self.queues.add(job)
        late: dict[str, list[str]] = {}  # batch id -> its jobs past their deadline
        while self._deadlines and self._deadlines[0][0] <= now:
            _, job_id = heapq.heappop(self._deadlines)
            if job_id in self.queues or job_id in self._delayed:
                self._take_queued(job_id)
                out.append(FailJob(job_id, ErrorCode.TIMEOUT, "deadline passed before the job could run"))
            elif job_id in self._running_job and job_id not in self._cancel_sent:
                late.setdefault(self._running_job[job_id], []).append(job_id)
        for batch_id, job_ids in late.items():
            batch = self.running[batch_id]
            for job_id in job_ids:
                self.job_ended(job_id, now)
                out.append(FailJob(job_id, ErrorCode.TIMEOUT, "deadline passed while running"))
            self._stop_requested(batch_id, now)
            out.append(CancelRunning(batch.worker, batch_id, tuple(job_ids)))
        if not self._liveness_on:
            return out
        for batch in list(self.running.values()):
            verdict = self.liveness.batch_verdict(self._watch[batch.id], now)
            if verdict is not None:
                out.extend(self._kill(batch.worker, *verdict))
        for worker_id, seen in list(self._seen.items()):
            if _due(self.liveness.silent_kill_at(seen), now):
                out.extend(self._kill(worker_id, ErrorCode.WORKER_CRASHED,
                                      f"no heartbeat for {self.liveness.heartbeat_timeout_s:g}s"))
        return out

    def _kill(self, worker_id: str, code: str, message: str) -> list[Decision]:
        if worker_id in self._killing:
            return []  # asked already; worker_down follows
        self._killing[worker_id] = (code, message)
        return [KillWorker(worker_id, code, message)]

    def _failure_deadlines(self) -> list[float]:
        times = [at for at, _ in self._delayed.values()]
        heap = self._deadlines
        while heap and not self._deadline_pending(heap[0][1]):
            heapq.heappop(heap)  # the job finished or left: its deadline no longer matters
        if heap:
            times.append(heap[0][0])
        if self._liveness_on:
            for batch in self.running.values():
                if batch.worker not in self._killing:
                    times.append(self.liveness.batch_kill_at(self._watch[batch.id]))
            times += [self.liveness.silent_kill_at(t) for w, t in self._seen.items() if w not in self._killing]
        return [t for t in times if t is not None]

    def _deadline_pending(self, job_id: str) -> bool:
        return (job_id in self.queues or job_id in self._delayed
                or (job_id in self._running_job and job_id not in self._cancel_sent))

    def _has_idle(self) -> bool:
        # Each running batch holds one distinct worker (a lost worker's batches are released), so
        # fewer batches than workers means one is free — exact unless a kill is pending.
        if self._killing:
            return bool(self._idle())
        return len(self.running) < len(self.workers)

    def _idle(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.idle and w.id not in self._killing]

    def _allowed(self, job: QueuedJob, workers: list[WorkerState]) -> list[WorkerState]:
        """The workers ``job`` may run on: those it has not failed on, as long as one of those is up
        (otherwise any: a one-worker deployment still retries)."""
        if not job.avoid or not any(w not in job.avoid for w in self.workers if w not in self._killing):
            return list(workers)
        return [w for w in workers if w.id not in job.avoid]

    @staticmethod
    def _shape(key: BatchKey, worker_id: str) -> tuple[str, int, int, int, str]:
        return (key.model, key.width, key.height, key.num_frames, worker_id)


def _due(deadline: float | None, now: float) -> bool:
    return deadline is not None and now >= deadline


def _work_units(key: BatchKey) -> float:
    """One job's size for time accounting: pixels × frames × steps (millions)."""
    return key.width * key.height * max(1, key.num_frames) * max(1, key.steps) / 1e6
