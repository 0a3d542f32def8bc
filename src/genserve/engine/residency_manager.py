"""The residency manager: which models each worker holds, and what fits where. In the spirit of
vLLM's KV-cache manager: the engine asks ``fit(worker, key, n, protected)`` and gets the evictions
that make room, or None. It also decides idle unloads, warm-pool loads, preloads and load back-off.

It owns every worker's ``resident`` table (the fleet owns the rest of ``WorkerState``), the memory
model, and the idle-unload due time, invalidated in one place (``invalidate``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from .fleet import Fleet
from .memory import MemoryModel
from .policies.preload import TransitionPredictor
from .policies.residency import ResidencyPolicy
from .types import BatchKey, Decision, LoadModel, ModelLimits, Resident, UnloadModel, WorkerState

# A failed warm-pool or preload load is not retried on that worker before 5 s, doubling per failure
# up to 5 min (a batch that needs the model may still ask for it).
LOAD_RETRY_S = (5.0, 300.0)


class ResidencyManager:
    def __init__(self, models: Mapping[str, ModelLimits], fleet: Fleet, policy: ResidencyPolicy,
                 last_arrival: Mapping[str, float], protected: Callable[[], set[str]], *, preload: bool = False,
                 preload_min_probability: float = 0.2) -> None:
        self.models = models
        self.fleet = fleet
        self.policy = policy
        self.last_arrival = last_arrival  # read-only: the work model's
        # Models with queued work, never evicted or idle-unloaded (asked only when needed: it is a scan).
        self.protected = protected
        self.memory = MemoryModel({m: lim.memory_bytes for m, lim in models.items() if lim.memory_bytes})
        self.predictor = TransitionPredictor() if preload else None
        self._warm_pools = any(lim.min_warm > 0 for lim in models.values())  # pinned copies can exist
        self.preload_min_probability = preload_min_probability
        self._load_backoff: dict[tuple[str, str], tuple[int, float]] = {}  # (worker, model) -> (failures, retry at)
        # Idle unloads are checked only when one can be due: the earliest future due time seen by
        # the last scan, lowered by events that start a countdown, -inf to force a rescan.
        self._unload_next = -math.inf

    def invalidate(self) -> None:
        """Something that protects copies from an idle unload changed: rescan before trusting the
        cached due time."""
        self._unload_next = -math.inf

    # ---- memory fit --------------------------------------------------------------------------------

    def need(self, w: WorkerState, key: BatchKey, n: int) -> int:
        """Bytes a batch of ``n`` needs on ``w``: working memory, plus the weights unless resident.
        Guesses (figures from other models, CPU estimates) for one job are capped at what the
        worker could ever hold beside its warm-pool copies, so they cannot block a job forever: at
        worst the worker is emptied, the job runs and is measured."""
        mem = self.memory
        resident = key.model in w.resident
        weights = 0 if resident else mem.weights(key.model)
        working = mem.working(key, n)
        if w.capacity is not None:
            room = w.capacity - self._pinned_besides(w, key.model)
            known_weights = resident or bool(mem.known_weights(key.model))
            if n == 1 and not mem.working_is_known(key, n):
                # Estimates and guesses may shrink a batch (larger n are not capped) but never keep
                # one job from running on an emptied worker. A resident copy occupies its bytes too.
                own = w.resident[key.model].bytes if resident else (weights if known_weights else 0)
                working = min(working, max(0, room - own))
            if not known_weights:
                weights = min(weights, max(0, room - working))
        return weights + working

    def room_for(self, w: WorkerState, need: int, protected: set[str], *,
                 evict_pinned: bool = False) -> list[str] | None:
        """Models to evict from ``w`` so ``need`` more bytes fit ([] = fits as is; None = cannot).
        Warm-pool copies go only with ``evict_pinned``, and last."""
        if w.capacity is None:
            return []
        free = w.capacity - w.used
        if free >= need:
            return []  # the common case, without ordering the candidates
        evict: list[str] = []
        keep = protected | {self.fleet.running_model(w)} - {None}
        order = self.policy.eviction_order(w, keep)
        if evict_pinned:
            order += sorted((m for m, r in w.resident.items() if r.pinned and not r.loading and m not in keep),
                            key=lambda m: (w.resident[m].last_used, m))
        for m in order:
            if free >= need:
                break
            free += w.resident[m].bytes
            evict.append(m)
        return evict if free >= need else None

    def fit(self, w: WorkerState, key: BatchKey, n: int, protected: set[str], *,
            evict_pinned: bool = False) -> list[str] | None:
        """Evictions that make room on ``w`` for a batch of ``n`` jobs of ``key``, or None."""
        return self.room_for(w, self.need(w, key, n), protected | {key.model}, evict_pinned=evict_pinned)

    def evict(self, w: WorkerState, models: list[str], reason: str = "lru") -> list[Decision]:
        for m in models:
            del w.resident[m]
        return [UnloadModel(w.id, m, reason) for m in models]

    def _pinned_besides(self, w: WorkerState, model: str) -> int:
        """Bytes of warm-pool copies of other models on ``w``: memory a batch of ``model`` never gets."""
        if not self._warm_pools:
            return 0
        return sum(r.bytes for m, r in w.resident.items() if r.pinned and m != model)

    def _known_need(self, key: BatchKey) -> int:
        """One job of ``key`` on an empty worker, from measured or hinted figures only."""
        return self.memory.known_weights(key.model) + self.memory.working(key, 1, known_only=True)

    def could_host(self, w: WorkerState, key: BatchKey) -> bool:
        """Could ``w`` run one job of ``key`` without evicting warm-pool copies of other models?
        Measured or hinted figures only: a guess never rules a worker out."""
        return w.capacity is None or self._known_need(key) <= w.capacity - self._pinned_besides(w, key.model)

    def unplaceable(self, keys: list[BatchKey]) -> list[tuple[BatchKey, str]]:
        """Keys no worker can ever run, with why: the model plus one job's working memory exceed
        every worker's whole capacity. Measured or hinted figures only: a guess never fails a job.
        (Warm-pool copies do not count: a job that fits nowhere beside them may evict one, last.)"""
        biggest = self.fleet.largest_capacity()
        if not keys or biggest is None:
            return []
        out = []
        for key in keys:
            need = self._known_need(key)
            if need > biggest:
                out.append((key, f"{key.model} at {key.width}x{key.height} needs ~{need} bytes; "
                                 f"the largest worker has {biggest}"))
        return out

    # ---- loads and unloads --------------------------------------------------------------------------

    def load(self, w: WorkerState, model: str, now: float, reason: str, *, pin: bool = False) -> list[Decision]:
        """Plan a load of ``model`` on ``w``. For a batch, the caller has made room already."""
        out: list[Decision] = []
        if reason != "batch":
            out += self.evict(w, self.room_for(w, self.memory.weights(model), self.protected() | {model}) or [])
        min_warm = self.models[model].min_warm
        pinned = pin or (min_warm > 0 and self._warm_count(model) < min_warm)
        w.resident[model] = Resident(self._planned_bytes(w, model), now, pinned=pinned, loading=True, load_started=now)
        out.append(LoadModel(w.id, model, reason))
        return out

    def _planned_bytes(self, w: WorkerState, model: str) -> int:
        """What a copy being loaded is planned to hold until the worker measures it: the known
        size, or a guess capped at the free memory left, so the plan never exceeds the worker's
        capacity (the caller has already made room for what it needs)."""
        weights = self.memory.weights(model)
        if w.capacity is None or self.memory.known_weights(model):
            return weights
        return min(weights, max(0, w.capacity - w.used))

    def loaded(self, worker_id: str, model: str, nbytes: int, now: float) -> float | None:
        """A worker finished loading ``model`` (``nbytes`` measured). Returns how long the load
        we asked for took (None: we had not asked, e.g. loaded before a restart)."""
        self.memory.observe_weights(model, nbytes)
        w = self.fleet.workers.get(worker_id)
        if w is None:
            return None
        r = w.resident.get(model)
        if r is None:  # loaded without us asking: account for it all the same
            r = w.resident[model] = Resident(nbytes, now, load_started=now)
        took = max(0.0, now - r.load_started) if r.loading else None
        r.loading = False
        r.bytes = nbytes or r.bytes
        self.invalidate()
        return took

    def load_failed(self, worker_id: str, model: str, now: float) -> None:
        """Forget the copy, and do not try it on this worker on our own initiative (warm pool,
        preload) until a backoff has passed — a batch asking for it still may."""
        w = self.fleet.workers.get(worker_id)
        if w is not None:
            w.resident.pop(model, None)
        n, _ = self._load_backoff.get((worker_id, model), (0, now))
        first, cap = LOAD_RETRY_S
        self._load_backoff[(worker_id, model)] = (n + 1, now + min(cap, first * 2 ** n))

    def _may_load(self, w: WorkerState, model: str, now: float) -> bool:
        entry = self._load_backoff.get((w.id, model))
        return entry is None or now >= entry[1]

    def request_load(self, model: str, now: float, excluded: Mapping[str, object], worker_id: str | None = None,
                     *, pin: bool = False) -> list[Decision]:
        """Operator (or warm pool) asks for ``model`` to be loaded. Returns [] when no worker can."""
        workers = self.fleet.workers
        candidates = [workers[worker_id]] if worker_id in workers else ([] if worker_id else list(workers.values()))
        candidates = [w for w in candidates if model not in w.resident and w.id not in excluded
                      and (not pin or self._may_load(w, model, now))]
        keep = self.protected() | {model}  # what load() will refuse to evict: the fit must hold without it
        fits = [w for w in candidates if self.room_for(w, self.memory.weights(model), keep) is not None]
        if not fits:
            return []
        w = min(fits, key=lambda w: (not w.idle, len(w.resident), w.busy.utilization(now), w.id))
        return self.load(w, model, now, "warm_pool" if pin else "operator", pin=pin)

    def request_unload(self, model: str, worker_id: str | None = None) -> list[Decision]:
        """Operator asks for ``model`` to be unloaded (from one worker or all). Workers running it
        keep it: unloading under a running batch is refused."""
        out: list[Decision] = []
        for w in self.fleet.workers.values():
            if worker_id and w.id != worker_id:
                continue
            r = w.resident.get(model)
            if r is None or r.loading or self.fleet.running_model(w) == model:
                continue
            out += self.evict(w, [model], "operator")
        return out

    def touched(self, w: WorkerState, model: str, now: float) -> None:
        """A batch of ``model`` ended on ``w``: its idle countdown starts now."""
        if model in w.resident:
            w.resident[model].last_used = now
            due = self.policy.unload_at(model, w, self.models[model], self.last_arrival.get(model))
            if due is not None:
                self._unload_next = min(self._unload_next, due)

    # ---- what the manager decides on its own ---------------------------------------------------------

    def _warm_count(self, model: str) -> int:
        return sum(1 for w in self.fleet.workers.values() if model in w.resident and w.resident[model].pinned)

    def fill_warm_pools(self, now: float, excluded: Mapping[str, object]) -> list[Decision]:
        out: list[Decision] = []
        if not self._warm_pools:
            return out
        for model, limits in self.models.items():
            if limits.min_warm <= 0:
                continue
            # Pin copies that are already resident first, then load onto more workers.
            for w in self.fleet.workers.values():
                if self._warm_count(model) >= limits.min_warm:
                    break
                if model in w.resident:
                    w.resident[model].pinned = True
            while self._warm_count(model) < limits.min_warm:
                got = self.request_load(model, now, excluded, pin=True)
                if not got:
                    break
                out += got
        return out

    def idle_unloads(self, now: float) -> list[Decision]:
        if now < self._unload_next:
            return []
        due_now, self._unload_next = self._unload_scan(now)
        out: list[Decision] = []
        for w, m in due_now:
            out += self.evict(w, [m], "idle")
        return out

    def _unload_scan(self, now: float) -> tuple[list[tuple[WorkerState, str]], float]:
        """Resident copies due for an idle unload now, and the earliest due time after ``now``.
        Copies with queued work, running, pinned or loading are never due."""
        protected = self.protected()
        due_now: list[tuple[WorkerState, str]] = []
        nxt = math.inf
        unload_at, models, last_arrival, running_model = (self.policy.unload_at, self.models, self.last_arrival,
                                                          self.fleet.running_model)  # a hot loop at fleet scale
        for w in self.fleet.workers.values():
            running = running_model(w)
            for m in w.resident:
                if m in protected or m == running:
                    continue
                due = unload_at(m, w, models[m], last_arrival.get(m))
                if due is None:
                    continue
                if due <= now:
                    due_now.append((w, m))
                else:
                    nxt = min(nxt, due)
        return due_now, nxt

    def preload(self, now: float, excluded: Mapping[str, object], last_key: Mapping[str, BatchKey]) -> list[Decision]:
        """Load the model most likely to be requested next into an idle worker's free memory,
        evicting only models that are less likely to be needed."""
        if self.predictor is None:
            return []
        idle = self.fleet.idle(excluded)
        probs = self.predictor.next_probabilities(now)
        everywhere = {m for w in self.fleet.workers.values() for m in w.resident}
        wanted = sorted(((p, m) for m, p in probs.items()
                         if m not in everywhere and m in self.models and p >= self.preload_min_probability),
                        reverse=True)
        out: list[Decision] = []
        for p, model in wanted:
            hosts_idle = [w for w in idle if w.idle and not w.loading and self._may_load(w, model, now)]
            hotter = {m for w in hosts_idle for m in w.resident if probs.get(m, 0.0) >= p}
            keep = self.protected() | hotter | {model}
            # Room for the weights *and* one job of the shape last asked for: a preload that leaves
            # no room to run would only be evicted again by the batch it was meant for.
            key = last_key.get(model)
            need = self.memory.weights(model) + (self.memory.working(key, 1) if key else 0)
            hosts = {w.id: ev for w in hosts_idle if (ev := self.room_for(w, need, keep)) is not None}
            if not hosts:
                continue
            w = min((w for w in hosts_idle if w.id in hosts),
                    key=lambda w: (len(hosts[w.id]), w.busy.utilization(now), w.id))
            out += self.evict(w, hosts[w.id])
            w.resident[model] = Resident(self._planned_bytes(w, model), now, loading=True, load_started=now)
            out.append(LoadModel(w.id, model, "preload"))
        return out

    def next_times(self, now: float) -> list[float]:
        """When an idle unload or a load back-off (warm pools may retry then) comes due."""
        times: list[float] = []
        if self._unload_next == -math.inf:
            due_now, nxt = self._unload_scan(now)
            self._unload_next = now if due_now else nxt  # copies due now go at the next step
        if self._unload_next < math.inf:
            times.append(max(self._unload_next, now))
        times += [at for _, at in self._load_backoff.values() if at > now]
        return times
