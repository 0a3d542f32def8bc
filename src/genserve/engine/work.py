"""The work model: what jobs, batches and loads cost in device-seconds, learned from what was
measured, and what is arriving. Feeds placement (expected waits), Retry-After and autoscaling."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from .types import BatchKey, ModelLimits, RunningBatch

DEFAULT_BATCH_SECONDS = 1.0  # used for Retry-After until a model has run a batch
ARRIVAL_TAU_S = 60.0  # time constant of the arrival work-rate average
_KEEP, _NEW = 0.7, 0.3  # EWMA weights of the old estimate and the new measurement


def ewma(old: float | None, new: float) -> float:
    return new if old is None else _KEEP * old + _NEW * new


def work_units(key: BatchKey) -> float:
    """One job's size for time accounting: pixels × frames × steps (millions)."""
    return key.width * key.height * max(1, key.num_frames) * max(1, key.steps) / 1e6


class WorkModel:
    def __init__(self, models: Mapping[str, ModelLimits]) -> None:
        self.models = models
        self._batch_seconds: dict[str, float] = {}  # model -> EWMA of batch wall time
        self._sec_per_unit: dict[str, float] = {}  # model -> seconds per job-pixel-frame-step
        self._load_seconds: dict[str, float] = {}  # model -> EWMA of load wall time
        self._arrivals = (0.0, 0.0)  # (decayed work sum, at time)
        self.last_arrival: dict[str, float] = {}  # model -> when a new request for it last arrived
        self.last_key: dict[str, BatchKey] = {}  # each model's most recent request shape

    # ---- observations ---------------------------------------------------------------------------

    def arrived(self, key: BatchKey, now: float, *, new: bool) -> None:
        """A job entered the queues; ``new`` is False for one re-entered after a restart, which
        says nothing about what users are asking for now."""
        self.last_key[key.model] = key
        if new:
            self.last_arrival[key.model] = now
            acc, at = self._arrivals
            self._arrivals = (acc * math.exp(-(now - at) / ARRIVAL_TAU_S) + self.job_work(key), now)

    def batch_done(self, key: BatchKey, size: int, took: float) -> None:
        self._batch_seconds[key.model] = ewma(self._batch_seconds.get(key.model), took)
        if took > 0 and size:
            per = took / (size * work_units(key))
            self._sec_per_unit[key.model] = ewma(self._sec_per_unit.get(key.model), per)

    def load_done(self, model: str, took: float) -> None:
        self._load_seconds[model] = ewma(self._load_seconds.get(model), took)

    # ---- estimates --------------------------------------------------------------------------------

    def job_work(self, key: BatchKey) -> float:
        """Expected device-seconds for one job of ``key``, at the batch sizes seen so far."""
        per = self._sec_per_unit.get(key.model)
        if per is None:
            return self.models[key.model].est_job_seconds
        return per * work_units(key)

    def load_seconds(self, model: str) -> float:
        return self._load_seconds.get(model, self.models[model].est_load_seconds)

    def time_left(self, batch: RunningBatch | None, now: float) -> float:
        """Expected seconds until ``batch`` ends (0 when there is none)."""
        if batch is None:
            return 0.0
        return max(0.0, self.job_work(batch.key) * batch.size - (now - batch.started_at))

    def running_work(self, batches: Iterable[RunningBatch], now: float) -> float:
        return sum(self.time_left(b, now) for b in batches)

    def arrival_rate(self, now: float) -> float:
        """Recent work arriving, device-seconds per second (≈ devices needed)."""
        acc, at = self._arrivals
        return acc * math.exp(-(now - at) / ARRIVAL_TAU_S) / ARRIVAL_TAU_S

    def drain_estimate(self, model: str, depth: int, workers: int) -> float:
        """Seconds until a full queue of ``model`` has room again: the Retry-After of a 429."""
        limits = self.models[model]
        per_batch = self._batch_seconds.get(model, DEFAULT_BATCH_SECONDS)
        batches = math.ceil(max(1, depth) / limits.max_batch_size)
        # Retry-After is for "when is there room again": one batch's worth of drain is enough.
        return max(1.0, math.ceil(per_batch * min(batches, 1 + batches // max(1, workers))))
