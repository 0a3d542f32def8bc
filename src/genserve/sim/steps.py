"""Step-level batching on simulated devices: running sets that advance one denoising step per
event. A step costs the model's batch curve at the set's size for one step's pixels, plus the
fixed cost (``job_overhead_s``) of each job entering the set at that boundary; joiners enter
at the next boundary, finished jobs leave at once, a paused job keeps its progress for a resume on
the same device (elsewhere it starts again), as the real worker does (backends/step_runner.py)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import BatchKey, CancelRunning, Decision, Engine, JoinBatch, PauseRunning, RunBatch
from .scenario import Scenario


@dataclass(slots=True)
class StepSet:
    device: str
    generation: int
    key: BatchKey
    members: dict[str, int]  # job id -> steps left
    pending: list[str] = field(default_factory=list)  # joined, entering at the next step boundary
    most: int = 0  # the largest set size reached (what its working memory was sized by)


def step_units(key: BatchKey) -> int:
    return key.width * key.height * max(1, key.num_frames)  # one step's pixels


def _fresh(job: Any, left: int) -> bool:
    return left == job.steps  # not a resume on this device: it pays its set-up and decode


class SimStepSets:
    """The simulator's running sets (``jobs`` and ``devices`` are the driver's SimJob / SimDevice)."""

    def __init__(self, scenario: Scenario, engine: Engine, jobs: list[Any], devices: dict[str, Any],
                 schedule: Callable[[float, str], None], execute: Callable[[list[Decision], float], None]) -> None:
        self.s, self.engine, self.jobs, self.devices = scenario, engine, jobs, devices
        self.schedule = schedule  # (when, batch id): a step boundary event
        self.execute = execute
        self.sets: dict[str, StepSet] = {}

    def run(self, d: RunBatch, now: float) -> None:
        dev = self.devices[d.worker]
        start = max(now, dev.busy_until)  # after a load it waits for
        load_end, tier = dev.loading_until.get(d.key.model, (0.0, ""))
        st = StepSet(d.worker, dev.generation, d.key, {})
        fresh = 0
        for jid in d.job_ids:
            job = self.jobs[int(jid)]
            job.dispatched = now
            job.infer_start = start
            job.batch_size = len(d.job_ids)
            if load_end > now:
                job.load_wait = load_end - now
                job.tier = tier
            st.members[jid] = self._steps_left(job, st)
            fresh += _fresh(job, st.members[jid])
        self.sets[d.batch_id] = st
        self._next_step(d.batch_id, st, start, fresh)

    def join(self, d: JoinBatch, now: float) -> None:
        self.sets[d.batch_id].pending += d.job_ids  # the engine joins only sets it still runs
        for jid in d.job_ids:
            self.jobs[int(jid)].dispatched = now

    def cancel(self, d: CancelRunning) -> None:
        st = self.sets.get(d.batch_id)
        if st is not None:  # a running set frees the slot at once
            for jid in d.job_ids:
                st.members.pop(jid, None)
                if jid in st.pending:
                    st.pending.remove(jid)

    def pause(self, d: PauseRunning, now: float) -> None:
        st = self.sets[d.batch_id]
        for jid in d.job_ids:  # out at once; it keeps its progress for a resume on this device
            left: Any = st.members.pop(jid, None)
            if jid in st.pending:
                st.pending.remove(jid)
                left = self.jobs[int(jid)].steps
            self.jobs[int(jid)].resume = (st.device, st.generation, left)
            self.execute(self.engine.job_paused(jid, now), now)

    @staticmethod
    def _steps_left(job: Any, st: StepSet) -> int:
        r, job.resume = job.resume, None
        if r is not None and r[0] == st.device and r[1] == st.generation and r[2]:
            return r[2]
        return job.steps

    def _next_step(self, batch_id: str, st: StepSet, start: float, entering: int) -> None:
        """The next step over the set, after the per-job fixed cost of the ``entering`` jobs (the
        worker sets a joiner up between steps; its decode, at the end, is charged here too)."""
        dev = self.devices[st.device]
        n = len(st.members)
        st.most = max(st.most, n)
        m = self.s.models[st.key.model]
        px = step_units(st.key)
        took = entering * m.job_seconds(px) + m.step_seconds(n, px)
        dev.busy_until = start + took
        dev.busy_s += took
        self.schedule(start + took, batch_id)

    def stepped(self, batch_id: str, now: float) -> None:
        """A step boundary: members advance, finished ones leave, joiners enter."""
        st = self.sets[batch_id]
        dev = self.devices[st.device]
        if st.generation != dev.generation:  # the device crashed: the engine already retried its jobs
            del self.sets[batch_id]
            return
        for jid in list(st.members):
            st.members[jid] -= 1
            if st.members[jid] <= 0:
                del st.members[jid]
                job = self.jobs[int(jid)]
                if not job.failed:
                    job.finished = now
                self.engine.job_ended(jid, now)
        fresh = 0
        for jid in st.pending:
            job = self.jobs[int(jid)]
            job.infer_start = now
            job.batch_size = len(st.members) + 1
            st.members[jid] = self._steps_left(job, st)
            fresh += _fresh(job, st.members[jid])
        st.pending.clear()
        if st.members:
            self._next_step(batch_id, st, now, fresh)
            return
        del self.sets[batch_id]
        m = self.s.models[st.key.model]
        # working memory does not grow with steps: size it as for a job of the reference step count
        peak = m.working_bytes(st.most, step_units(st.key) * m.ref_steps)
        self.execute(self.engine.batch_finished(batch_id, now, peak), now)
