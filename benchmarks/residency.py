"""Residency benchmark: cold-start hits and P99 on a 3-model trace with skewed popularity and a
transition pattern, for (a) load-on-demand + LRU, (b) + a warm pool, (c) + predictive preloading.
Also reports load time per tier. Two CPU workers whose budgets hold one demo model each.

    .venv/bin/python benchmarks/residency.py [--requests 45] [--gap 1.0]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from genserve.bench.live import LiveServer

# A follows B 80 % of the time, and so on: a Markov chain whose stationary mix is skewed to A.
CHAIN = {"m-a": {"m-b": 0.8, "m-a": 0.2}, "m-b": {"m-c": 0.6, "m-a": 0.4}, "m-c": {"m-a": 0.9, "m-b": 0.1}}
BUDGET_GB = 12 / 1024  # one demo image model (~4.8 MB) + one job's working memory (~5.8 MB)


def trace(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out, cur = [], "m-a"
    for _ in range(n):
        out.append(cur)
        nxt = CHAIN[cur]
        cur = rng.choices(list(nxt), weights=list(nxt.values()))[0]
    return out


def config(models: Path, variant: str) -> str:
    head = f'[server]\nworker_memory_gb = {BUDGET_GB}\nidle_unload_s = "never"\npreload = {str(variant == "preload").lower()}\n'
    body = ""
    for m in CHAIN:
        body += (f'\n[models.{m}]\nkind = "image"\nsource = "{models / "demo-image"}"\nmax_batch_size = 1\n'
                 f'sizes = ["64x64"]\ndefault_steps = 4\ndefault_guidance = 1.0\n')
        if m == "m-a" and variant in ("warm", "preload"):
            body += "min_warm = 1\n"
    return head + body


def run(url: str, seq: list[str], gap: float) -> dict:
    lat, cold, tiers = [], 0, []
    with httpx.Client(base_url=url, timeout=120) as c:
        time.sleep(3)  # let warm pools load
        for i, m in enumerate(seq):
            t0 = time.perf_counter()
            jid = c.post("/v1/jobs", json={"model": m, "prompt": f"r{i}", "seed": i}).json()["id"]
            while (job := c.get(f"/v1/jobs/{jid}").json())["status"] not in ("succeeded", "failed"):
                time.sleep(0.01)
            assert job["status"] == "succeeded", job
            lat.append(time.perf_counter() - t0)
            cold += job["cold_start"]["waited"]
            time.sleep(max(0.0, gap - (time.perf_counter() - t0)))
        changes = c.get("/v1/workers").json()["recent_residency_changes"]
    for e in changes:
        if e["action"] == "load":
            tiers.append((e["tier"], e["seconds"]))
    lat.sort()
    return {"cold_fraction": cold / len(seq), "cold": cold, "p50": statistics.median(lat),
            "p99": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))], "loads": tiers}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=45)
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between request starts")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    seq = trace(a.requests, a.seed)
    mix = {m: seq.count(m) for m in CHAIN}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        subprocess.run([sys.executable, "-m", "genserve.backends.demo", "image", str(models / "demo-image")],
                       check=True, capture_output=True)
        for variant in ("lru", "warm", "preload"):
            with LiveServer(Path(tmp) / variant, config(models, variant), workers=2) as srv:
                rows[variant] = run(srv.url, seq, a.gap)
            print(f"# {variant}: {json.dumps({k: v for k, v in rows[variant].items() if k != 'loads'})}",
                  file=sys.stderr, flush=True)
    names = {"lru": "(a) load on demand + LRU", "warm": "(b) + warm pool (m-a, min_warm = 1)",
             "preload": "(c) + predictive preloading"}
    print(f"{a.requests} sequential requests, one every {a.gap} s, mix {mix}; 2 CPU workers × 12 MiB\n")
    print("| policy | cold-start hits | fraction | P50 (s) | P99 (s) |")
    print("|---|---|---|---|---|")
    for v, r in rows.items():
        print(f"| {names[v]} | {r['cold']} / {a.requests} | {r['cold_fraction']:.0%} | {r['p50']:.3f} | {r['p99']:.3f} |")
    by_tier: dict[str, list[float]] = {}
    for r in rows.values():
        for tier, s in r["loads"]:
            by_tier.setdefault(tier, []).append(s)
    print("\n| load tier | loads | mean (s) | P50 (s) | max (s) |")
    print("|---|---|---|---|---|")
    for tier, xs in sorted(by_tier.items()):
        print(f"| {tier} | {len(xs)} | {statistics.mean(xs):.3f} | {statistics.median(xs):.3f} | {max(xs):.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
