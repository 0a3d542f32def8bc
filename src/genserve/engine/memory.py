"""What models and batches need in memory, learned from the workers' measurements.

Weights: a worker reports a model's resident bytes after each load; until then the config's hint,
and without a hint the largest model measured so far (for planning only: a guess never fails a job).
Working memory: a worker reports a batch's peak working bytes; the engine keeps exact figures per
(model, shape, batch size) and, for shapes it has not seen, scales the largest observed
bytes-per-unit (unit = one job's pixels × frames) for that model. A model that has not run yet is
assumed to be as hungry per unit as the hungriest model seen so far (0 on a fresh start).

Estimates (a CPU worker computes one from the model's architecture; nothing is measured there) are
hints: they stand in for a shape until it is measured, so they may order work or shrink a batch,
but they never count as *known* — only a measured peak can make the engine refuse a shape as too
large (``working_is_known`` and ``known_only`` see measurements alone).
"""
from __future__ import annotations

from .types import BatchKey


def memory_key(key: BatchKey) -> BatchKey:
    """What working memory depends on: not the batch key's variant (a negative prompt's presence,
    a conditioning image's digest) nor its adapter set, which would otherwise grow these tables
    per image or adapter."""
    return key._replace(variant="", loras="") if key.variant or key.loras else key


def batch_units(key: BatchKey, n: int) -> int:
    return n * key.width * key.height * max(1, key.num_frames)


class MemoryModel:
    def __init__(self, hints: dict[str, int] | None = None) -> None:
        self.hints = dict(hints or {})
        self.weights_measured: dict[str, int] = {}
        self.working_exact: dict[tuple[BatchKey, int], int] = {}
        self.per_unit: dict[str, float] = {}
        self.estimated_exact: dict[tuple[BatchKey, int], int] = {}  # hints: never "known"
        self.estimated_per_unit: dict[str, float] = {}

    def known_weights(self, model: str) -> int:
        return self.weights_measured.get(model, self.hints.get(model, 0))

    def weights(self, model: str) -> int:
        known = self.known_weights(model)
        return known if known else max(self.weights_measured.values(), default=0)

    def working(self, key: BatchKey, n: int, *, known_only: bool = False) -> int:
        key = memory_key(key)
        exact = self.working_exact.get((key, n))
        if exact is not None:
            return exact
        ratio = self.per_unit.get(key.model)
        if ratio is None and known_only:
            return 0
        if ratio is None:
            hinted = self.estimated_exact.get((key, n))
            if hinted is not None:
                return hinted
            ratio = self.estimated_per_unit.get(key.model)
        if ratio is None:
            ratio = max(self.per_unit.values(), default=0.0)
        return int(ratio * batch_units(key, n))

    def working_is_known(self, key: BatchKey, n: int) -> bool:
        key = memory_key(key)
        return (key, n) in self.working_exact or key.model in self.per_unit

    def observe_weights(self, model: str, nbytes: int) -> None:
        if nbytes > 0:
            self.weights_measured[model] = nbytes

    def observe_batch(self, key: BatchKey, n: int, peak_bytes: int) -> None:
        if peak_bytes <= 0 or n <= 0:
            return
        key = memory_key(key)
        self.working_exact[(key, n)] = max(peak_bytes, self.working_exact.get((key, n), 0))
        ratio = peak_bytes / batch_units(key, n)
        # The largest ratio seen: over-estimating costs a smaller batch, under-estimating an OOM.
        self.per_unit[key.model] = max(ratio, self.per_unit.get(key.model, 0.0))

    def observe_estimate(self, key: BatchKey, n: int, estimated_bytes: int) -> None:
        """A worker's estimate for a batch it ran without measuring: a hint for this shape."""
        if estimated_bytes <= 0 or n <= 0:
            return
        key = memory_key(key)
        self.estimated_exact[(key, n)] = estimated_bytes
        ratio = estimated_bytes / batch_units(key, n)
        self.estimated_per_unit[key.model] = max(ratio, self.estimated_per_unit.get(key.model, 0.0))
