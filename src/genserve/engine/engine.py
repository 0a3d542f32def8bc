"""The engine: every scheduling decision, as a pure function of events and ``now``.

It never reads a clock, sleeps, starts threads or does I/O. Drivers (the asyncio server, unit
tests, later the simulator) feed it events and carry out the decisions it returns.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from .autoscale import Autoscaler, FleetSnapshot
from .batching import BATCHING
from .memory import MemoryModel
from .placement import PLACEMENT
from .preload import TransitionPredictor
from .queues import KeyedQueues, order_key
from .residency import RESIDENCY
from .types import (
    Admission,
    BatchKey,
    CancelRunning,
    Decision,
    FailJob,
    JobDequeued,
    LoadModel,
    ModelLimits,
    Priority,
    QueuedJob,
    Resident,
    RetireWorker,
    RunBatch,
    RunningBatch,
    ScaleTo,
    UnloadModel,
    WorkerState,
)

DEFAULT_BATCH_SECONDS = 1.0  # used for Retry-After until a model has run a batch
RECHECK_S = 1.0  # how soon to look again while a batch waits for a busy warm worker
ARRIVAL_TAU_S = 60.0  # time constant of the arrival work-rate average


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
    ) -> None:
        self.models = dict(models)
        self.aging_s = aging_s
        self.max_attempts = max_attempts
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

    def submit(self, job_id: str, key: BatchKey, priority: Priority, now: float, *, force: bool = False) -> Admission:
        """Queue a job. ``force`` skips the queue limit: used when re-entering jobs that were already
        accepted (server restart) — an accepted job is never turned away later."""
        adm = self.admit(key.model)
        if not adm.accepted and not (force and adm.reason == "queue_full"):
            return adm
        if job_id in self.queues or job_id in self._running_job:
            return Admission(True)  # idempotent
        self.queues.add(QueuedJob(job_id, key, priority, now))
        self.last_key[key.model] = key
        if not force:
            self.last_arrival[key.model] = now
            acc, at = self._arrivals
            self._arrivals = (acc * math.exp(-(now - at) / ARRIVAL_TAU_S) + self.job_work(key), now)
            if self.predictor is not None:
                self.predictor.observe(key.model, now)
        return Admission(True)

    def cancel(self, job_id: str, now: float) -> list[Decision]:
        if job_id in self.queues:
            self.queues.remove(job_id)
            return [JobDequeued(job_id, "canceled")]
        batch_id = self._running_job.get(job_id)
        if batch_id is not None and job_id not in self._cancel_sent:
            self._cancel_sent.add(job_id)
            batch = self.running[batch_id]
            return [CancelRunning(batch.worker, batch_id, (job_id,))]
        return []

    def is_queued(self, job_id: str) -> bool:
        return job_id in self.queues

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

    # ---- workers and models ----------------------------------------------------------------------

    def worker_up(self, worker_id: str, now: float, capacity: int | None = None) -> None:
        self.workers[worker_id] = WorkerState(worker_id, capacity)

    def worker_down(self, worker_id: str, now: float) -> list[Decision]:
        """A worker vanished. Its running jobs go back to the queue (keeping their place in line)
        unless they have used up their attempts, in which case they fail."""
        self.workers.pop(worker_id, None)
        out: list[Decision] = []
        for batch in [b for b in self.running.values() if b.worker == worker_id]:
            del self.running[batch.id]
            for job in batch.jobs.values():
                del self._running_job[job.id]
                if job.id in self._cancel_sent:
                    self._cancel_sent.discard(job.id)
                    out.append(JobDequeued(job.id, "canceled"))
                    continue
                job.attempts += 1
                if job.attempts >= self.max_attempts:
                    out.append(FailJob(job.id, "worker_crashed", f"worker lost {job.attempts} times while running the job"))
                else:
                    self.queues.add(job)
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

    def model_load_failed(self, worker_id: str, model: str, now: float) -> None:
        w = self.workers.get(worker_id)
        if w is not None:
            w.resident.pop(model, None)

    def batch_finished(self, batch_id: str, now: float, peak_bytes: int = 0) -> None:
        """The worker finished a batch (whatever each job's outcome) and is idle again.
        ``peak_bytes``: the working memory the worker measured for it (0 = not measured)."""
        batch = self.running.pop(batch_id, None)
        if batch is None:
            return
        for job_id in batch.jobs:
            self._running_job.pop(job_id, None)
            self._cancel_sent.discard(job_id)
        self.memory.observe_batch(batch.key, len(batch.jobs), peak_bytes)
        took = max(0.0, now - batch.started_at)
        prev = self._batch_seconds.get(batch.key.model)
        self._batch_seconds[batch.key.model] = took if prev is None else 0.7 * prev + 0.3 * took
        if took > 0:
            per = took / (len(batch.jobs) * _work_units(batch.key))
            old = self._sec_per_unit.get(batch.key.model)
            self._sec_per_unit[batch.key.model] = per if old is None else 0.7 * old + 0.3 * per
        worker = self.workers.get(batch.worker)
        if worker is not None and worker.batch_id == batch_id:
            worker.batch_id = None
            worker.busy.stop(now)
            if batch.key.model in worker.resident:
                worker.resident[batch.key.model].last_used = now

    def request_load(self, model: str, now: float, worker_id: str | None = None, *, pin: bool = False) -> list[Decision]:
        """Operator (or warm pool) asks for ``model`` to be loaded. Returns [] when no worker can."""
        candidates = [self.workers[worker_id]] if worker_id in self.workers else (
            [] if worker_id else list(self.workers.values()))
        candidates = [w for w in candidates if model not in w.resident]
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
            expected = self.job_work(b.key) * len(b.jobs)
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
            idle = [w for w in self.workers.values() if w.idle and not w.loading
                    and not any(r.pinned for r in w.resident.values())]
            for w in sorted(idle, key=lambda w: (w.used, w.busy.utilization(now), w.id), reverse=False)[:surplus]:
                del self.workers[w.id]
                out.append(RetireWorker(w.id, "scale down"))
        return out

    # ---- the decision ----------------------------------------------------------------------------

    def step(self, now: float) -> list[Decision]:
        """Unload what has idled out, fill warm pools, dispatch every ready batch that has a worker
        (best first), then preload into idle memory."""
        out: list[Decision] = self._idle_unloads(now)
        if self.autoscaler is not None:
            out += self._autoscale(now)
        out += self._fill_warm_pools(now)
        self._waiting_on_warm = False
        blocked: set[BatchKey] = set()
        while True:
            ready = [k for k in self.queues.keys() if k not in blocked and self._ready(k, now)]
            if not ready or not any(w.idle for w in self.workers.values()):
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
        times = []
        protected = self._protected()
        for w in self.workers.values():
            for m in w.resident:
                if m in protected or self._running_model(w) == m:
                    continue
                due = self.residency.unload_at(m, w, self.models[m], self.last_arrival.get(m))
                if due is not None:
                    times.append(max(due, now))
        if any(w.idle for w in self.workers.values()):
            for key in self.queues.keys():
                jobs = list(self.queues.jobs(key))
                t = self.batching.ready_at(len(jobs), min(j.enqueued_at for j in jobs), self.models[key.model])
                if t is not None and t > now:
                    times.append(t)
            if self._waiting_on_warm:
                times.append(now + RECHECK_S)  # utilization of the busy warm workers keeps rising
        if self.autoscaler is not None:
            times.append(max(now, self._next_scale_at if self._next_scale_at is not None else now))
        return min(times) if times else None

    # ---- internals: placement and memory ---------------------------------------------------------

    def _quiescent(self) -> bool:
        return bool(self.workers) and all(w.idle and not w.loading for w in self.workers.values())

    def _place(self, key: BatchKey, now: float, *, protect_queued: bool = True) -> list[Decision] | None:
        limits = self.models[key.model]
        jobs = self.queues.ordered(key, now, self.aging_s)[: limits.max_batch_size]
        protected = self._protected() if protect_queued else set()

        def evictions(w: WorkerState) -> list[str] | None:
            return self._room_for(w, self._need(w, key, 1), protected | {key.model})

        backlog = math.ceil(self.queues.depth(key.model) / limits.max_batch_size)
        worker = self.placement.choose(key.model, list(self.workers.values()), evictions,
                                       lambda w: w.busy.utilization(now), backlog,
                                       lambda w: self._time_left(w, now),
                                       self._load_seconds.get(key.model, limits.est_load_seconds))
        if worker is None:
            if any(key.model in w.resident and not w.idle for w in self.workers.values()):
                self._waiting_on_warm = True
            return None
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
        return max(0.0, self.job_work(batch.key) * len(batch.jobs) - (now - batch.started_at))

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
        pinned = pin or self._warm_count(model) < self.models[model].min_warm
        w.resident[model] = Resident(self.memory.weights(model), now, pinned=pinned, loading=True, load_started=now)
        out.append(LoadModel(w.id, model, reason))
        return out

    def _warm_count(self, model: str) -> int:
        return sum(1 for w in self.workers.values() if model in w.resident and w.resident[model].pinned)

    def _fill_warm_pools(self, now: float) -> list[Decision]:
        out: list[Decision] = []
        for model, limits in self.models.items():
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
        out: list[Decision] = []
        protected = self._protected()
        for w in self.workers.values():
            for m in self.residency.idle_unloads(w, self.models, self.last_arrival,
                                                 protected | {self._running_model(w)} - {None}, now):
                del w.resident[m]
                out.append(UnloadModel(w.id, m, "idle"))
        return out

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
            idle = [w for w in self.workers.values() if w.idle and not w.loading]
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
        if not self.workers or any(w.capacity is None for w in self.workers.values()):
            return []
        biggest = max(w.capacity for w in self.workers.values())
        out: list[Decision] = []
        for key in self.queues.keys():
            # Measured or hinted figures only: a guess never fails a job.
            need = self.memory.known_weights(key.model) + self.memory.working(key, 1, known_only=True)
            if need > biggest:
                for job in list(self.queues.jobs(key)):
                    self.queues.remove(job.id)
                    out.append(FailJob(job.id, "out_of_memory",
                                       f"{key.model} at {key.width}x{key.height} needs ~{need} bytes; "
                                       f"the largest worker has {biggest}"))
        return out

    # ---- internals: queues -----------------------------------------------------------------------

    def _ready(self, key: BatchKey, now: float) -> bool:
        jobs = list(self.queues.jobs(key))
        return self.batching.ready(len(jobs), min(j.enqueued_at for j in jobs), self.models[key.model], now)

    def _head_order(self, key: BatchKey, now: float) -> tuple:
        return min(order_key(j, now, self.aging_s) for j in self.queues.jobs(key))

    def _dispatch(self, key: BatchKey, chosen: list[QueuedJob], worker: WorkerState, now: float,
                  needs_load: bool) -> RunBatch:
        for job in chosen:
            self.queues.remove(job.id)
        self._batch_seq += 1
        batch_id = f"{self._prefix}-{self._batch_seq:06d}"
        self.running[batch_id] = RunningBatch(batch_id, worker.id, key, {j.id: j for j in chosen}, now)
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


def _work_units(key: BatchKey) -> float:
    """One job's size for time accounting: pixels × frames × steps (millions)."""
    return key.width * key.height * max(1, key.num_frames) * max(1, key.steps) / 1e6
