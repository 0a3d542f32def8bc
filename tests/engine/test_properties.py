"""Property-based tests of the engine: Hypothesis drives random event sequences through the
Engine's public methods only, and a small fake world carries out its decisions.

The world keeps a simulated clock and the truth about each worker (which models are loaded or
loading, which batch runs) and each job (queued, running, ended). After every event it calls
``step(now)``, carries out the decisions and checks the invariants below; at the end it stops
injecting failures, brings up a healthy worker and runs until nothing moves, and then every
accepted job must have ended.

Invariants (checked on every decision list, from ``step`` and from every event method):

* a job reaches a terminal outcome at most once, and no decision names a job after it ended
  (except the CancelRunning that stops a running job right after its deadline failed it);
* a job is in at most one running batch; RunBatch never names a running or ended job;
* a RunBatch holds 1..max_batch_size jobs of its model, each submitted with exactly its key
  (or the fallback model's key after a RetryJob to another model);
* a RunBatch goes to an up, idle worker that is not being killed (one batch per worker);
* on every worker with a capacity, the resident bytes never exceed it;
* the engine's books agree with the world: resident models (and which are loading), the batch
  each worker runs, and which jobs are queued;
* every job of a batch that failed or lost its worker gets exactly one decision (retry, fail or
  canceled): nothing is dropped on the floor; a job canceled while running ends canceled;
* ``next_deadline(now)`` is None or ≥ now;
* at the end, every accepted job has ended and ``has_pending()`` is False.

On failure Hypothesis prints the minimal event sequence as a trace of ``note`` lines.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, given, note, settings, strategies as st

from genserve.engine import (
    Backoff, BatchKey, CancelRunning, Engine, ErrorCode, FailJob, JobDequeued, KillWorker, Liveness, LoadModel,
    ModelLimits, Priority, RetireWorker, RetryJob, RetryPolicy, RunBatch, ScaleTo, UnloadModel,
)
from genserve.engine.policies.autoscale import Autoscaler, ScaleLimits

# ---- the fake world's physics -----------------------------------------------------------------------

MODELS = ("a", "b", "c")
WEIGHTS = {"a": 40, "b": 60, "c": 25}  # true resident bytes of each model
WORK_PER_UNIT = {"a": 2, "b": 3, "c": 1}  # true working bytes per job pixel
# Every capacity can host any model running one job of any shape (60 + 3·8 < 100), so nothing is
# unplaceable for good; but two or three models and a full batch do not fit together.
CAPACITIES = (100, 100, 150, 250, None)  # mostly tight
SHAPES = ((2, 2), (4, 2))  # (width, height): 4 or 8 units a job
POOL = ("w0", "w1", "w2", "w3")  # worker ids; a restarted worker comes back under its old id
CODES = tuple(ErrorCode)
KNOWN_CODES = {c.value for c in ErrorCode}


def key_of(model: str, shape: int) -> BatchKey:
    w, h = SHAPES[shape]
    return BatchKey(model, w, h, 0, 4, 1.0)


def working(key: BatchKey, n: int) -> int:
    return n * key.width * key.height * max(1, key.num_frames) * WORK_PER_UNIT[key.model]


@dataclass
class Job:
    id: str
    key: BatchKey  # what a RunBatch must carry: the submitted key, or its fallback after a retry
    state: str = "queued"  # queued | running | detached (its batch is gone, a decision is due) | done
    batch: str | None = None
    outcome: str | None = None  # succeeded | canceled | the failure code
    worker: str | None = None  # where its latest batch ran
    failed_on: set[str] = field(default_factory=set)  # workers where an attempt failed (counted)
    cancel_sent: bool = False  # canceled while running (CancelRunning): it can only end canceled now
    tenant: str | None = None


@dataclass
class WBatch:
    id: str
    worker: str
    key: BatchKey
    job_ids: tuple[str, ...]
    live: set[str]  # jobs of the batch not ended yet
    cancel: set[str] = field(default_factory=set)  # CancelRunning received
    timed_out: set[str] = field(default_factory=set)  # failed by their deadline while the batch runs
    doomed: bool = False  # its model failed to load on the worker: it will fail with model_load_failed


class Violation(AssertionError):
    pass


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise Violation(msg)


# ---- configurations ---------------------------------------------------------------------------------


@st.composite
def configs(draw):
    limits = {}
    for m in MODELS:
        limits[m] = ModelLimits(
            max_batch_size=draw(st.integers(1, 4)),
            max_wait_s=draw(st.sampled_from([0.0, 1.0, 3.0])),
            max_queue=draw(st.sampled_from([3, 100])),
            memory_bytes=draw(st.sampled_from([0, WEIGHTS[m]])),  # a hint, or unknown until measured
            min_warm=draw(st.sampled_from([0, 0, 0, 1])),
            keep_warm_s=draw(st.sampled_from([0.0, 5.0])),
            idle_unload_s=draw(st.sampled_from([None, 4.0, 30.0])),
            est_load_seconds=draw(st.sampled_from([0.5, 10.0])),
        )
    retry = RetryPolicy(
        max_attempts=draw(st.integers(1, 3)),
        backoff=Backoff(first_s=draw(st.sampled_from([0.0, 1.0])), base_s=2.0, max_s=10.0, jitter=0.2),
        fallback_after=draw(st.integers(1, 2)),
        fallbacks=draw(st.sampled_from([{}, {"a": "b"}])),
    )
    liveness = draw(st.sampled_from([
        Liveness.OFF,
        Liveness(hang_timeout_s=20.0, heartbeat_timeout_s=None, stop_grace_s=2.0),
        Liveness(hang_timeout_s=6.0, heartbeat_timeout_s=8.0, stop_grace_s=None),
        Liveness(hang_timeout_s=None, heartbeat_timeout_s=8.0, stop_grace_s=2.0),
    ]))
    autoscale = draw(st.sampled_from([False, False, False, True]))
    return dict(
        limits=limits,
        aging_s=draw(st.sampled_from([0.0, 5.0, 30.0])),
        retry=retry,
        liveness=liveness,
        preload=draw(st.booleans()),
        saturation=draw(st.sampled_from([0.5, 0.9])),
        autoscale=autoscale,
        workers=draw(st.lists(st.sampled_from(CAPACITIES), min_size=1, max_size=3)),
    )


def describe(cfg) -> str:
    lim = ", ".join(f"{m}: batch≤{l.max_batch_size} wait {l.max_wait_s:g}s queue≤{l.max_queue} "
                    f"hint {l.memory_bytes} warm {l.min_warm} idle {l.idle_unload_s}"
                    for m, l in cfg["limits"].items())
    r = cfg["retry"]
    return (f"models {{{lim}}}; aging {cfg['aging_s']:g}; attempts {r.max_attempts} fallbacks {dict(r.fallbacks)} "
            f"after {r.fallback_after}; {cfg['liveness']}; preload {cfg['preload']}; saturation {cfg['saturation']}; "
            f"autoscale {cfg['autoscale']}; workers {cfg['workers']}")


# ---- the fake world ----------------------------------------------------------------------------------


class World:
    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.limits: dict[str, ModelLimits] = cfg["limits"]
        autoscaler = None
        if cfg["autoscale"]:
            autoscaler = Autoscaler("queue_depth", ScaleLimits(min_devices=1, max_devices=4, scale_down_delay_s=5.0,
                                                               interval_s=2.0), target_queue_s=3.0)
        self.engine = Engine(self.limits, aging_s=cfg["aging_s"], retry=cfg["retry"], liveness=cfg["liveness"],
                             preload=cfg["preload"], saturation=cfg["saturation"], autoscaler=autoscaler)
        self.now = 0.0
        self.jobs: dict[str, Job] = {}
        self.up: dict[str, int | None] = {}  # worker -> capacity
        self.loaded: dict[str, set[str]] = {}  # worker -> models loaded
        self.loads: dict[tuple[str, str], str] = {}  # (worker, model) -> reason: LoadModel sent, not done
        self.batches: dict[str, WBatch] = {}
        self.kills: dict[str, str] = {}  # worker -> code: KillWorker received, not carried out yet
        self.scale_target: int | None = None
        self.seq = 0
        self.healthy = 0
        for i, cap in enumerate(cfg["workers"]):
            self.worker_up(POOL[i], cap)

    # ---- carrying out decisions, checking each ----------------------------------------------------

    def apply(self, decisions, source: str) -> None:
        if decisions:
            note(f"  t={self.now:g} {source} -> {[_short(d) for d in decisions]}")
        self._apply(decisions)
        self._check_capacity()

    def _check_capacity(self) -> None:
        for wid, w in self.engine.workers.items():
            if w.capacity is None:
                continue
            used = sum(r.bytes for r in w.resident.values())
            if used > w.capacity:
                raise Violation(f"{wid}: resident {used} bytes > capacity {w.capacity}: "
                                f"{ {m: (r.bytes, 'loading' if r.loading else 'loaded') for m, r in w.resident.items()} }")

    def _apply(self, decisions) -> None:
        for d in decisions:
            event(_kind(d))
            if isinstance(d, RunBatch):
                self._run(d)
            elif isinstance(d, LoadModel):
                check(d.worker in self.up, f"{d}: worker is not up")
                check(d.model in self.limits, f"{d}: unknown model")
                check(d.model not in self.loaded[d.worker] and (d.worker, d.model) not in self.loads,
                      f"{d}: the model is already loaded or loading there")
                self.loads[(d.worker, d.model)] = d.reason
            elif isinstance(d, UnloadModel):
                check(d.worker in self.up, f"{d}: worker is not up")
                check(d.model in self.loaded[d.worker], f"{d}: not loaded there (still loading, or absent)")
                running = [b for b in self.batches.values() if b.worker == d.worker and b.key.model == d.model]
                check(not running, f"{d}: unloads the model of the batch running there ({running[0].id})"
                      if running else "")
                self.loaded[d.worker].discard(d.model)
            elif isinstance(d, KillWorker):
                check(d.worker in self.up, f"{d}: worker is not up")
                check(d.worker not in self.kills, f"{d}: asked twice")
                check(d.code in KNOWN_CODES, f"{d}: unknown code")
                self.kills[d.worker] = d.code
            elif isinstance(d, RetireWorker):
                check(d.worker in self.up, f"{d}: worker is not up")
                check(not any(b.worker == d.worker for b in self.batches.values()), f"{d}: it runs a batch")
                check(not any(w == d.worker for w, _ in self.loads), f"{d}: it is loading a model")
                self._gone(d.worker)
            elif isinstance(d, ScaleTo):
                check(d.devices >= 0, f"{d}: negative")
                self.scale_target = d.devices
            elif isinstance(d, CancelRunning):
                b = self.batches.get(d.batch_id)
                check(b is not None and b.worker == d.worker, f"{d}: no such batch running on that worker")
                for j in d.job_ids:
                    if j in b.timed_out:
                        # The one exception to "nothing about an ended job": a job failed by its
                        # deadline while running is stopped right after (FailJob, CancelRunning).
                        check(self.jobs[j].outcome == ErrorCode.TIMEOUT, f"{d}: {j} ended {self.jobs[j].outcome}")
                        continue
                    self._alive(j, d)
                    check(j in b.live, f"{d}: {j} is not running in that batch")
                    b.cancel.add(j)
                    self.jobs[j].cancel_sent = True
            elif isinstance(d, (FailJob, JobDequeued, RetryJob)):
                self._job_decision(d)
            else:
                raise Violation(f"unexpected decision {d!r}")

    def _alive(self, job_id: str, d) -> Job:
        job = self.jobs.get(job_id)
        check(job is not None, f"{d}: names a job that was never accepted")
        check(job.state != "done", f"{d}: names job {job_id}, which already ended ({job.outcome})")
        return job

    def _run(self, d: RunBatch) -> None:
        check(d.worker in self.up, f"{d}: worker is not up")
        check(d.worker not in self.kills, f"{d}: worker is being killed")
        busy = [b.id for b in self.batches.values() if b.worker == d.worker]
        check(not busy, f"{d}: worker already runs {busy}")
        check(d.batch_id not in self.batches, f"{d}: batch id reused")
        lim = self.limits.get(d.key.model)
        check(lim is not None, f"{d}: unknown model")
        check(1 <= len(d.job_ids) <= lim.max_batch_size, f"{d}: {len(d.job_ids)} jobs, max {lim.max_batch_size}")
        check(len(set(d.job_ids)) == len(d.job_ids), f"{d}: a job twice")
        for j in d.job_ids:
            job = self._alive(j, d)
            check(job.state == "queued", f"{d}: job {j} is {job.state} (batch {job.batch})")
            check(job.key == d.key, f"{d}: job {j} was submitted as {job.key}")
        m = d.key.model
        if d.needs_load:
            check((d.worker, m) in self.loads, f"{d}: needs_load but no LoadModel precedes it")
        else:
            check(m in self.loaded[d.worker] or (d.worker, m) in self.loads, f"{d}: model neither loaded nor loading")
        self.batches[d.batch_id] = WBatch(d.batch_id, d.worker, d.key, d.job_ids, set(d.job_ids))
        for j in d.job_ids:
            self.jobs[j].state, self.jobs[j].batch, self.jobs[j].worker = "running", d.batch_id, d.worker

    def _job_decision(self, d) -> None:
        job = self._alive(d.job_id, d)
        check(not job.cancel_sent or isinstance(d, JobDequeued),
              f"{d}: job {job.id} was canceled while running: it must end canceled")
        if isinstance(d, RetryJob):
            check(job.state == "detached", f"{d}: job is {job.state}, not in a batch that just failed")
            check(d.code in KNOWN_CODES, f"{d}: unknown code")
            check(d.model in self.limits, f"{d}: retried on an unknown model")
            check(d.not_before >= self.now, f"{d}: not_before in the past")
            job.state, job.batch = "queued", None
            if d.counted and job.worker is not None:
                job.failed_on.add(job.worker)
            if d.model != job.key.model:
                event("RetryJob onto the fallback model")
                job.key = job.key._replace(model=d.model)
            return
        if isinstance(d, FailJob):
            check(d.code in KNOWN_CODES, f"{d}: unknown code")
            if job.state == "running":  # only a deadline ends a job in a batch that still runs
                check(d.code == ErrorCode.TIMEOUT, f"{d}: fails a running job")
                self.batches[job.batch].live.discard(job.id)
                self.batches[job.batch].timed_out.add(job.id)
            outcome = d.code
        else:
            check(d.reason == "canceled", f"{d}: unexpected reason")
            check(job.state != "running", f"{d}: dequeues a running job")
            outcome = "canceled"
        job.state, job.batch, job.outcome = "done", None, outcome

    def _gone(self, w: str) -> None:
        self.up.pop(w, None)
        self.loaded.pop(w, None)
        self.kills.pop(w, None)
        for k in [k for k in self.loads if k[0] == w]:
            del self.loads[k]

    def _detach(self, b: WBatch) -> list[str]:
        """The batch is over without its jobs' outcomes: each live one awaits a decision."""
        del self.batches[b.id]
        for j in b.live:
            self.jobs[j].state, self.jobs[j].batch = "detached", None
        return sorted(b.live)

    def _all_decided(self, detached: list[str], what: str) -> None:
        lost = [j for j in detached if self.jobs[j].state == "detached"]
        check(not lost, f"{what}: no decision for job(s) {lost} of the batch: lost")

    # ---- the state checks after every event -------------------------------------------------------

    def check_state(self) -> None:
        eng = self.engine
        check(set(eng.workers) == set(self.up), f"engine workers {sorted(eng.workers)} != up {sorted(self.up)}")
        self._check_capacity()
        for wid, w in eng.workers.items():
            loading = {m for (x, m) in self.loads if x == wid}
            check(set(w.resident) == self.loaded[wid] | loading,
                  f"{wid}: engine resident {sorted(w.resident)} != loaded {sorted(self.loaded[wid])} + "
                  f"loading {sorted(loading)}")
            check({m for m, r in w.resident.items() if r.loading} == loading,
                  f"{wid}: engine loading flags disagree with the loads in flight {sorted(loading)}")
            mine = [b.id for b in self.batches.values() if b.worker == wid]
            check(w.batch_id == (mine[0] if mine else None), f"{wid}: engine batch {w.batch_id}, world {mine}")
        for j in self.jobs.values():
            check(j.state != "detached", f"job {j.id} left detached")
            check(eng.is_queued(j.id) == (j.state == "queued"), f"job {j.id} is {j.state} but is_queued says "
                  f"{eng.is_queued(j.id)}")
        nd = eng.next_deadline(self.now)
        check(nd is None or nd >= self.now, f"next_deadline({self.now}) = {nd} is in the past")

    def step(self) -> None:
        self.apply(self.engine.step(self.now), "step")
        self.check_state()

    # ---- events -------------------------------------------------------------------------------------

    def worker_up(self, w: str, cap: int | None) -> None:
        note(f"t={self.now:g} worker_up {w} capacity={cap}")
        self.engine.worker_up(w, self.now, cap)
        self.up[w], self.loaded[w] = cap, set()

    def submit(self, model: str, shape: int, priority: Priority, deadline_in: float | None,
               tenant: str | None = None) -> None:
        self.seq += 1
        jid = f"j{self.seq}"
        key = key_of(model, shape)
        deadline = None if deadline_in is None else self.now + deadline_in
        depth = self.engine.queue_depth(model) if model in self.limits else 0
        # Tenants (fair share) mixed with jobs without one: the invariants hold on both paths.
        adm = self.engine.submit(jid, key, priority, self.now, deadline=deadline, tenant=tenant,
                                 weight=2.0 if tenant == "t2" else 1.0)
        note(f"t={self.now:g} submit {jid} {key.label()} {priority.name} tenant={tenant} deadline={deadline} -> "
             f"{'accepted' if adm.accepted else adm.reason}")
        if model not in self.limits:
            check(not adm.accepted and adm.reason == "unknown_model", f"unknown model admitted: {adm}")
        elif depth >= 2 * self.limits[model].max_queue:  # the ceiling, whoever asks
            check(not adm.accepted and adm.reason == "queue_full" and adm.retry_after_s > 0,
                  f"queue of {depth} admitted: {adm}")
        elif not adm.accepted:
            # Refused below the ceiling: a full queue with this tenant alone (share 0), or this
            # tenant holding its share while another tenant waits. Jobs the world counts as
            # queued include those parked for a retry, a superset of the engine's queue.
            check(adm.reason == "queue_full" and adm.retry_after_s > 0, f"refused how? {adm}")
            waiting = [j for j in self.jobs.values() if j.state == "queued" and j.key.model == model]
            if adm.share == 0:
                check(depth >= self.limits[model].max_queue, f"rejected with room in the queue: {adm}")
            else:
                check(any(j.tenant != tenant for j in waiting), f"share refusal with no one else waiting: {adm}")
                check(sum(j.tenant == tenant for j in waiting) >= adm.share,
                      f"refused under its share of {adm.share}: {adm}")
        if adm.accepted:
            self.jobs[jid] = Job(jid, key, tenant=tenant)

    def cancel(self, jid: str) -> None:
        note(f"t={self.now:g} cancel {jid} ({self.jobs[jid].state})")
        self.apply(self.engine.cancel(jid, self.now), "cancel")

    def _resolve_load(self, w: str, m: str, ok: bool) -> None:
        """A load in flight ends: it succeeds only if it fits next to what the worker holds."""
        del self.loads[(w, m)]
        res = self.engine.workers[w].resident
        others = sum(r.bytes for x, r in res.items() if x != m)
        cap = self.up[w]
        fits = cap is None or others + WEIGHTS[m] <= cap
        if ok and fits:
            note(f"t={self.now:g} model_loaded {w} {m} {WEIGHTS[m]} bytes")
            self.engine.model_loaded(w, m, WEIGHTS[m], self.now)
            self.loaded[w].add(m)
        else:
            note(f"t={self.now:g} model_load_failed {w} {m}" + ("" if fits else " (out of memory)"))
            self.engine.model_load_failed(w, m, self.now)
            for b in self.batches.values():
                if b.worker == w and b.key.model == m:
                    b.doomed = True

    def load_done(self, i: int, ok: bool) -> None:
        w, m = sorted(self.loads)[i % len(self.loads)]
        self._resolve_load(w, m, ok)

    def finish(self, bid: str, *, peak: bool = True) -> None:
        """The batch ends: the worker runs it after the load before it; out of memory if the batch
        does not fit next to the weights; otherwise each live job ends (done, or canceled) and then
        the batch."""
        b = self.batches[bid]
        w, m = b.worker, b.key.model
        if (w, m) in self.loads:
            self._resolve_load(w, m, True)
        if b.doomed or m not in self.loaded[w]:
            return self.fail(bid, ErrorCode.MODEL_LOAD_FAILED)
        cap = self.up[w]
        need = working(b.key, len(b.job_ids))
        if cap is not None and self.engine.workers[w].used + need > cap:
            return self.fail(bid, ErrorCode.OUT_OF_MEMORY)
        note(f"t={self.now:g} finish {bid} on {w}: live {sorted(b.live)} canceled {sorted(b.cancel)}")
        for j in b.job_ids:  # the ones that ended already (a deadline) are reported too, and ignored
            if j in b.live:
                job = self.jobs[j]
                job.state, job.batch, job.outcome = "done", None, "canceled" if j in b.cancel else "succeeded"
            self.engine.job_ended(j, self.now)
        del self.batches[bid]
        self.engine.batch_finished(bid, self.now, need if peak else 0)

    def early_end(self, bid: str) -> None:
        """One job of a running batch writes its output (or stops, if canceled) before the rest."""
        b = self.batches[bid]
        self.engine.batch_progress(bid, self.now)
        if not b.live:
            return
        j = sorted(b.live)[0]
        job = self.jobs[j]
        job.state, job.batch, job.outcome = "done", None, "canceled" if j in b.cancel else "succeeded"
        b.live.discard(j)
        note(f"t={self.now:g} job_ended {j} ({job.outcome}) in {bid}")
        self.engine.job_ended(j, self.now)

    def progress(self, bid: str) -> None:
        note(f"t={self.now:g} batch_progress {bid}")
        self.engine.batch_progress(bid, self.now)

    def fail(self, bid: str, code: str) -> None:
        b = self.batches[bid]
        w, m = b.worker, b.key.model
        if (w, m) in self.loads:
            self._resolve_load(w, m, code != ErrorCode.MODEL_LOAD_FAILED)
        if code == ErrorCode.MODEL_LOAD_FAILED:
            self.loaded[w].discard(m)  # the engine forgets the copy too
        note(f"t={self.now:g} batch_failed {bid} on {w} {code}")
        detached = self._detach(b)
        self.apply(self.engine.batch_failed(bid, code, f"injected {code}", self.now), "batch_failed")
        self._all_decided(detached, f"batch_failed {bid}")

    def crash(self, w: str) -> None:
        note(f"t={self.now:g} worker_down {w}" + (f" (killed: {self.kills[w]})" if w in self.kills else ""))
        detached = []
        for b in [b for b in self.batches.values() if b.worker == w]:
            detached += self._detach(b)
        self._gone(w)
        self.apply(self.engine.worker_down(w, self.now), "worker_down")
        self._all_decided(detached, f"worker_down {w}")

    def heartbeat(self) -> None:
        for w in self.up:
            self.engine.worker_seen(w, self.now)

    def advance(self, dt: float, heartbeat: bool) -> None:
        self.now += dt
        note(f"advance {dt:g} -> t={self.now:g}" + (" (heartbeats)" if heartbeat else ""))
        if heartbeat:
            self.heartbeat()

    def jump(self) -> None:
        nd = self.engine.next_deadline(self.now)
        if nd is not None and nd > self.now:
            note(f"jump to next_deadline t={nd:g}")
            self.now = nd

    def operator_load(self, m: str, w: str | None) -> None:
        note(f"t={self.now:g} request_load {m} on {w}")
        self.apply(self.engine.request_load(m, self.now, w), "request_load")

    def operator_unload(self, m: str, w: str | None) -> None:
        note(f"t={self.now:g} request_unload {m} on {w}")
        self.apply(self.engine.request_unload(m, self.now, w), "request_unload")

    # ---- the end: no more failures; run until nothing moves ------------------------------------------

    def drain(self, max_rounds: int = 400) -> None:
        note("---- drain: kills land, a healthy worker comes up, no more failures")
        for w in list(self.kills):
            self.crash(w)
        self.bring_up_healthy()
        for _ in range(max_rounds):
            self.heartbeat()
            for w, m in sorted(self.loads):
                if (w, m) in self.loads:
                    self._resolve_load(w, m, True)
            for bid in sorted(self.batches):
                self.finish(bid)
            if self.scale_target is not None and self.scale_target > len(self.up):
                self.bring_up_healthy()  # the provider starts what the autoscaler asked for
            self.heartbeat()
            self.step()
            for w in list(self.kills):  # none expected (heartbeats, progress), but carry them out
                self.crash(w)
            if not self.engine.has_pending() and not self.batches and not self.loads:
                break
            nd = self.engine.next_deadline(self.now)
            if nd is None and not self.batches and not self.loads:
                break  # nothing running and nothing to wait for: stuck
            self.now = nd if nd is not None and nd > self.now else self.now + 0.5
        open_jobs = {j.id: (j.state, j.key.label()) for j in self.jobs.values() if j.state != "done"}
        check(not open_jobs, f"t={self.now:g}: accepted jobs never ended: {open_jobs}; "
              f"next_deadline={self.engine.next_deadline(self.now)}")
        check(not self.engine.has_pending(), "has_pending() with every job ended")
        for j in self.jobs.values():
            check(j.outcome in {"succeeded", "canceled"} | KNOWN_CODES, f"{j.id}: outcome {j.outcome!r}")

    def bring_up_healthy(self) -> None:
        self.healthy += 1
        self.worker_up(f"healthy{self.healthy}", None)


def _kind(d) -> str:
    """A coarse label per decision, for ``--hypothesis-show-statistics``."""
    if isinstance(d, RetryJob):
        return f"RetryJob {d.code}" + ("" if d.counted else " (split)")
    if isinstance(d, (FailJob, KillWorker)):
        return f"{type(d).__name__} {d.code}"
    if isinstance(d, (LoadModel, UnloadModel)):
        return f"{type(d).__name__} {d.reason}"
    return type(d).__name__


def _short(d) -> str:
    if isinstance(d, RunBatch):
        return f"Run({d.batch_id}@{d.worker} {d.key.label()} {list(d.job_ids)}{' +load' if d.needs_load else ''})"
    if isinstance(d, LoadModel):
        return f"Load({d.model}@{d.worker} {d.reason})"
    if isinstance(d, UnloadModel):
        return f"Unload({d.model}@{d.worker} {d.reason})"
    if isinstance(d, RetryJob):
        return f"Retry({d.job_id} {d.code} #{d.attempts} at {d.not_before:g} on {d.model}{'' if d.counted else ' split'})"
    if isinstance(d, FailJob):
        return f"Fail({d.job_id} {d.code})"
    if isinstance(d, JobDequeued):
        return f"Dequeued({d.job_id})"
    if isinstance(d, CancelRunning):
        return f"CancelRunning({d.batch_id}@{d.worker} {list(d.job_ids)})"
    if isinstance(d, KillWorker):
        return f"Kill({d.worker} {d.code})"
    return repr(d)


# ---- the property -------------------------------------------------------------------------------------

ACTIONS = (["submit"] * 5 + ["advance"] * 3 + ["finish"] * 3 + ["load_done"] * 2
           + ["fail", "crash", "worker_up", "cancel", "kill_lands", "early_end", "progress", "heartbeat", "jump",
              "operator_load", "operator_unload"])


def act(world: World, data, action: str) -> None:
    draw = data.draw
    if action == "submit":
        model = draw(st.sampled_from(MODELS + ("zzz",)) if draw(st.integers(0, 19)) == 0 else st.sampled_from(MODELS))
        world.submit(model, draw(st.integers(0, len(SHAPES) - 1)), draw(st.sampled_from(list(Priority))),
                     draw(st.sampled_from([None, None, None, 1.0, 4.0, 20.0])),
                     draw(st.sampled_from([None, None, "t1", "t2"])))
    elif action == "advance":
        world.advance(draw(st.sampled_from([0.25, 1.0, 3.0, 10.0])), draw(st.booleans()))
    elif action == "heartbeat":
        note(f"t={world.now:g} heartbeats")
        world.heartbeat()
    elif action == "jump":
        world.jump()
    elif action == "cancel" and world.jobs:
        world.cancel(draw(st.sampled_from(sorted(world.jobs))))
    elif action == "load_done" and world.loads:
        world.load_done(draw(st.integers(0, 7)), draw(st.integers(0, 4)) > 0)
    elif action in ("finish", "fail", "early_end", "progress") and world.batches:
        bid = draw(st.sampled_from(sorted(world.batches)))
        if action == "finish":
            world.finish(bid, peak=draw(st.booleans()))
        elif action == "fail":
            world.fail(bid, draw(st.sampled_from(CODES + (ErrorCode.OUT_OF_MEMORY,) * 3)))
        elif action == "early_end":
            world.early_end(bid)
        else:
            world.progress(bid)
    elif action == "crash" and world.up:
        world.crash(draw(st.sampled_from(sorted(world.up))))
    elif action == "kill_lands" and world.kills:
        world.crash(draw(st.sampled_from(sorted(world.kills))))
    elif action == "worker_up":
        down = [w for w in POOL if w not in world.up]
        if down:
            world.worker_up(draw(st.sampled_from(down)), draw(st.sampled_from(CAPACITIES)))
    elif action == "operator_load":
        world.operator_load(draw(st.sampled_from(MODELS)), draw(st.sampled_from([None, *POOL])))
    elif action == "operator_unload":
        world.operator_unload(draw(st.sampled_from(MODELS)), draw(st.sampled_from([None, *POOL])))
    else:
        return
    world.step()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cfg=configs(), data=st.data())
def test_random_event_sequences_keep_the_invariants_and_lose_no_job(cfg, data):
    note(describe(cfg))
    world = World(cfg)
    world.step()
    for _ in range(data.draw(st.integers(0, 60), label="events")):
        act(world, data, data.draw(st.sampled_from(ACTIONS), label="action"))
    world.drain()


# ---- regressions: engine bugs the property above found (all fixed), as minimal reproductions ----------

K_A = BatchKey("a", 2, 2, 0, 4, 1.0)
K_C = BatchKey("c", 2, 2, 0, 4, 1.0)


def _engine(limits, *workers, **kw):
    eng = Engine(limits, liveness=Liveness.OFF, **kw)
    for wid, cap in workers:
        eng.worker_up(wid, 0.0, cap)
    return eng


def _outcome_within(eng, job_id, times):
    """The first RunBatch or FailJob for ``job_id`` over steps at ``times``, and next_deadline after each."""
    seen = []
    for t in times:
        for d in eng.step(t):
            if (isinstance(d, RunBatch) and job_id in d.job_ids) or (isinstance(d, FailJob) and d.job_id == job_id):
                return d
        seen.append((t, eng.next_deadline(t)))
    return seen


def test_regression_request_load_overcommits_a_worker():
    eng = _engine({"a": ModelLimits(4, 5.0, memory_bytes=60), "b": ModelLimits(1, 0.0, memory_bytes=60)}, ("w0", 100))
    eng.request_load("a", 0.0, "w0")
    eng.model_loaded("w0", "a", 60, 0.0)
    eng.submit("j", K_A, Priority.STANDARD, 1.0)  # a has queued work (its batching window is open)
    assert eng.step(1.0) == []
    decisions = eng.request_load("b", 1.0, "w0")  # the operator (or a warm pool) asks for b
    w = eng.workers["w0"]
    assert w.used <= w.capacity, (decisions, {m: r.bytes for m, r in w.resident.items()})


def test_regression_retry_starves_when_the_only_allowed_worker_cannot_host_it():
    eng = _engine({"a": ModelLimits(1, 0.0, memory_bytes=60)}, ("big", 100), ("small", 50))
    eng.submit("j", K_A, Priority.STANDARD, 0.0)
    [run] = [d for d in eng.step(0.0) if isinstance(d, RunBatch)]
    assert run.worker == "big"
    assert isinstance(eng.batch_failed(run.batch_id, "storage_error", "disk full", 1.0)[0], RetryJob)
    # "big" is up and idle; "small" can never hold a's 60 bytes.
    got = _outcome_within(eng, "j", [1.0, 2.0, 60.0, 3600.0])
    assert isinstance(got, (RunBatch, FailJob)), f"job j never ran again nor failed: (t, next_deadline) {got}"


def test_regression_warm_pool_copies_starve_other_models():
    eng = _engine({"a": ModelLimits(1, 0.0, memory_bytes=40), "b": ModelLimits(1, 0.0, memory_bytes=60, min_warm=1)},
                  ("w0", 100))
    assert eng.step(0.0) == [LoadModel("w0", "b", "warm_pool")]
    eng.model_loaded("w0", "b", 60, 0.0)
    eng.submit("j1", K_A, Priority.STANDARD, 1.0)
    [run] = [d for d in eng.step(1.0) if isinstance(d, RunBatch)]
    eng.model_loaded("w0", "a", 40, 1.0)
    eng.batch_finished(run.batch_id, 2.0, peak_bytes=8)  # a needs 40 + 8 next to b's pinned 60: never again
    eng.submit("j2", K_A, Priority.STANDARD, 3.0)
    got = _outcome_within(eng, "j2", [3.0, 10.0, 3600.0])
    # As a last resort the warm-pool copy makes room (a preference yields to an accepted job)...
    assert isinstance(got, RunBatch), f"job j2 never ran: (t, next_deadline) {got}"
    assert "b" not in eng.workers["w0"].resident
    # ...and the warm pool loads it again once the job is done.
    eng.batch_finished(got.batch_id, 3.5, peak_bytes=8)
    assert LoadModel("w0", "b", "warm_pool") in eng.step(3.5)


def test_regression_unmeasured_model_guessed_too_big_next_to_pinned_copies():
    eng = _engine({"b": ModelLimits(1, 0.0, min_warm=1), "c": ModelLimits(1, 0.0)}, ("w0", 100))
    assert eng.step(0.0) == [LoadModel("w0", "b", "warm_pool")]
    eng.model_loaded("w0", "b", 60, 0.0)  # c (really 25 bytes) is guessed at 60: 60 + 60 > 100
    eng.submit("j", K_C, Priority.STANDARD, 1.0)
    got = _outcome_within(eng, "j", [1.0, 10.0, 3600.0])
    assert isinstance(got, (RunBatch, FailJob)), f"job j never ran nor failed: (t, next_deadline) {got}"


def test_regression_idle_warm_worker_without_room_blocks_cold_start():
    eng = _engine({"a": ModelLimits(1, 0.0, memory_bytes=40, min_warm=1),
                   "b": ModelLimits(1, 0.0, memory_bytes=60, min_warm=1)}, ("w0", 100))
    assert eng.step(0.0) == [LoadModel("w0", "a", "warm_pool"), LoadModel("w0", "b", "warm_pool")]
    eng.model_loaded("w0", "a", 40, 0.0)
    eng.model_loaded("w0", "b", 60, 0.0)
    eng.submit("j1", K_A, Priority.STANDARD, 1.0)
    [run] = [d for d in eng.step(1.0) if isinstance(d, RunBatch)]
    eng.batch_finished(run.batch_id, 2.0, peak_bytes=8)  # now known: a cannot run next to b on w0
    eng.worker_up("big", 3.0, None)
    eng.submit("j2", K_A, Priority.STANDARD, 4.0)
    got = _outcome_within(eng, "j2", [4.0, 10.0, 3600.0])
    assert isinstance(got, RunBatch) and got.worker == "big", f"job j2 never ran: (t, next_deadline) {got}"


def test_regression_a_job_beside_warm_pool_copies_waits_for_a_worker_that_is_still_coming_up():
    # Failing a job because warm-pool copies fill the workers up *so far* would lose jobs that a
    # worker still starting (or restarting) could run: the job waits, and runs when it comes.
    eng = Engine({"x": ModelLimits(1, 0.0, memory_bytes=60), "y": ModelLimits(1, 0.0, memory_bytes=50, min_warm=1)},
                 liveness=Liveness.OFF)
    eng.submit("j1", BatchKey("x", 2, 2, 0, 4, 1.0), Priority.HIGH, 0.0, force=True)  # re-entered after a restart
    eng.worker_up("w0", 0.0, 100)
    assert not [d for d in eng.step(0.0) if isinstance(d, FailJob)]
    eng.worker_up("w1", 0.5, 100)
    [run] = [d for d in eng.step(0.5) if isinstance(d, RunBatch)]
    assert run.job_ids == ("j1",) and run.worker == "w1"


def test_regression_a_working_memory_guess_leaves_room_for_warm_pool_copies():
    eng = _engine({"x": ModelLimits(1, 0.0, memory_bytes=60), "y": ModelLimits(1, 0.0, memory_bytes=25, min_warm=1),
                   "z": ModelLimits(1, 0.0, memory_bytes=10)}, ("w0", 100))
    eng.step(0.0)
    eng.model_loaded("w0", "y", 25, 0.1)
    eng.submit("jz", BatchKey("z", 2, 2, 0, 4, 1.0), Priority.HIGH, 1.0)
    [run] = [d for d in eng.step(1.0) if isinstance(d, RunBatch)]
    eng.model_loaded("w0", "z", 10, 1.1)
    eng.batch_finished(run.batch_id, 2.0, 40)  # z: 10 bytes per pixel; x's working memory is guessed from it
    eng.submit("jx", BatchKey("x", 2, 2, 0, 4, 1.0), Priority.HIGH, 3.0)
    got = _outcome_within(eng, "jx", [3.0, 10.0, 3600.0])
    assert isinstance(got, RunBatch) and "y" in eng.workers["w0"].resident  # ran beside the warm copy
