"""What models and batches need in memory, learned from the workers' measurements.

Weights: a worker reports a model's resident bytes after each load; until then the config's hint.
Working memory: a worker reports a batch's peak working bytes; the engine keeps exact figures per
(model, shape, batch size) and, for shapes it has not seen, scales the largest observed
bytes-per-unit (unit = one job's pixels × frames) for that model. Unknown models plan with 0.
"""
from __future__ import annotations

from .types import BatchKey


def batch_units(key: BatchKey, n: int) -> int:
    return n * key.width * key.height * max(1, key.num_frames)


class MemoryModel:
    def __init__(self, hints: dict[str, int] | None = None) -> None:
        self.hints = dict(hints or {})
        self.weights_measured: dict[str, int] = {}
        self.working_exact: dict[tuple[BatchKey, int], int] = {}
        self.per_unit: dict[str, float] = {}

    def weights(self, model: str) -> int:
        return self.weights_measured.get(model, self.hints.get(model, 0))

    def working(self, key: BatchKey, n: int) -> int:
        exact = self.working_exact.get((key, n))
        if exact is not None:
            return exact
        return int(self.per_unit.get(key.model, 0.0) * batch_units(key, n))

    def observe_weights(self, model: str, nbytes: int) -> None:
        if nbytes > 0:
            self.weights_measured[model] = nbytes

    def observe_batch(self, key: BatchKey, n: int, peak_bytes: int) -> None:
        if peak_bytes <= 0 or n <= 0:
            return
        self.working_exact[(key, n)] = max(peak_bytes, self.working_exact.get((key, n), 0))
        ratio = peak_bytes / batch_units(key, n)
        # The largest ratio seen: over-estimating costs a smaller batch, under-estimating an OOM.
        self.per_unit[key.model] = max(ratio, self.per_unit.get(key.model, 0.0))
