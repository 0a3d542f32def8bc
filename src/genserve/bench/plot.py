"""A PNG of one bench run: the latency distribution and throughput over time."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..server.observe.stats import PERCENTILES


def plot(result: dict[str, Any], out: str | Path, bucket_s: float = 1.0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result["requests"] if r["ok"]]
    lat = [r["latency_s"] for r in ok]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.hist(lat, bins=min(40, max(5, len(lat) // 3)), color="#3e7bfa", alpha=0.8)
    for (name, _), color in zip(PERCENTILES, ("#2bb673", "#f0b429", "#d64545", "#7b2cbf")):
        v = result["summary"]["latency_s"][name]
        if v is not None:
            a.axvline(v, color=color, linestyle="--", label=f"{name.upper()} {v:.2f}s")
    a.set(title="Latency distribution (client-side)", xlabel="seconds", ylabel="requests")
    a.legend()
    end = max((r["t_done"] for r in ok), default=0.0)
    n = int(end // bucket_s) + 1
    counts = [0] * n
    for r in ok:
        counts[int(r["t_done"] // bucket_s)] += 1
    b.bar([i * bucket_s for i in range(n)], [c / bucket_s for c in counts], width=bucket_s * 0.9, align="edge",
          color="#2bb673")
    b.set(title="Throughput over time", xlabel="seconds since start", ylabel="completed / s")
    label = result.get("label") or result["target"]["url"]
    fig.suptitle(f"genserve bench: {label} — {result['config']['n']} requests, {result['config']['arrival_text']}")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
