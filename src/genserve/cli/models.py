"""``genserve models``: the model catalog of a config file, or of a running server with --url."""
from __future__ import annotations

import argparse
import json

from .common import CONFIG_HELP, FORMATTER, load_config


def add_parsers(sub) -> None:
    m = sub.add_parser("models", help="list the model catalog (of a config file, or of a running server with --url)",
                       formatter_class=FORMATTER, description="List the model catalog.",
                       epilog="examples:\n  genserve models\n  genserve models --config prod.toml --json\n"
                              "  genserve models --url http://127.0.0.1:8000   # with queue depths")
    m.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    m.add_argument("--url", help="ask this running server instead of reading a config")
    m.add_argument("--api-key", help="with --url: sent as a Bearer token (default: $GENSERVE_API_KEY)")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=cmd_models)


def cmd_models(a: argparse.Namespace) -> int:
    if a.url is None:
        config = load_config(a.config)
        rows = [{"id": n, **m.public()} for n, m in config.models.items()]
    else:
        import httpx

        from .jobs import auth_headers, expect

        rows = expect(httpx.get(f"{a.url}/v1/models", timeout=10, headers=auth_headers(a))).json()["data"]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'MODEL':<20} {'KIND':<6} {'BATCH':>5} {'WAIT ms':>7} {'STEPS':>9} {'SIZES / LIMIT':<30} SOURCE")
    for m in rows:
        sizes = ", ".join(m["sizes"]) if m.get("sizes") else f"≤ {m['max_pixels']} px"
        print(f"{m['id']:<20} {m['kind']:<6} {m['max_batch_size']:>5} {m['max_wait_ms']:>7} "
              f"{m['default_steps']:>4}/{m['max_steps']:<4} {sizes:<30} {m['source']}")
    return 0
