"""Simulator speed: 1 million requests through the real engine (benchmarks/sim_1m.toml).

    .venv/bin/python benchmarks/sim_perf.py [--requests 1000000]

Reports the simulation's wall time and events/s (the report's percentiles are timed separately).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from genserve.sim import Simulator, load_scenario
from genserve.sim.report import summarize
from genserve.sim.scenario import deep_merge, parse_scenario


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1_000_000)
    a = ap.parse_args()
    s = load_scenario(Path(__file__).with_name("sim_1m.toml"))
    s = parse_scenario(deep_merge(s.raw, {"workload": {"max_requests": a.requests}}), s.base)
    t0 = time.perf_counter()
    r = Simulator(s).run()
    sim_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    x = summarize(r)
    report_s = time.perf_counter() - t1
    print(f"{platform.machine()}, Python {platform.python_version()}")
    print(f"| requests | events | simulated time | sim wall (s) | events/s | requests/s | report (s) | P50 / P99 latency (s) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {len(r.jobs):,} | {r.events:,} | {r.end / 3600:.1f} h | {sim_s:.1f} | {r.events / sim_s:,.0f} | "
          f"{len(r.jobs) / sim_s:,.0f} | {report_s:.1f} | {x['overall']['latency_s']['p50']:.2f} / "
          f"{x['overall']['latency_s']['p99']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
