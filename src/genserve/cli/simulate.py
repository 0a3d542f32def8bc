"""``genserve simulate`` and ``genserve trace export``."""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path

from ..config.load import ConfigError


def cmd_simulate(a: argparse.Namespace) -> int:
    from ..sim import report
    from ..sim.driver import simulate
    from ..sim.scenario import deep_merge, load_scenario, parse_scenario, variant

    try:
        base = load_scenario(a.scenario)
        if a.requests is not None:
            base = parse_scenario(deep_merge(base.raw, {"workload": {"max_requests": a.requests}}), base.base)
        runs = [("base" if base.compare else base.name, base)]
        if a.compare:
            runs += [(name, variant(base, over)) for name, over in base.compare]
    except ConfigError as e:
        print(f"genserve: invalid scenario: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    summaries, results = [], []
    for name, sc in runs:
        t0 = time.perf_counter()
        # Simulated seconds as the bar's unit: the run ends at the scenario's duration, or earlier
        # when a request cap is reached (the bar then closes short of full).
        bar = tqdm(total=round(sc.duration_s), unit="sim s", desc=name, file=sys.stderr, disable=a.quiet,
                   mininterval=0.5, leave=False)

        def progress(now: float, requests: int) -> None:
            bar.n = min(round(now), bar.total)
            bar.set_postfix(requests=requests, refresh=False)
            bar.refresh()

        r = simulate(sc, progress)
        bar.close()
        wall = time.perf_counter() - t0
        x = report.summarize(r)
        x["wall_s"] = wall
        summaries.append((name, x))
        results.append((name, r))
        print(f"# {name}: {x['requests']:,} requests, {r.events:,} events in {wall:.2f} s "
              f"({r.events / wall:,.0f} events/s)", file=sys.stderr)
    print(f"## {base.name}\n")
    print(report.table(summaries))
    if not a.compare:
        print()
        print(report.per_model_table(summaries[0][1]))
    if any("per_tenant" in x for _, x in summaries):
        print()
        print(report.per_tenant_table(summaries))
    if a.json:
        report.write_json(Path(a.json), summaries)
    if a.plot:
        report.plot(Path(a.plot), results)
    return 0


def cmd_trace_export(a: argparse.Namespace) -> int:
    """Job records -> JSON lines a scenario can replay (``workload.kind = "trace"``). The job store is
    the one the server's config names (``--config``, else ./genserve.toml, else $GENSERVE_CONFIG),
    unless ``--data-dir`` says where it is."""
    if a.data_dir is not None:
        data_dir = Path(a.data_dir)
    else:
        from ..config.load import load_config
        from ..config.env import find_config

        data_dir = load_config(find_config(a.config)).server.data_dir
    db = Path(data_dir) / "jobs.db"
    if not db.exists():
        print(f"genserve: no job store at {db}", file=sys.stderr)
        return 2
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute("SELECT t_received, params FROM jobs ORDER BY t_received").fetchall()
    out = open(a.output, "w") if a.output != "-" else sys.stdout
    try:
        for t, params in rows:
            p = json.loads(params)
            out.write(json.dumps({"t": t, "model": p["model"], "width": p["width"], "height": p["height"],
                                  "num_frames": p.get("num_frames", 0), "steps": p["steps"],
                                  "priority": p.get("priority", "standard")}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {len(rows)} jobs", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("simulate", help="run a scenario through the real engine on simulated devices",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a scenario (TOML) through the production engine on simulated devices.",
                       epilog="examples:\n  genserve simulate benchmarks/sim_1m.toml --requests 100000\n"
                              "  genserve simulate scenario.toml --compare --json out.json --plot out.png")
    s.add_argument("scenario", help="scenario file (see docs/simulator.md)")
    s.add_argument("--compare", action="store_true", help="also run the scenario's [[compare]] variants")
    s.add_argument("--json", help="write the summaries here")
    s.add_argument("--plot", help="write a PNG: queue depth, devices, latency over time")
    s.add_argument("--requests", type=int, help="cap the number of requests")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_simulate)
    examples = ("examples:\n  genserve trace export -o trace.jsonl          # the job store of ./genserve.toml's server\n"
                "  genserve trace export --data-dir /var/lib/genserve -o trace.jsonl")
    t = sub.add_parser("trace", help="traces of the job store", description="Traces of the job store.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples)
    tsub = t.add_subparsers(dest="trace_cmd", required=True)
    what = "export the job store's requests as a replayable trace (JSON lines)"
    e = tsub.add_parser("export", help=what, description=what + "; replay it with a scenario's "
                        'workload.kind = "trace" (docs/simulator.md).',
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples)
    e.add_argument("--config", metavar="FILE", help="the server's config, for its data directory (default: "
                   "./genserve.toml, else $GENSERVE_CONFIG, else the demo catalog's genserve-data)")
    e.add_argument("--data-dir", metavar="DIR", help="the server's data directory (overrides the config)")
    e.add_argument("-o", "--output", default="-", help="JSON-lines file (default: stdout)")
    e.set_defaults(func=cmd_trace_export)
