"""Device usage over time, pure: a ledger of busy / idle segments per worker, fed with ``now``.

The driver reports transitions (worker up/down, batch started/ended, resident set changed); the
ledger answers "how busy was each device between t0 and t1", "how long did warm devices sit idle"
and splits warm idle time across the models that kept the device warm. Busy means a batch holds the
device (dispatch to batch end: loading, inference and output writes) — the same span that is
charged to jobs as device-seconds, so busy time and charged time agree.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Segment:
    worker: str
    device_type: str
    busy: bool
    start: float
    end: float
    models: tuple[str, ...]  # resident while the segment lasted; idle with models = warm idle


@dataclass
class _Open:
    device_type: str
    busy: bool
    since: float
    models: tuple[str, ...] = ()


@dataclass
class WorkerUsage:
    device_type: str
    busy_s: float = 0.0
    idle_warm_s: float = 0.0
    idle_empty_s: float = 0.0

    @property
    def up_s(self) -> float:
        return self.busy_s + self.idle_warm_s + self.idle_empty_s

    @property
    def busy_fraction(self) -> float:
        return self.busy_s / self.up_s if self.up_s > 0 else 0.0


@dataclass
class WindowUsage:
    workers: dict[str, WorkerUsage] = field(default_factory=dict)
    # (model, device type) -> warm idle seconds, split equally across the models resident meanwhile
    idle_warm_by_model: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def busy_fraction(self) -> float:
        up = sum(w.up_s for w in self.workers.values())
        return sum(w.busy_s for w in self.workers.values()) / up if up > 0 else 0.0


class UsageLedger:
    def __init__(self, max_segments: int = 50_000) -> None:
        self._open: dict[str, _Open] = {}
        self._closed: deque[Segment] = deque(maxlen=max_segments)  # for windows; totals never forget
        self._totals: dict[str, WorkerUsage] = {}

    # ---- transitions -----------------------------------------------------------------------------

    def worker_up(self, worker: str, device_type: str, now: float) -> None:
        self.worker_down(worker, now)
        self._open[worker] = _Open(device_type, False, now)
        self._totals.setdefault(worker, WorkerUsage(device_type)).device_type = device_type

    def worker_down(self, worker: str, now: float) -> None:
        if worker in self._open:
            self._close(worker, now)
            del self._open[worker]

    def busy(self, worker: str, now: float) -> None:
        self._switch(worker, now, busy=True)

    def idle(self, worker: str, now: float) -> None:
        self._switch(worker, now, busy=False)

    def resident(self, worker: str, models: set[str] | frozenset[str], now: float) -> None:
        self._switch(worker, now, models=tuple(sorted(models)))

    def _switch(self, worker: str, now: float, busy: bool | None = None, models: tuple[str, ...] | None = None) -> None:
        cur = self._open.get(worker)
        if cur is None:
            return
        new_busy = cur.busy if busy is None else busy
        new_models = cur.models if models is None else models
        if (new_busy, new_models) == (cur.busy, cur.models):
            return
        self._close(worker, now)
        self._open[worker] = _Open(cur.device_type, new_busy, now, new_models)

    def _close(self, worker: str, now: float) -> None:
        cur = self._open[worker]
        end = max(now, cur.since)
        seg = Segment(worker, cur.device_type, cur.busy, cur.since, end, cur.models)
        if end > cur.since:
            self._closed.append(seg)
        _add(self._totals[worker], seg, seg.start, seg.end, None)

    # ---- queries ---------------------------------------------------------------------------------

    def is_busy(self, worker: str) -> bool:
        cur = self._open.get(worker)
        return cur is not None and cur.busy

    def totals(self, now: float) -> dict[str, WorkerUsage]:
        """Since each worker first came up (closed segments plus the open one up to ``now``)."""
        out = {w: WorkerUsage(u.device_type, u.busy_s, u.idle_warm_s, u.idle_empty_s) for w, u in self._totals.items()}
        for w, seg in self._open_segments(now):
            _add(out[w], seg, seg.start, seg.end, None)
        return out

    def window(self, since: float, now: float) -> WindowUsage:
        """Usage clipped to ``[since, now]``: per worker, and warm idle time per model."""
        out = WindowUsage()
        segs = [s for _, s in self._open_segments(now)]
        for seg in reversed(self._closed):
            if seg.end <= since:
                break  # segments close in time order
            segs.append(seg)
        for seg in segs:
            lo, hi = max(seg.start, since), min(seg.end, now)
            if hi <= lo:
                continue
            usage = out.workers.setdefault(seg.worker, WorkerUsage(seg.device_type))
            _add(usage, seg, lo, hi, out.idle_warm_by_model)
        return out

    def series(self, since: float, now: float, step: float) -> list[float | None]:
        """Busy fraction over all up devices, per ``step``-long bucket from ``since`` (None: none up)."""
        n = max(1, int(round((now - since) / step)))
        out: list[float | None] = []
        for i in range(n):
            w = self.window(since + i * step, min(now, since + (i + 1) * step))
            up = sum(u.up_s for u in w.workers.values())
            out.append(w.busy_fraction if up > 0 else None)
        return out

    def _open_segments(self, now: float) -> list[tuple[str, Segment]]:
        return [(w, Segment(w, o.device_type, o.busy, o.since, max(now, o.since), o.models)) for w, o in self._open.items()]


def _add(usage: WorkerUsage, seg: Segment, lo: float, hi: float, by_model: dict[tuple[str, str], float] | None) -> None:
    d = hi - lo
    if seg.busy:
        usage.busy_s += d
    elif seg.models:
        usage.idle_warm_s += d
        if by_model is not None:
            for m in seg.models:
                key = (m, seg.device_type)
                by_model[key] = by_model.get(key, 0.0) + d / len(seg.models)
    else:
        usage.idle_empty_s += d
