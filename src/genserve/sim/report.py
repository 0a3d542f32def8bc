"""Simulation results: percentiles, stage breakdown, cost, SLO; as a table, JSON and a PNG plot."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .driver import SimResult

PCTS = (50, 95, 99, 99.9)


def percentile(sorted_xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_xs:
        return None
    k = max(0, min(len(sorted_xs) - 1, math.ceil(p / 100.0 * len(sorted_xs)) - 1))
    return sorted_xs[k]


def _stats(xs: list[float]) -> dict[str, float | None]:
    xs = sorted(xs)
    return {f"p{p:g}": percentile(xs, p) for p in PCTS} | {"mean": sum(xs) / len(xs) if xs else None}


def summarize(r: SimResult) -> dict[str, Any]:
    s = r.scenario
    done = [j for j in r.jobs if not j.failed and not math.isnan(j.finished)]
    price = s.fleet.price_per_hour
    billed = sum(d.retired - d.started for d in r.devices)
    busy = sum(d.busy_s for d in r.devices)
    device_hours = billed / 3600.0
    cost = device_hours * price
    first = min((j.arrival for j in r.jobs), default=0.0)
    last = max((j.finished for j in done), default=first)

    def block(jobs) -> dict[str, Any]:
        lat = [j.finished - j.arrival for j in jobs]
        return {
            "completed": len(jobs),
            "latency_s": _stats(lat),
            "queue_wait_s": _stats([j.dispatched - j.arrival - j.load_wait for j in jobs]),
            "cold_start_s": _stats([j.load_wait for j in jobs if j.load_wait > 0]),
            "inference_s": _stats([j.finished - j.infer_start for j in jobs]),
            "cold_start_fraction": sum(1 for j in jobs if j.load_wait > 0) / len(jobs) if jobs else 0.0,
            "mean_batch_size": sum(j.batch_size for j in jobs) / len(jobs) if jobs else 0.0,
            "slo_attainment": sum(1 for x in lat if x <= s.slo_s) / len(lat) if lat else None,
        }

    out: dict[str, Any] = {
        "scenario": s.name,
        "requests": len(r.jobs),
        "failed": sum(1 for j in r.jobs if j.failed),
        "throughput_per_s": len(done) / (last - first) if last > first else None,
        "makespan_s": r.end,
        "device_hours": device_hours,
        "utilization": busy / billed if billed else 0.0,
        "cost_total": cost,
        "cost_per_inference": cost / len(done) if done else None,
        "peak_devices": max((x[2] + x[3] + x[4] for x in r.samples), default=0),
        "slo_s": s.slo_s,
        "events": r.events,
        "overall": block(done),
        "per_model": {m: block([j for j in done if j.model == m]) for m in s.models},
        "scale_decisions": len(r.scale_decisions),
    }
    tenants = sorted({j.tenant for j in r.jobs if j.tenant is not None})
    if tenants:  # only scenarios with tenants: the others' summaries stay as they were
        out["per_tenant"] = {t: block([j for j in done if j.tenant == t]) for t in tenants}
    return out


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "$":
        return f"${v:,.2f}" if v >= 1 else f"${v:.4f}"
    if unit == "%":
        return f"{100 * v:.1f}%"
    return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"


ROWS = [
    ("requests", lambda x: f"{x['requests']:,}"),
    ("failed", lambda x: f"{x['failed']:,}"),
    ("P50 latency (s)", lambda x: _fmt(x["overall"]["latency_s"]["p50"])),
    ("P95 latency (s)", lambda x: _fmt(x["overall"]["latency_s"]["p95"])),
    ("P99 latency (s)", lambda x: _fmt(x["overall"]["latency_s"]["p99"])),
    ("P99.9 latency (s)", lambda x: _fmt(x["overall"]["latency_s"]["p99.9"])),
    ("P50 queue wait (s)", lambda x: _fmt(x["overall"]["queue_wait_s"]["p50"])),
    ("P99 queue wait (s)", lambda x: _fmt(x["overall"]["queue_wait_s"]["p99"])),
    ("cold-start fraction", lambda x: _fmt(x["overall"]["cold_start_fraction"], "%")),
    ("P50 inference (s)", lambda x: _fmt(x["overall"]["inference_s"]["p50"])),
    ("mean batch size", lambda x: _fmt(x["overall"]["mean_batch_size"])),
    ("throughput (req/s)", lambda x: _fmt(x["throughput_per_s"])),
    ("utilization", lambda x: _fmt(x["utilization"], "%")),
    ("peak devices", lambda x: str(x["peak_devices"])),
    ("device-hours", lambda x: _fmt(x["device_hours"])),
    ("total cost", lambda x: _fmt(x["cost_total"], "$")),
    ("cost per inference", lambda x: _fmt(x["cost_per_inference"], "$")),
    ("SLO attainment", lambda x: _fmt(x["overall"]["slo_attainment"], "%") + f" (≤ {x['slo_s']:g} s)"),
]


def table(summaries: list[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table, one column per run."""
    head = "| metric | " + " | ".join(name for name, _ in summaries) + " |"
    sep = "|---|" + "---|" * len(summaries)
    lines = [head, sep]
    for label, f in ROWS:
        lines.append(f"| {label} | " + " | ".join(f(x) for _, x in summaries) + " |")
    return "\n".join(lines)


def per_model_table(x: dict[str, Any]) -> str:
    lines = ["| model | completed | P50 (s) | P99 (s) | cold starts | mean batch |", "|---|---|---|---|---|---|"]
    for m, b in x["per_model"].items():
        if b["completed"]:
            lines.append(f"| {m} | {b['completed']:,} | {_fmt(b['latency_s']['p50'])} | {_fmt(b['latency_s']['p99'])} | "
                         f"{_fmt(b['cold_start_fraction'], '%')} | {_fmt(b['mean_batch_size'])} |")
    return "\n".join(lines)


def per_tenant_table(summaries: list[tuple[str, dict[str, Any]]]) -> str:
    """The P50/P99 latency of each tenant, one column per run (scenarios with tenants)."""
    tenants = sorted({t for _, x in summaries for t in x.get("per_tenant", {})})
    lines = ["| tenant | " + " | ".join(f"{n}: completed · P50 · P99 (s)" for n, _ in summaries) + " |",
             "|---|" + "---|" * len(summaries)]
    for t in tenants:
        cells = []
        for _, x in summaries:
            b = x.get("per_tenant", {}).get(t)
            cells.append("-" if not b or not b["completed"] else
                         f"{b['completed']:,} · {_fmt(b['latency_s']['p50'])} · {_fmt(b['latency_s']['p99'])}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, summaries: list[tuple[str, dict[str, Any]]]) -> None:
    path.write_text(json.dumps({name: s for name, s in summaries}, indent=2))


def plot(path: Path, results: list[tuple[str, SimResult]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for name, r in results:
        ts = [x[0] / 60 for x in r.samples]
        axes[0].plot(ts, [x[1] for x in r.samples], label=name)
        axes[1].plot(ts, [x[2] + x[3] + x[4] for x in r.samples], label=f"{name}: devices")
        axes[1].plot(ts, [x[4] for x in r.samples], linestyle=":", label=f"{name}: busy")
        done = sorted((j.finished, j.finished - j.arrival) for j in r.jobs if not j.failed and not math.isnan(j.finished))
        if done:
            window = max(1.0, r.end / 100)
            xs, p50, p99 = [], [], []
            i = 0
            t = done[0][0]
            while i < len(done):
                chunk = []
                while i < len(done) and done[i][0] < t + window:
                    chunk.append(done[i][1])
                    i += 1
                if chunk:
                    chunk.sort()
                    xs.append((t + window / 2) / 60)
                    p50.append(percentile(chunk, 50))
                    p99.append(percentile(chunk, 99))
                t += window
            axes[2].plot(xs, p50, label=f"{name}: P50")
            axes[2].plot(xs, p99, linestyle="--", label=f"{name}: P99")
    axes[0].set_ylabel("queued jobs")
    axes[1].set_ylabel("devices (up + provisioning)")
    axes[2].set_ylabel("latency (s)")
    axes[2].set_xlabel("time (min)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(results[0][1].scenario.name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
