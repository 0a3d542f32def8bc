"""Bench results, pure: summary of one run, its table, and a side-by-side comparison of two."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..server.observe.stats import PERCENTILES, STAGE_SPANS, summarize

STAGES = tuple(s for s in STAGE_SPANS if s != "total")


def summarize_run(requests: Sequence[dict[str, Any]], duration_s: float) -> dict[str, Any]:
    """Client-side latency and throughput over all requests; per-stage breakdown, batch size and
    cost from the server's job records where the target reported them (genserve)."""
    ok = [r for r in requests if r["ok"]]
    errors: dict[str, int] = {}
    for r in requests:
        if not r["ok"]:
            errors[r.get("error") or "error"] = errors.get(r.get("error") or "error", 0) + 1
    out: dict[str, Any] = {
        "count": len(requests), "ok": len(ok), "errors": len(requests) - len(ok),
        "error_rate": (len(requests) - len(ok)) / len(requests) if requests else None,
        "errors_by_kind": dict(sorted(errors.items())),
        "duration_s": duration_s, "throughput_per_s": len(ok) / duration_s if duration_s > 0 else None,
        "latency_s": summarize([r["latency_s"] for r in ok]),
        "per_model": {},
    }
    for model in sorted({r["model"] for r in requests}):
        mine = [r for r in ok if r["model"] == model]
        out["per_model"][model] = {"count": sum(1 for r in requests if r["model"] == model), "ok": len(mine),
                                   "latency_s": summarize([r["latency_s"] for r in mine]),
                                   **_server_side(mine)}
    out.update(_server_side(ok))
    return out


def _server_side(ok: Sequence[dict[str, Any]]) -> dict[str, Any]:
    recs = [r for r in ok if r.get("breakdown")]
    if not recs:
        return {}
    costs = [r["cost_usd"] for r in recs if r.get("cost_usd") is not None]
    return {
        "stages_s": {s: summarize([r["breakdown"][f"{s}_s"] for r in recs if r["breakdown"].get(f"{s}_s") is not None])
                     for s in STAGES},
        "server_latency_s": summarize([r["breakdown"]["total_s"] for r in recs if r["breakdown"].get("total_s") is not None]),
        # per batch, like /v1/stats (a job-weighted mean would favour the big batches)
        "mean_batch_size": _mean_batch(recs),
        "device_seconds": sum(r.get("device_seconds") or 0.0 for r in recs),
        "cost_usd": sum(costs),
        "cost_per_inference_usd": sum(costs) / len(costs) if costs else None,
    }


def _mean_batch(recs: Sequence[dict[str, Any]]) -> float | None:
    sizes = {r.get("batch_id") or f"job-{r['i']}": r.get("batch_size") or 0 for r in recs}
    return sum(sizes.values()) / len(sizes) if sizes else None


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and v != 0 and abs(v) < 0.001:
        return f"{v:.2e}"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per model and one for all, then the stage breakdown when known."""
    s = result["summary"]
    head = "| model | requests | ok | errors | throughput (req/s) | " + " | ".join(
        f"{n.upper()} (s)" for n, _ in PERCENTILES) + " | mean batch | $/inference |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = [(m, v) for m, v in s["per_model"].items()] + [("**all**", s)]
    for name, v in rows:
        tp = v.get("throughput_per_s") if name == "**all**" else v["ok"] / s["duration_s"] if s["duration_s"] else None
        errors = v.get("errors", v["count"] - v["ok"])
        lines.append(f"| {name} | {v['count']} | {v['ok']} | {errors} | {_f(tp, 2)} | " + " | ".join(
            _f(v["latency_s"][n]) for n, _ in PERCENTILES) + f" | {_f(v.get('mean_batch_size'), 1)} | "
            f"{_f(v.get('cost_per_inference_usd'), 6)} |")
    if s.get("stages_s"):
        lines += ["", "| stage (server) | " + " | ".join(f"{n.upper()} (s)" for n, _ in PERCENTILES) + " | mean (s) |",
                  "|---|" + "---|" * (len(PERCENTILES) + 1)]
        for stage, st in [*s["stages_s"].items(), ("end-to-end", s["server_latency_s"])]:
            lines.append(f"| {stage} | " + " | ".join(_f(st[n]) for n, _ in PERCENTILES) + f" | {_f(st['mean'])} |")
    if s["errors_by_kind"]:
        lines += ["", "errors: " + ", ".join(f"{k} × {n}" for k, n in s["errors_by_kind"].items())]
    return "\n".join(lines)


COMPARE_ROWS = (
    ("requests", ("count",)), ("errors", ("errors",)), ("throughput (req/s)", ("throughput_per_s",)),
    *((f"{n.upper()} (s)", ("latency_s", n)) for n, _ in PERCENTILES),
    ("mean latency (s)", ("latency_s", "mean")), ("mean batch", ("mean_batch_size",)),
    ("cost / inference ($)", ("cost_per_inference_usd",)),
)


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Side by side: A, B and B/A for the headline figures of two result files."""
    la, lb = a.get("label") or a["target"]["url"], b.get("label") or b["target"]["url"]
    lines = [f"| metric | A: {la} | B: {lb} | B/A |", "|---|---|---|---|"]
    for name, path in COMPARE_ROWS:
        va, vb = _get(a["summary"], path), _get(b["summary"], path)
        ratio = f"{vb / va:.2f}×" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va else "–"
        lines.append(f"| {name} | {_f(va)} | {_f(vb)} | {ratio} |")
    return "\n".join(lines)
