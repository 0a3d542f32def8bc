"""The simulator: a discrete-event driver of the production engine over simulated devices.

It imports the real ``Engine`` and policies and never re-implements a decision; it only plays the
part the server and the workers play in production — a virtual clock, devices whose loads and
batches take the time the scenario's cost model says, and a provider that provisions devices
after a delay.
"""
from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from typing import assert_never

from ..engine import (
    BatchKey,
    CancelRunning,
    Decision,
    Engine,
    FailJob,
    JobDequeued,
    JoinBatch,
    KillWorker,
    LoadModel,
    PauseRunning,
    Priority,
    RetireWorker,
    RetryJob,
    RunBatch,
    ScaleTo,
    UnloadModel,
)
from .scenario import Scenario
from .steps import SimStepSets
from .workload import arrivals

GIB = 1 << 30
HOST_CACHE_MODELS = 4  # recently unloaded models a simulated GPU host keeps in RAM

# event kinds (ints: cheaper to order and compare than strings)
READY, LOADED, DONE, CRASH, SAMPLE, STEP = range(6)


@dataclass(slots=True)
class SimJob:
    model: str
    arrival: float
    dispatched: float = math.nan
    load_wait: float = 0.0
    tier: str = ""
    infer_start: float = math.nan
    finished: float = math.nan
    failed: str = ""
    batch_size: int = 0
    retries: int = 0
    steps: int = 0
    resume: tuple[str, int, int] | None = None  # paused: (device, its generation, steps left)
    tenant: str | None = None


@dataclass(slots=True)
class SimDevice:
    id: str
    started: float  # billing starts when provisioning starts
    ready_at: float
    retired: float = math.nan
    busy_until: float = 0.0
    busy_s: float = 0.0
    loading_until: dict[str, tuple[float, str]] = field(default_factory=dict)  # model -> (load end, tier)
    host_cache: list[str] = field(default_factory=list)
    generation: int = 0  # bumped on a crash: events of the old life are ignored
    up: bool = False


@dataclass
class SimResult:
    scenario: Scenario
    jobs: list[SimJob]
    devices: list[SimDevice]
    end: float
    samples: list[tuple[float, int, int, int, int]]  # (t, queued, provisioning, idle, busy)
    events: int
    scale_decisions: list[tuple[float, int, str]]


class Simulator:
    def __init__(self, scenario: Scenario, progress: Callable[[float, int], None] | None = None) -> None:
        self.s = scenario
        self.progress = progress  # called at each sample with (simulated now, requests so far)
        self.engine = Engine(scenario.engine_settings())
        self.rng = random.Random(scenario.seed + 7919)
        self.heap: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.devices: dict[str, SimDevice] = {}
        self.provisioning: list[str] = []
        self.jobs: list[SimJob] = []
        self.batches: dict[str, tuple[str, int, RunBatch]] = {}  # batch id -> (device, generation, decision)
        self.steps = SimStepSets(scenario, self.engine, self.jobs, self.devices, self._step_at, self.execute)
        self.samples: list[tuple[float, int, int, int, int]] = []
        self.scale_log: list[tuple[float, int, str]] = []
        self.capacity = int(scenario.fleet.memory_gb * GIB)
        self._dev_seq = 0
        self.events = 0
        self._in_flight = 0  # LOADED and DONE events pending

    # ---- event plumbing ------------------------------------------------------------------------------

    def push(self, t: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, payload))

    def _new_device(self, now: float) -> None:
        did = f"d{self._dev_seq}"
        self._dev_seq += 1
        dev = SimDevice(did, now, now + self.s.fleet.provisioning_s)
        self.devices[did] = dev
        self.provisioning.append(did)
        self.push(dev.ready_at, READY, (did, dev.generation))

    def _schedule_crash(self, dev: SimDevice, now: float) -> None:
        rate = self.s.fleet.crash_rate_per_hour
        if rate > 0:
            self.push(now + self.rng.expovariate(rate / 3600.0), CRASH, (dev.id, dev.generation))

    # ---- carrying out the engine's decisions -----------------------------------------------------------

    def execute(self, decisions: list[Decision], now: float) -> None:
        for d in decisions:
            match d:
                case RunBatch():
                    if self.s.models[d.key.model].limits.stepped(d.key):
                        self.steps.run(d, now)
                    else:
                        self._run(d, now)
                case JoinBatch():
                    self.steps.join(d, now)
                case LoadModel():
                    self._load(d, now)
                case UnloadModel():
                    dev = self.devices[d.worker]
                    dev.host_cache.append(d.model)
                    del dev.host_cache[:-HOST_CACHE_MODELS]
                case ScaleTo():
                    self._scale_to(d, now)
                case RetireWorker():
                    dev = self.devices[d.worker]
                    dev.retired = now
                    dev.up = False
                    dev.generation += 1
                case RetryJob():
                    self.jobs[int(d.job_id)].retries += 1  # the engine has requeued it
                case FailJob() | JobDequeued():
                    job = self.jobs[int(d.job_id)]
                    job.failed = d.code if isinstance(d, FailJob) else "canceled"
                    job.finished = now
                case CancelRunning():
                    # A simulated device stops the jobs at the next step boundary; the batch keeps
                    # its modelled duration (a step is short against a whole batch).
                    for jid in d.job_ids:
                        self.engine.job_ended(jid, now)
                    self.steps.cancel(d)
                case PauseRunning():
                    self.steps.pause(d, now)
                case KillWorker():
                    self._crash(self.devices[d.worker], now)  # killed: exactly like a crash
                case _:
                    assert_never(d)

    def _load(self, d: LoadModel, now: float) -> None:
        dev = self.devices[d.worker]
        m = self.s.models[d.model]
        tier = "host" if d.model in dev.host_cache else "disk"
        if tier == "host":
            dev.host_cache.remove(d.model)
        start = max(now, dev.busy_until)
        end = start + (m.load_host_s if tier == "host" else m.load_disk_s)
        dev.busy_until = end
        dev.loading_until[d.model] = (end, tier)
        self.push(end, LOADED, (d.worker, dev.generation, d.model, tier, start))
        self._in_flight += 1

    def _scale_to(self, d: ScaleTo, now: float) -> None:
        self.scale_log.append((now, d.devices, d.reason))
        have = sum(1 for x in self.devices.values() if x.up) + len(self.provisioning)
        for _ in range(d.devices - have):
            self._new_device(now)
        while have > d.devices and self.provisioning:
            dev = self.devices[self.provisioning.pop()]  # cancel the newest request
            dev.retired = now
            dev.generation += 1
            have -= 1

    def _crash(self, dev: SimDevice, now: float) -> None:
        dev.generation += 1
        dev.up = False
        dev.retired = now
        self.execute(self.engine.worker_down(dev.id, now), now)
        if self.engine.autoscaler is None:
            self._new_device(now)  # the pool restarts it

    def _run(self, d: RunBatch, now: float) -> None:
        dev = self.devices[d.worker]
        m = self.s.models[d.key.model]
        k = d.key
        pixels = k.width * k.height * max(1, k.num_frames)
        units = pixels * k.steps
        start = max(now, dev.busy_until)
        took = m.batch_seconds(len(d.job_ids), pixels, k.steps)
        end = start + took
        dev.busy_until = end
        dev.busy_s += took
        load_end, tier = dev.loading_until.get(k.model, (0.0, ""))
        for jid in d.job_ids:
            job = self.jobs[int(jid)]
            job.dispatched = now
            job.infer_start = start
            job.batch_size = len(d.job_ids)
            if load_end > now:  # this job waits for a load (its own, or a preload still running)
                job.load_wait = load_end - now
                job.tier = tier
        self.batches[d.batch_id] = (d.worker, dev.generation, d)
        self.push(end, DONE, (d.batch_id, units))
        self._in_flight += 1

    def _step_at(self, t: float, batch_id: str) -> None:
        self.push(t, STEP, batch_id)
        self._in_flight += 1

    # ---- the loop ----------------------------------------------------------------------------------------

    def run(self) -> SimResult:
        eng = self.engine
        models = self.s.models
        tenant_weights = self.s.tenants
        # The fleet you start with is up at time 0, all of it before the engine's first decision
        # (one at a time, an autoscaler would see one device and cancel the rest).
        for _ in range(self.s.fleet.initial):
            self._new_device(0.0)
        self.heap = []
        for did in self.provisioning:
            dev = self.devices[did]
            dev.ready_at, dev.up, dev.busy_until = 0.0, True, 0.0
            eng.worker_up(did, 0.0, self.capacity)
            self._schedule_crash(dev, 0.0)
        self.provisioning.clear()
        sample_every = max(1.0, self.s.duration_s / 400)
        self.push(0.0, SAMPLE, None)
        stream = arrivals(self.s)
        nxt = next(stream, None)
        now = 0.0
        inf = math.inf
        deadline = None
        while True:
            t_event = self.heap[0][0] if self.heap else inf
            t_arr = nxt.t if nxt is not None else inf
            t_dead = deadline if deadline is not None else inf
            t = min(t_event, t_arr, t_dead)
            if t == inf:
                break
            if nxt is None and not eng.has_pending() and self._in_flight == 0:
                break  # every request is done; what is left are samples and autoscaler ticks
            now = t
            self.events += 1
            if t_arr <= t_event and t_arr <= t_dead:
                e = nxt.entry
                jid = str(len(self.jobs))
                key = BatchKey(e.model, e.width, e.height, e.num_frames, e.steps, 1.0)
                if e.tenant is None:
                    self.jobs.append(SimJob(e.model, now, steps=e.steps))
                    adm = eng.submit(jid, key, _PRIORITY[e.priority], now)
                else:
                    self.jobs.append(SimJob(e.model, now, tenant=e.tenant, steps=e.steps))
                    adm = eng.submit(jid, key, _PRIORITY[e.priority], now, tenant=e.tenant,
                                     weight=tenant_weights.get(e.tenant, 1.0))
                if not adm.accepted:
                    self.jobs[-1].failed = adm.reason
                    self.jobs[-1].finished = now
                nxt = next(stream, None)
            elif t_event <= t_dead:
                _, _, kind, p = heapq.heappop(self.heap)
                if kind in (DONE, LOADED, STEP):
                    self._in_flight -= 1
                if kind == STEP:
                    self.steps.stepped(p, now)
                elif kind == DONE:
                    batch_id, units = p
                    wid, gen, d = self.batches.pop(batch_id)
                    dev = self.devices[wid]
                    if gen == dev.generation:
                        eng.batch_finished(batch_id, now, models[d.key.model].working_bytes(len(d.job_ids), units))
                        for jid in d.job_ids:
                            job = self.jobs[int(jid)]
                            if not job.failed:
                                job.finished = now
                elif kind == LOADED:
                    wid, gen, model, tier, start = p
                    dev = self.devices[wid]
                    if gen == dev.generation:
                        eng.model_loaded(wid, model, int(models[model].weights_gb * GIB), now)
                elif kind == READY:
                    wid, gen = p
                    dev = self.devices[wid]
                    if gen == dev.generation and math.isnan(dev.retired):
                        if wid in self.provisioning:
                            self.provisioning.remove(wid)
                        dev.up = True
                        dev.busy_until = now
                        eng.worker_up(wid, now, self.capacity)
                        self._schedule_crash(dev, now)
                elif kind == CRASH:
                    wid, gen = p
                    dev = self.devices[wid]
                    if gen == dev.generation and dev.up:
                        self._crash(dev, now)
                elif kind == SAMPLE:
                    self._sample(now)
                    if self.progress is not None:
                        self.progress(now, len(self.jobs))
                    if nxt is not None or eng.has_pending():
                        self.push(now + sample_every, SAMPLE, None)
            self.execute(eng.step(now), now)
            deadline = eng.next_deadline(now)
            if deadline is not None and deadline <= now:
                # The engine asked to be woken "now" right after deciding at ``now``: nothing new can
                # come of it at this instant, so look again a hair later.
                deadline = now + 1e-6
        for dev in self.devices.values():
            if math.isnan(dev.retired):
                dev.retired = now
        return SimResult(self.s, self.jobs, list(self.devices.values()), now, self.samples, self.events, self.scale_log)

    def _sample(self, now: float) -> None:
        busy = sum(1 for w in self.engine.workers.values() if not w.idle)
        up = len(self.engine.workers)
        self.samples.append((now, self.engine.queued(), len(self.provisioning), up - busy, busy))


_PRIORITY = {"high": Priority.HIGH, "standard": Priority.STANDARD, "low": Priority.LOW}


def simulate(scenario: Scenario, progress: Callable[[float, int], None] | None = None) -> SimResult:
    return Simulator(scenario, progress).run()
