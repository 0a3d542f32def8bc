"""Placement policies: which worker runs a batch of a given model, or "not yet"."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from ..types import WorkerState

Evictions = Callable[[WorkerState], "list[str] | None"]  # what hosting needs evicted; None = cannot
Utilization = Callable[[WorkerState], float]


class PlacementPolicy(Protocol):
    name: str

    def choose(self, model: str, workers: Sequence[WorkerState], evictions: Evictions, utilization: Utilization,
               backlog_batches: int = 1, wait_s: Callable[[WorkerState], float] = ...,
               load_s: float = ..., affinity: Callable[[WorkerState], float] = ...) -> WorkerState | None: ...


class WarmFirst:
    """The seed's decision logic. A warm worker (model resident) that is free gets the batch. If
    every warm worker is busy and *saturated* (utilization ≥ ``saturation``), and another free
    worker can load the model, load it there; if the warm workers are busy but not saturated,
    wait for them rather than pay a cold start. With no warm worker anywhere, load on a free
    worker that can host it. Ties go to the least loaded (utilization, then batches run, then id)."""

    name = "warm-first"

    def __init__(self, saturation: float = 0.9) -> None:
        self.saturation = saturation

    def choose(self, model: str, workers: Sequence[WorkerState], evictions: Evictions,
               utilization: Utilization, backlog_batches: int = 1,
               wait_s: Callable[[WorkerState], float] = lambda w: 0.0, load_s: float = float("inf"),
               affinity: Callable[[WorkerState], float] = lambda w: 0.0) -> WorkerState | None:
        """``backlog_batches``: full batches of this model waiting. A busy warm worker has room for
        one batch behind the one it runs; past that its "queue" is full and it counts as saturated.
        ``wait_s(w)``: expected seconds until busy ``w`` is free; ``load_s``: expected cold start.
        Waiting longer for a warm worker than a load would take is never worth it.
        ``affinity(w)``: how much of the batch's other state ``w`` holds (its LoRA adapters): among
        free warm workers, and among cold ones, more comes first (base model and adapters, then
        the base model alone)."""
        def least_loaded(w: WorkerState) -> tuple:
            return (-affinity(w), utilization(w), w.batches_run, w.id)

        warm = [w for w in workers if model in w.resident]
        free_warm = [w for w in warm if w.idle and evictions(w) is not None]
        if free_warm:
            return min(free_warm, key=least_loaded)
        # Only busy warm workers are worth waiting for: an idle one without room for the batch (its
        # memory held by warm-pool copies or models with queued work) may never have room.
        busy_warm = [w for w in warm if not w.idle]
        saturated = (backlog_batches > len(busy_warm) or all(utilization(w) >= self.saturation for w in busy_warm)
                     or min((wait_s(w) for w in busy_warm), default=0.0) > load_s)
        if busy_warm and not saturated:
            return None  # a warm worker will be free soon enough: no cold start
        cold = {w.id: ev for w in workers if w.idle and model not in w.resident and (ev := evictions(w)) is not None}
        if not cold:
            return None

        # Prefer room to spare (fewest evictions); among workers that must evict, the one whose
        # victims were used longest ago — so evictions follow LRU across the fleet, not per worker.
        def cost(w: WorkerState) -> tuple:
            victims = cold[w.id]
            newest_victim = max((w.resident[m].last_used for m in victims), default=float("-inf"))
            return (len(victims), newest_victim, len(w.resident), *least_loaded(w))

        return min((w for w in workers if w.id in cold), key=cost)


PLACEMENT = {WarmFirst.name: WarmFirst}
