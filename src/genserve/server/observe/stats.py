"""Statistics over job records, pure: latency breakdowns, percentiles, per-model window stats and
the dashboard's time series. Records are the job store's dicts; nothing here reads a clock.

Percentiles use linear interpolation between closest ranks (numpy's default "linear" method), so
P50 of [1, 2, 3, 4] is 2.5 and P99.9 of a small sample approaches its maximum.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..jobs.cost import cost_usd
from ..status import JobStatus
from .usage import WindowUsage

Record = Mapping[str, Any]

# stage name -> (from timestamp, to timestamp) on the job record
STAGE_SPANS: dict[str, tuple[str, str]] = {
    "queue_wait": ("queued", "dispatched"),
    "cold_start": ("load_start", "load_end"),
    "inference": ("inference_start", "inference_end"),
    "output_write": ("inference_end", "output_written"),
    "total": ("received", "finished"),
}
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p99.9", 99.9))


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    out: dict[str, float | int | None] = {"count": len(values)}
    for name, q in PERCENTILES:
        out[name] = percentile(values, q)
    out["mean"] = sum(values) / len(values) if values else None
    out["max"] = max(values) if values else None
    return out


def breakdown(job: Record) -> dict[str, float | None]:
    """Seconds spent in each stage (None where the job has not passed both ends), and
    ``downtime``: for a job whose output was adopted (written while no server heard of it: the
    server was down), from the output being written to the job being finished; None otherwise."""
    out: dict[str, float | None] = {}
    for stage, (a, b) in STAGE_SPANS.items():
        ta, tb = job.get(f"t_{a}"), job.get(f"t_{b}")
        out[stage] = tb - ta if ta is not None and tb is not None else None
    written, finished = job.get("t_output_written"), job.get("t_finished")
    out["downtime"] = max(0.0, finished - written) if job.get("adopted") and written is not None \
        and finished is not None else None
    return out


def _finished_in(records: Iterable[Record], lo: float, hi: float) -> list[Record]:
    return [r for r in records if r.get("t_finished") is not None and lo <= r["t_finished"] < hi]


def _batches(jobs: Iterable[Record]) -> dict[str, Record]:
    return {j["batch_id"]: j for j in jobs if j.get("batch_id")}


def model_stats(jobs: Sequence[Record], window_s: float, n_workers: int) -> dict[str, Any]:
    """Stats of the terminal jobs of one model (already filtered to the window)."""
    ok = [j for j in jobs if j["status"] == JobStatus.SUCCEEDED]
    failed = [j for j in jobs if j["status"] == "failed"]
    ran = [j for j in jobs if j.get("batch_id")]
    stages = {s: summarize([b[s] for b in map(breakdown, ok) if b[s] is not None]) for s in STAGE_SPANS}
    batches = _batches(ran)
    codes: dict[str, int] = {}
    for j in failed:
        codes[j.get("error_code") or "unknown"] = codes.get(j.get("error_code") or "unknown", 0) + 1
    dev_s = sum(j.get("device_seconds") or 0.0 for j in jobs)
    cost = sum(j.get("cost_usd") or 0.0 for j in jobs)
    return {
        "count": len(jobs),
        "by_status": {s: sum(1 for j in jobs if j["status"] == s) for s in (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELED.value)},
        "throughput_per_s": len(ok) / window_s if window_s > 0 else None,
        "latency_s": stages.pop("total"),
        "stages_s": stages,
        "failure_rate": len(failed) / len(jobs) if jobs else None,
        "failures_by_code": {c: {"count": n, "rate": n / len(jobs)} for c, n in sorted(codes.items())},
        "cold_starts": len({j["batch_id"] for j in ran if j.get("t_load_start") is not None}),
        "cold_start_rate": (sum(1 for j in ran if j.get("t_load_start") is not None) / len(ran)) if ran else None,
        "batches": len(batches),
        "mean_batch_size": (sum(b.get("batch_size") or 0 for b in batches.values()) / len(batches)) if batches else None,
        "device_seconds": dev_s,
        "utilization": dev_s / (window_s * n_workers) if window_s > 0 and n_workers > 0 else None,
        "cost_usd": cost,
        "cost_per_inference_usd": cost / len(ok) if ok else None,
    }


def window_stats(records: Iterable[Record], since: float, now: float, *, n_workers: int,
                 usage: WindowUsage | None = None, prices: Mapping[str, float] | None = None,
                 models: Iterable[str] = ()) -> dict[str, Any]:
    """``GET /v1/stats``: per model (every name in ``models``, plus any seen in the records) and
    overall, over jobs that finished in ``[since, now]``. Idle cost comes from ``usage``: warm idle
    time is charged to the models that kept the device warm; idle time with nothing loaded is
    reported overall only."""
    window_s = max(0.0, now - since)
    done = _finished_in(records, since, now + 1e-9)
    names = list(dict.fromkeys([*models, *sorted({r["model"] for r in done})]))
    per_model = {m: model_stats([r for r in done if r["model"] == m], window_s, n_workers) for m in names}
    prices = prices or {}
    idle_by_model: dict[str, dict[str, float]] = {m: {"idle_warm_s": 0.0, "idle_cost_usd": 0.0} for m in names}
    for (m, dtype), secs in (usage.idle_warm_by_model.items() if usage else ()):
        slot = idle_by_model.setdefault(m, {"idle_warm_s": 0.0, "idle_cost_usd": 0.0})
        slot["idle_warm_s"] += secs
        slot["idle_cost_usd"] += cost_usd(secs, prices.get(dtype, 0.0))
    for m, st in per_model.items():
        st.update(idle_by_model.get(m, {"idle_warm_s": 0.0, "idle_cost_usd": 0.0}))
    overall = model_stats(done, window_s, n_workers)
    if usage is not None:
        ws = usage.workers.values()
        overall["utilization"] = usage.busy_fraction if ws else None
        overall["idle_warm_s"] = sum(w.idle_warm_s for w in ws)
        overall["idle_empty_s"] = sum(w.idle_empty_s for w in ws)
        overall["idle_cost_usd"] = sum(cost_usd(w.idle_warm_s + w.idle_empty_s, prices.get(w.device_type, 0.0)) for w in ws)
        overall["idle_warm_cost_usd"] = sum(cost_usd(w.idle_warm_s, prices.get(w.device_type, 0.0)) for w in ws)
    return {"window_s": window_s, "since": since, "now": now, "models": per_model, "overall": overall}


def queue_depth_at(records: Iterable[Record], t: float) -> int:
    """Jobs waiting in a queue at time ``t``, from their stage timestamps: queued at or before ``t``
    and not yet dispatched (nor finished, for jobs canceled while queued)."""
    n = 0
    for r in records:
        tq = r.get("t_queued")
        if tq is None or tq > t:
            continue
        left = r.get("t_dispatched")
        if left is None:
            left = r.get("t_finished")
        if left is None or left > t:
            n += 1
    return n


def timeseries(records: Sequence[Record], since: float, now: float, step: float,
               utilization: Sequence[float | None] | None = None) -> list[dict[str, Any]]:
    """The dashboard's series: one point per ``step`` from ``since`` to ``now``. ``records`` must
    include every job not finished before ``since`` (for the queue depth). ``utilization`` is the
    usage ledger's busy fraction for the same buckets."""
    n = max(1, int(round((now - since) / step)))
    out = []
    for i in range(n):
        lo, hi = since + i * step, min(now, since + (i + 1) * step)
        done = _finished_in(records, lo, hi if i < n - 1 else hi + 1e-9)
        ok = [r for r in done if r["status"] == JobStatus.SUCCEEDED]
        lat = [r["t_finished"] - r["t_received"] for r in ok]
        failed = sum(1 for r in done if r["status"] == "failed")
        cold = {r["batch_id"] for r in records if r.get("batch_id") and r.get("t_load_start") is not None
                and lo <= r["t_load_start"] < hi}
        cost = sum(r.get("cost_usd") or 0.0 for r in done)
        point: dict[str, Any] = {
            "t": hi, "queue_depth": queue_depth_at(records, hi), "throughput_per_s": len(ok) / max(hi - lo, 1e-9),
            "completed": len(done), "failure_rate": failed / len(done) if done else None,
            "cold_starts": len(cold), "cost_per_inference_usd": cost / len(ok) if ok else None,
            "utilization": utilization[i] if utilization is not None and i < len(utilization) else None,
        }
        for name, q in PERCENTILES[:3]:
            point[f"latency_{name}_s"] = percentile(lat, q)
        out.append(point)
    return out


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, *, lo: float = 1.0, hi: float = 7 * 86400.0) -> float:
    """``"300"``, ``"90s"``, ``"5m"``, ``"1h"``, ``"1d"`` -> seconds; ValueError outside ``[lo, hi]``."""
    t = str(text).strip().lower()
    unit = _UNITS.get(t[-1:], None)
    num = t[:-1] if unit is not None else t
    try:
        value = float(num) * (unit or 1.0)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration like 300, 90s, 5m, 1h") from None
    if not lo <= value <= hi:
        raise ValueError(f"must be between {lo:g}s and {hi:g}s")
    return value
