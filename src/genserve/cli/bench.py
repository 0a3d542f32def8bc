"""``genserve bench``: load-test a genserve or OpenAI-images endpoint, or compare two result files."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import DEFAULT_URL, FORMATTER, URL_HELP


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="load-test a genserve or OpenAI-images endpoint; compare result files",
                       formatter_class=FORMATTER, description="Load-test an endpoint, or compare two result files.",
                       epilog="examples:\n  genserve bench -n 200 -c 8 --out a.json\n"
                              "  genserve bench --pattern poisson --rate 4 -n 500 --plot run.png\n"
                              "  genserve bench --api openai --url http://host:8000 --api-key KEY\n"
                              "  genserve bench --compare a.json b.json")
    b.add_argument("--url", default=DEFAULT_URL, help=URL_HELP)
    b.add_argument("--api", choices=["genserve", "openai"], default="genserve",
                   help="genserve: /v1/jobs + SSE, with per-stage breakdown and cost; openai: /v1/images/generations")
    b.add_argument("-n", "--requests", type=int, default=100, help="requests to send (default 100)")
    b.add_argument("--workload", help="TOML/JSON request mix and arrival pattern (default: demo-image 64x64, 8 steps)")
    b.add_argument("--pattern", choices=["closed", "rate", "poisson", "bursts"], help="arrival pattern (overrides the file)")
    b.add_argument("-c", "--concurrency", type=int, help="closed loop: requests in flight")
    b.add_argument("--rate", type=float, help="rate / poisson: requests per second")
    b.add_argument("--burst-size", type=int, help="bursts: requests per burst")
    b.add_argument("--burst-interval", type=float, help="seconds between bursts")
    b.add_argument("--seed", type=int, default=0, help="draws the request mix and Poisson arrivals")
    b.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    b.add_argument("--api-key", help="sent as a Bearer token (OpenAI-compatible endpoints)")
    b.add_argument("--label", help="a name for this run in tables and comparisons")
    b.add_argument("--out", "-o", default="bench-result.json", help="result file (default bench-result.json)")
    b.add_argument("--plot", help="write a PNG: latency distribution and throughput over time")
    b.add_argument("--allow-errors", action="store_true", help="exit 0 even if some requests failed")
    b.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print two result files side by side")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)


def _read_json(path: str) -> dict:
    from .jobs import CLIError

    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CLIError(f"{path}: not a JSON result file ({e})", 2) from None


def cmd_bench(a: argparse.Namespace) -> int:
    from ..bench.report import compare, table

    if a.compare:
        x, y = (_read_json(p) for p in a.compare)
        print(compare(x, y))
        return 0
    import asyncio

    from tqdm import tqdm

    from ..bench.runner import run
    from ..bench.workload import WorkloadError, load_workload

    try:
        workload = load_workload(a.workload).with_arrival(
            pattern=a.pattern, concurrency=a.concurrency, rate=a.rate, burst_size=a.burst_size,
            burst_interval_s=a.burst_interval)
    except (WorkloadError, OSError, TypeError) as e:
        print(f"genserve: invalid workload: {e}", file=sys.stderr)
        return 2
    bar = tqdm(total=a.requests, unit="req", file=sys.stderr, disable=a.quiet)
    errors = 0

    def done(r: dict) -> None:
        nonlocal errors
        errors += not r["ok"]
        bar.set_postfix(errors=errors, refresh=False)
        bar.update(1)

    print(f"genserve bench: {a.requests} requests to {a.url} ({a.api}), {workload.arrival.describe()}", file=sys.stderr)
    result = asyncio.run(run(a.url, workload, a.requests, api=a.api, seed=a.seed, timeout=a.timeout,
                             api_key=a.api_key, on_done=done, label=a.label))
    bar.close()
    print(table(result))
    out = Path(a.out)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}", file=sys.stderr)
    if a.plot:
        from ..bench.plot import plot

        print(f"wrote {plot(result, a.plot)}", file=sys.stderr)
    return 0 if result["summary"]["errors"] == 0 or a.allow_errors else 1
