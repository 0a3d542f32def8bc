"""The engine's side of autoscaling: when to ask the policy (every ``interval_s``), what was last
asked of the provider, and which workers to retire: pending ones (started, not up yet) first, then
idle ones. The policy itself is pure (``Autoscaler.decide(snapshot, state)``); this keeps its state
between decisions."""
from __future__ import annotations

from collections.abc import Sequence

from .fleet import Fleet
from .policies.autoscale import Autoscaler, FleetSnapshot
from .types import Decision, RetireWorker, ScaleTo, WorkerState
from .waiting import Waiting
from .work import WorkModel


def choose_retirees(workers: list[WorkerState], idle: list[WorkerState], queued_models: set[str], surplus: int,
                    now: float, pending: Sequence[str] = ()) -> list[str]:
    """Up to ``surplus`` workers to retire. First the ``pending`` ones (given oldest first; the
    newest goes first): they hold nothing and have cost nothing yet, and one left pending would take the slot a
    retired worker frees, cold-start, and be retired in turn (on a cluster, an unplaced actor keeps
    asking for a device). Then idle workers, the cheapest to lose first (holding the least, then the
    least used); never one that is loading, holds a warm-pool copy, or is the last worker holding a
    model that has queued work (losing it would turn that work into a cold start)."""
    holders = {m: {w.id for w in workers if m in w.resident} for m in queued_models}
    chosen: list[str] = list(reversed(pending))[:surplus]
    for w in sorted(idle, key=lambda w: (w.used, w.busy.utilization(now), w.id)):
        if len(chosen) == surplus:
            break
        if w.loading or any(r.pinned for r in w.resident.values()):
            continue
        if any(m in holders and holders[m] <= {w.id} for m in w.resident):
            continue  # the last holder of a model with queued work
        chosen.append(w.id)
        for ids in holders.values():
            ids.discard(w.id)
    return chosen


class Scaling:
    def __init__(self, autoscaler: Autoscaler) -> None:
        self.autoscaler = autoscaler
        self.state = autoscaler.initial_state()  # its target is what the provider was last asked for
        self._ask_again = False  # a device was lost: repeat the ScaleTo even for the same count
        self._next_at: float | None = None

    @property
    def target_devices(self) -> int | None:
        """The device count last asked of the provider (None: not asked yet, or to be asked again)."""
        return None if self._ask_again else self.state.target

    def device_lost(self) -> None:
        """A device was lost: the next tick asks the provider again, even for the same count."""
        self._ask_again = True

    def snapshot(self, now: float, waiting: Waiting, fleet: Fleet, work: WorkModel) -> FleetSnapshot:
        """The fleet as the policy sees it; demand in expected device-seconds."""
        queued = sum(work.job_work(k) * waiting.queues.size(k) for k in waiting.keys())
        up = len(fleet.workers)
        # Pending: asked for and not up; at least the workers the driver said are starting.
        return FleetSnapshot(now, up, max(0, (self.target_devices or 0) - up, len(fleet.pending)),
                             sum(1 for x in fleet.workers.values() if not x.idle), queued,
                             work.running_work(fleet.running.values(), now), work.arrival_rate(now),
                             max((m.min_warm for m in waiting.models.values()), default=0))

    def tick(self, now: float, waiting: Waiting, fleet: Fleet, work: WorkModel,
             excluded: dict | set) -> tuple[list[Decision], list[str]]:
        """Decisions, and the workers retired (the caller forgets them)."""
        if self._next_at is not None and now < self._next_at:
            return [], []
        self._next_at = now + self.autoscaler.limits.interval_s
        snap = self.snapshot(now, waiting, fleet, work)
        asked = self.target_devices
        want, self.state = self.autoscaler.decide(snap, self.state)
        self._ask_again = False
        out: list[Decision] = []
        if want != asked:
            out.append(ScaleTo(want, f"{self.autoscaler.policy.name}: queued {snap.queued_work_s:.1f} s of work, "
                                     f"arriving {snap.arrival_work_rate:.2f} dev-s/s, {snap.busy}/{snap.up} busy"))
        surplus = len(fleet.workers) + len(fleet.pending) - want
        retired: list[str] = []
        if surplus > 0:
            queued = {k.model for k in waiting.keys() if any(True for _ in waiting.jobs(k))}
            retired = choose_retirees(list(fleet.workers.values()), fleet.idle(excluded), queued, surplus, now,
                                      list(fleet.pending))
            out += [RetireWorker(w, "scale down") for w in retired]
        return out, retired

    def next_time(self, now: float) -> float:
        return max(now, self._next_at if self._next_at is not None else now)
