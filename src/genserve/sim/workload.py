"""Request streams for the simulator: Poisson with time-of-day/week profiles, bursts, trace replay.
Deterministic for a given seed; generated lazily, in time order."""
from __future__ import annotations

import heapq
import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from .scenario import Burst, MixEntry, Scenario

DAY = 86400.0
WEEKDAY_FACTOR = (0.9, 0.95, 1.0, 1.05, 1.3, 0.7, 0.6)  # Mon..Sun; Friday is the busy one


@dataclass(frozen=True, slots=True)
class Arrival:
    t: float
    entry: MixEntry


def profile_multiplier(t: float, profile: str, peak: float, peak_hour: float) -> float:
    """1 off-peak, ``peak`` at ``peak_hour`` (a smooth 3-hour-wide bump); weekly adds weekday factors.
    Simulation time 0 is a Monday 00:00."""
    if profile == "flat":
        return 1.0
    hour = (t % DAY) / 3600.0
    d = min(abs(hour - peak_hour), 24 - abs(hour - peak_hour))
    m = 1.0 + (peak - 1.0) * math.exp(-0.5 * (d / 1.5) ** 2)
    if profile == "weekly":
        m *= WEEKDAY_FACTOR[int(t // DAY) % 7]
    return m


def _poisson(s: Scenario, rng: random.Random) -> Iterator[Arrival]:
    w = s.workload
    if not w.mix or w.rate_per_s <= 0:
        return
    weights = [e.weight for e in w.mix]
    cum = list(itertools.accumulate(weights))
    top = w.rate_per_s * max(1.0, w.peak_multiplier if w.profile != "flat" else 1.0) * (
        max(WEEKDAY_FACTOR) if w.profile == "weekly" else 1.0)
    t = 0.0
    while True:
        t += rng.expovariate(top)
        if t >= s.duration_s:
            return
        # Thinning: accept with probability rate(t) / top.
        if w.profile != "flat" and rng.random() * top > w.rate_per_s * profile_multiplier(t, w.profile, w.peak_multiplier, w.peak_hour):
            continue
        yield Arrival(t, w.mix[_pick(cum, rng.random() * cum[-1])])


def _pick(cum: list[float], x: float) -> int:
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _burst(b: Burst, rng: random.Random) -> Iterator[Arrival]:
    times = sorted(b.at_s + rng.random() * b.over_s for _ in range(b.count))
    for t in times:
        yield Arrival(t, b.entry)


def _trace(s: Scenario) -> Iterator[Arrival]:
    assert s.workload.trace is not None
    with open(s.workload.trace) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: r["t"])
    t0 = rows[0]["t"] if rows else 0.0
    for r in rows:
        yield Arrival(r["t"] - t0, MixEntry(r["model"], 1.0, r["width"], r["height"], r.get("num_frames", 0) or 0,
                                           r["steps"], r.get("priority", "standard"), r.get("tenant")))


def arrivals(s: Scenario) -> Iterator[Arrival]:
    rng = random.Random(s.seed)
    streams = [_trace(s)] if s.workload.kind == "trace" else [_poisson(s, random.Random(rng.random()))]
    streams += [_burst(b, random.Random(rng.random())) for b in s.workload.bursts]
    merged = heapq.merge(*streams, key=lambda a: a.t)
    if s.workload.max_requests is not None:
        merged = itertools.islice(merged, int(s.workload.max_requests))
    return merged
