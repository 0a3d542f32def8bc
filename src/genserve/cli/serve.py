"""``genserve serve``: start the server (uvicorn, graceful drain on SIGTERM / SIGINT)."""
from __future__ import annotations

import argparse
import sys

from .common import CONFIG_HELP, FORMATTER, LOG_LEVELS, load_config


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="start the server", formatter_class=FORMATTER, description="Start the server.",
                       epilog="examples:\n  genserve serve\n  genserve serve --config prod.toml --host 0.0.0.0 --port 8000\n"
                              "  genserve serve --log-format json --log-level info --access-log\n"
                              "  GENSERVE_SERVER__WEBHOOK_SECRET=whsec_… genserve serve\n"
                              "  genserve serve --role gateway --port 8000   # [store] backend = \"postgres\"\n"
                              "  genserve serve --role engine --port 9000    # /readyz, /metrics only")
    s.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    s.add_argument("--role", choices=["all", "gateway", "engine"], default="all",
                   help="all: one process (default); with [store] backend = postgres, gateway: HTTP only (no engine, "
                        "no workers) or engine: the engine and workers, one leading (docs/ha.md)")
    s.add_argument("--host", help="bind address (overrides server.host; default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (overrides server.port; default 8000)")
    s.add_argument("--data-dir", metavar="DIR", help="job store, results and built demo models (overrides server.data_dir)")
    s.add_argument("--workers", type=int, help="CPU workers when there is no GPU (overrides server.workers; default 1)")
    s.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one object per line with job_id, batch_id, worker, stage and timings (default text)")
    s.add_argument("--insecure", action="store_true",
                   help="serve on a non-loopback address without any API key (anyone reaching the port is admin)")
    s.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="least severe level logged (default info)")
    s.add_argument("--access-log", action="store_true", help="log one line per HTTP request (off by default)")
    s.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    from ..server.http.app import create_app
    from ..server.http.serve import serve

    config = load_config(a.config).with_overrides(host=a.host, port=a.port, data_dir=a.data_dir, workers=a.workers)
    from ..server.observe.logs import configure

    configure(a.log_format, a.log_level.upper())
    s = config.server
    if a.role != "all" and config.store.backend != "postgres":
        print(f"genserve: --role {a.role} needs [store] backend = \"postgres\" (several processes share one "
              "database; see docs/ha.md)", file=sys.stderr)
        return 2
    from ..server.security.auth import bind_refusal, open_key_store

    if config.store.backend == "postgres":
        from .db import upgrade

        upgrade(config)  # before anything reads the tables (the runtime would migrate too, later)
    if a.role == "engine":
        from ..server.http.engine_app import create_engine_app
        from ..server.runtime.leader import EngineRole

        print(f"genserve: engine on http://{s.host}:{s.port} (/readyz, /metrics); leading when it holds the lock",
              flush=True)
        serve(create_engine_app(config, EngineRole(config)), host=s.host, port=s.port, drain_s=s.drain_s,
              log_level=a.log_level, access_log=a.access_log, log_config=None)
        return 0
    keys = open_key_store(config)
    refusal = bind_refusal(s.host, keys, config.access, a.insecure)
    keys.close()
    if refusal:
        print(f"genserve: {refusal}", file=sys.stderr)
        return 2
    where = "store: PostgreSQL" if config.store.backend == "postgres" else f"data in {s.data_dir}"
    print(f"genserve: {'gateway ' if a.role == 'gateway' else ''}serving {', '.join(config.models)} on "
          f"http://{s.host}:{s.port} ({where})", flush=True)
    # log_config=None: uvicorn's loggers go through the root handler, so --log-format applies to them too.
    # SIGTERM / SIGINT drain first (server.drain_s), then exit 0: docs/operations.md.
    runtime = None
    if a.role == "gateway":
        from ..server.runtime.gateway import Gateway

        runtime = Gateway(config)
    serve(create_app(config, runtime), host=s.host, port=s.port, drain_s=s.drain_s,
          header_timeout_s=s.header_timeout_s, max_connections=s.max_connections, log_level=a.log_level,
          access_log=a.access_log, log_config=None)
    return 0
