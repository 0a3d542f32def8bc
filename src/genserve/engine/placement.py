"""Placement policies: which idle worker runs a batch of a given model."""
from __future__ import annotations

from collections.abc import Sequence

from .types import WorkerState


class WarmFirst:
    """Prefer an idle worker that already holds the model (no cold start). Otherwise take the idle
    worker with the fewest resident models, so loads spread and warm workers stay warm; ties go to
    the worker that has run the fewest batches (least loaded), then by id for determinism."""

    name = "warm-first"

    def choose(self, model: str, idle: Sequence[WorkerState]) -> WorkerState | None:
        if not idle:
            return None
        warm = [w for w in idle if model in w.resident]
        pool = warm or idle
        return min(pool, key=lambda w: (0 if warm else len(w.resident), w.batches_run, w.id))


PLACEMENT = {WarmFirst.name: WarmFirst}
