"""Workloads, pure: which requests to send (a weighted mix) and when (an arrival pattern).

A workload file is TOML or JSON::

    [arrival]
    pattern = "closed"      # closed (concurrency C) | rate (fixed interval) | poisson | bursts
    concurrency = 4         # closed loop: requests in flight
    rate = 2.0              # rate / poisson: requests per second
    burst_size = 8          # bursts: this many at once ...
    burst_interval_s = 5.0  # ... every this many seconds

    [[requests]]            # one class of the mix; drawn with probability weight / sum(weights)
    weight = 3
    model = "demo-image"
    size = "64x64"
    steps = 8
    priority = "standard"
    prompt = "a lighthouse at dusk"
"""
from __future__ import annotations

import json
import random
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

PATTERNS = ("closed", "rate", "poisson", "bursts")
_REQUEST_KEYS = {"weight", "model", "prompt", "size", "steps", "priority", "num_frames", "guidance"}
_ARRIVAL_KEYS = {"pattern", "concurrency", "rate", "burst_size", "burst_interval_s"}


class WorkloadError(ValueError):
    pass


@dataclass(frozen=True)
class Arrival:
    pattern: str = "closed"
    concurrency: int = 4
    rate: float = 2.0
    burst_size: int = 8
    burst_interval_s: float = 5.0

    def describe(self) -> str:
        if self.pattern == "closed":
            return f"closed loop, concurrency {self.concurrency}"
        if self.pattern == "bursts":
            return f"bursts of {self.burst_size} every {self.burst_interval_s:g}s"
        return f"{self.pattern} arrivals at {self.rate:g}/s"


@dataclass(frozen=True)
class Workload:
    requests: tuple[dict[str, Any], ...] = field(default_factory=lambda: (
        {"weight": 1.0, "model": "demo-image", "size": "64x64", "steps": 8, "priority": "standard"},))
    arrival: Arrival = Arrival()

    def with_arrival(self, **kw: Any) -> "Workload":
        kw = {k: v for k, v in kw.items() if v is not None}
        arrival = replace(self.arrival, **kw)
        _check_arrival(arrival)
        return replace(self, arrival=arrival)


def _check_arrival(a: Arrival) -> None:
    if a.pattern not in PATTERNS:
        raise WorkloadError(f"arrival.pattern: must be one of {', '.join(PATTERNS)}")
    if a.concurrency < 1 or a.burst_size < 1:
        raise WorkloadError("arrival.concurrency and arrival.burst_size must be ≥ 1")
    if a.rate <= 0 or a.burst_interval_s <= 0:
        raise WorkloadError("arrival.rate and arrival.burst_interval_s must be > 0")


def parse_workload(data: dict[str, Any]) -> Workload:
    unknown = sorted(set(data) - {"arrival", "requests"})
    if unknown:
        raise WorkloadError(f"{unknown[0]}: unknown section (expected [arrival] and [[requests]])")
    raw_arrival = data.get("arrival", {})
    bad = sorted(set(raw_arrival) - _ARRIVAL_KEYS)
    if bad:
        raise WorkloadError(f"arrival.{bad[0]}: unknown key")
    arrival = Arrival(**raw_arrival)
    _check_arrival(arrival)
    reqs = data.get("requests") or list(Workload().requests)
    out = []
    for i, r in enumerate(reqs):
        bad = sorted(set(r) - _REQUEST_KEYS)
        if bad:
            raise WorkloadError(f"requests[{i}].{bad[0]}: unknown key")
        if "model" not in r:
            raise WorkloadError(f"requests[{i}].model: is required")
        w = r.get("weight", 1.0)
        if not isinstance(w, (int, float)) or w <= 0:
            raise WorkloadError(f"requests[{i}].weight: must be a positive number")
        out.append({"weight": float(w), **{k: v for k, v in r.items() if k != "weight"}})
    return Workload(tuple(out), arrival)


def load_workload(path: str | Path | None) -> Workload:
    if path is None:
        return Workload()
    p = Path(path)
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise WorkloadError(f"{p}: {e}") from None
    return parse_workload(data)


def draw(workload: Workload, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` request bodies drawn from the mix (deterministic for a seed). Each has a unique prompt
    and seed, so no cache anywhere can answer two of them alike."""
    rng = random.Random(seed)
    classes = list(workload.requests)
    picks = rng.choices(classes, weights=[c["weight"] for c in classes], k=n)
    out = []
    for i, c in enumerate(picks):
        body = {k: v for k, v in c.items() if k != "weight"}
        body["prompt"] = f"{c.get('prompt', 'benchmark request')} #{i}"
        body["seed"] = rng.randrange(2**31)
        out.append(body)
    return out


def arrival_offsets(arrival: Arrival, n: int, seed: int = 0) -> list[float] | None:
    """Send times (seconds from the start) for an open loop; None for a closed loop."""
    if arrival.pattern == "closed":
        return None
    if arrival.pattern == "rate":
        return [i / arrival.rate for i in range(n)]
    if arrival.pattern == "poisson":
        rng = random.Random(seed)
        t, out = 0.0, []
        for _ in range(n):
            out.append(t)
            t += rng.expovariate(arrival.rate)
        return out
    return [(i // arrival.burst_size) * arrival.burst_interval_s for i in range(n)]
