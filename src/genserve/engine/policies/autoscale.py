"""Autoscaling policies: how many devices to want. Pure functions of a fleet snapshot and ``now``.

Every policy is ``desired(snapshot, state) -> (devices, state)``, like Ray Serve's autoscaling
policies: what it remembers (the predictive profile) is explicit state that the caller keeps.
Demand is measured in *work* — expected device-seconds — not in request counts, so one 3-minute
video and one 1-second image do not weigh the same. Each policy returns a raw device count; the
``Autoscaler`` applies the common limits (min/max, budget cap, warm pools) and the scale-down delay.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class FleetSnapshot:
    now: float
    up: int  # devices registered and usable
    pending: int  # asked for, still provisioning
    busy: int  # devices running a batch
    queued_work_s: float  # expected device-seconds of queued jobs
    running_work_s: float  # expected device-seconds left in running batches
    arrival_work_rate: float  # recent work arriving, device-seconds per second (≈ devices needed)
    warm_min: int  # devices the warm pools need


@dataclass(frozen=True)
class ScaleLimits:
    min_devices: int = 0
    max_devices: int = 8
    price_per_hour: float = 2.0
    budget_per_hour: float | None = None  # cap on price_per_hour × devices
    scale_down_delay_s: float = 120.0
    interval_s: float = 5.0  # how often the policy is evaluated


def apply_bounds(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


def budget_cap(limits: ScaleLimits) -> int:
    if limits.budget_per_hour is None or limits.price_per_hour <= 0:
        return limits.max_devices
    return int(math.floor(limits.budget_per_hour / limits.price_per_hour + 1e-9))


class QueueDepth:
    """Pull: add devices when queued work per device exceeds ``target_queue_s``. Otherwise want the
    busy devices plus enough to hold the queue at the target — so a fleet whose queue is short
    (batching windows keep a few jobs waiting at any moment) shrinks after the scale-down delay."""

    name = "queue_depth"

    def __init__(self, target_queue_s: float = 30.0, **_: float) -> None:
        self.target = target_queue_s

    def initial_state(self) -> None:
        return None

    def desired(self, s: FleetSnapshot, state: None = None) -> tuple[int, None]:
        return self.devices(s), state

    def devices(self, s: FleetSnapshot) -> int:
        have = s.up + s.pending
        queue_devices = math.ceil(s.queued_work_s / self.target - 1e-9) if s.queued_work_s > 0 else 0
        if s.queued_work_s > self.target * max(have, 0):
            return max(have + 1, queue_devices)
        return min(have, s.busy + queue_devices)


class Headroom:
    """Push: keep ``headroom`` (e.g. 20 %) spare capacity over current demand, where demand is the
    larger of the busy devices and the arrival work rate, plus what clears the queue in ``horizon_s``."""

    name = "headroom"

    def __init__(self, headroom: float = 0.2, horizon_s: float = 60.0, **_: float) -> None:
        self.headroom = headroom
        self.horizon = horizon_s

    def demand(self, s: FleetSnapshot) -> float:
        return max(float(s.busy), s.arrival_work_rate) + s.queued_work_s / self.horizon

    def initial_state(self) -> None:
        return None

    def desired(self, s: FleetSnapshot, state: None = None) -> tuple[int, None]:
        return math.ceil(self.demand(s) * (1.0 + self.headroom) - 1e-9), state


@dataclass(frozen=True)
class Profile:
    """Arrival work rate by time-of-period bucket. Readings within one bucket of one period are
    averaged; a bucket's past periods are blended as an EWMA (weight ``alpha`` for the newest).
    Immutable: ``observe`` returns the next profile (it is the predictive policy's state)."""

    period_s: float
    bucket_s: float
    alpha: float = 0.5
    past: Mapping[int, float] = field(default_factory=dict)  # bucket -> EWMA over completed periods
    current: Mapping[int, tuple[int, float, int]] = field(default_factory=dict)  # bucket -> (period, sum, n)

    def bucket(self, t: float) -> int:
        return int((t % self.period_s) // self.bucket_s)

    def observe(self, t: float, rate: float) -> "Profile":
        b, period = self.bucket(t), int(t // self.period_s)
        past, current = self.past, dict(self.current)
        cur = current.get(b)
        if cur is not None and cur[0] != period:  # a new period in this bucket: fold the old one
            _, total, n = current.pop(b)
            mean = total / n
            old = past.get(b)
            past = {**past, b: mean if old is None else (1 - self.alpha) * old + self.alpha * mean}
            cur = None
        _, total, n = cur if cur is not None else (period, 0.0, 0)
        current[b] = (period, total + rate, n + 1)
        return replace(self, past=past, current=current)

    def at(self, t: float, now: float) -> float | None:
        """The profile's rate for the bucket of ``t``, from periods before the one ``now`` is in."""
        b = self.bucket(t)
        value = self.past.get(b)
        cur = self.current.get(b)
        if cur is not None and cur[0] < int(now // self.period_s):
            mean = cur[1] / cur[2]  # an earlier period's readings, not folded yet
            value = mean if value is None else (1 - self.alpha) * value + self.alpha * mean
        return value


class Predictive:
    """Forecast demand ``lead_s`` ahead (set it to the provisioning lag) from a time-of-period
    profile (default: a week in 15-minute buckets) scaled by the recent trend, and provision for it
    now, with ``headroom`` on top and the queue cleared within ``horizon_s``. State: the profile."""

    name = "predictive"

    def __init__(self, lead_s: float = 60.0, period_s: float = 7 * 86400.0, bucket_s: float = 900.0,
                 headroom: float = 0.1, horizon_s: float = 60.0, **_: float) -> None:
        self.lead = lead_s
        self.period_s, self.bucket_s = period_s, bucket_s
        self.headroom = headroom
        self.horizon = horizon_s

    def initial_state(self) -> Profile:
        return Profile(self.period_s, self.bucket_s)

    def forecast(self, s: FleetSnapshot, profile: Profile) -> tuple[float, Profile]:
        profile = profile.observe(s.now, s.arrival_work_rate)
        ahead = profile.at(s.now + self.lead, s.now)
        here = profile.at(s.now, s.now)
        if ahead is None:
            return s.arrival_work_rate, profile
        # Trend: if today runs hotter than the profile says, expect the next bucket to as well.
        trend = s.arrival_work_rate / here if here and here > 0 else 1.0
        return ahead * min(max(trend, 0.5), 2.0), profile

    def desired(self, s: FleetSnapshot, state: Profile) -> tuple[int, Profile]:
        forecast, state = self.forecast(s, state)
        need = max(forecast, float(s.busy) if s.queued_work_s > 0 else 0.0) + s.queued_work_s / self.horizon
        return math.ceil(need * (1.0 + self.headroom) - 1e-9), state


class Hybrid:
    """Reserved baseline + burst on queue depth + prediction (warm pools come from the limits)."""

    name = "hybrid"

    def __init__(self, baseline: int = 1, **kw: float) -> None:
        self.baseline = int(baseline)
        self.queue = QueueDepth(**kw)
        self.predict = Predictive(**kw)

    def initial_state(self) -> Profile:
        return self.predict.initial_state()

    def desired(self, s: FleetSnapshot, state: Profile) -> tuple[int, Profile]:
        predicted, state = self.predict.desired(s, state)
        return max(self.baseline, self.queue.desired(s, None)[0], predicted), state


POLICIES = {p.name: p for p in (QueueDepth, Headroom, Predictive, Hybrid)}


@dataclass(frozen=True)
class ScaleState:
    """What autoscaling remembers between decisions: the target, the wishes of the last
    ``scale_down_delay_s`` (a sliding window), since when every wish has been below the target,
    and the policy's own state (the predictive profile)."""

    target: int | None = None
    wishes: tuple[tuple[float, int], ...] = ()
    below_since: float | None = None
    policy: Any = None


class Autoscaler:
    """A policy plus the limits every policy shares. ``decide`` is pure: snapshot and state in,
    device count and next state out. The fleet only shrinks to the highest count wished for during
    the whole scale-down delay — and keeps shrinking as older, higher wishes age out."""

    def __init__(self, policy: str, limits: ScaleLimits, **params: float) -> None:
        self.policy = POLICIES[policy](**params)
        self.limits = limits

    def initial_state(self) -> ScaleState:
        return ScaleState(policy=self.policy.initial_state())

    def decide(self, s: FleetSnapshot, state: ScaleState) -> tuple[int, ScaleState]:
        lim = self.limits
        hi = min(lim.max_devices, budget_cap(lim))
        raw, policy_state = self.policy.desired(s, state.policy)
        want = apply_bounds(max(raw, s.warm_min), lim.min_devices, hi)
        window_start = s.now - lim.scale_down_delay_s
        wishes = tuple(w for w in state.wishes if w[0] >= window_start) + ((s.now, want),)
        current = state.target if state.target is not None else s.up + s.pending  # start from the fleet as it is
        if want >= current or current > hi:
            # up at once (and down at once when over the limits)
            return want, ScaleState(want, wishes, None, policy_state)
        below_since = state.below_since if state.below_since is not None else s.now
        target = current
        if s.now - below_since >= lim.scale_down_delay_s:
            # Below for the whole delay: shrink to the highest wish of the window, and keep
            # shrinking as higher wishes age out of it.
            target = min(current, max(w for _, w in wishes))
        return target, ScaleState(target, wishes, below_since, policy_state)
