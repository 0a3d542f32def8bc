"""Failover time of the leading engine (docs/ha.md): two engines on one PostgreSQL, the leader
killed with SIGKILL (with its workers) N times; for each kill, the time until the standby's /readyz
says it leads, and until it is ready (its workers up). The killed engine is started again as the
next standby. Starts its own throwaway PostgreSQL (tests/server/jobs/pg_server.py).

    python benchmarks/failover.py --kills 10 --workers 1
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from genserve.bench.live import LiveServer  # noqa: E402
from tests.server.jobs.pg_server import PgServer, find_bin, fresh_database  # noqa: E402

CONFIG = """
[store]
backend = "postgres"
dsn = "{dsn}"
[models.demo-image]
kind = "image"
source = "demo:image"
sizes = ["64x64"]
default_steps = 2
"""


def state(srv: LiveServer) -> dict:
    try:
        return httpx.get(srv.url + "/readyz", timeout=1).json()
    except (httpx.HTTPError, ValueError):
        return {}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    pg = PgServer(find_bin())
    dsn = fresh_database(pg.start())
    data = Path(tempfile.mkdtemp(prefix="genserve-failover-"))
    config = CONFIG.format(dsn=dsn)
    engines = []
    lead, ready = [], []
    try:
        for _ in range(2):
            engines.append(LiveServer(data, config, workers=a.workers, extra_args=["--role", "engine"]).start())
        while not any(state(e).get("leader") and state(e).get("ready") for e in engines):
            time.sleep(0.05)
        for k in range(a.kills):
            leader = next(e for e in engines if state(e).get("leader"))
            standby = next(e for e in engines if e is not leader)
            t0 = time.monotonic()
            leader.stop(kill=True)
            t_lead = t_ready = None
            while t_ready is None:
                s = state(standby)
                now = time.monotonic()
                if t_lead is None and s.get("leader"):
                    t_lead = now - t0
                if s.get("leader") and s.get("ready"):
                    t_ready = now - t0
                time.sleep(0.01)
            lead.append(t_lead)
            ready.append(t_ready)
            print(f"kill {k + 1}: leading after {t_lead:.3f}s, ready (workers up) after {t_ready:.2f}s", flush=True)
            engines.remove(leader)
            engines.append(LiveServer(data, config, workers=a.workers, extra_args=["--role", "engine"]).start())
        print(f"leading: median {statistics.median(lead):.3f}s max {max(lead):.3f}s; "
              f"ready: median {statistics.median(ready):.2f}s max {max(ready):.2f}s over {a.kills} kills")
    finally:
        for e in engines:
            e.stop(kill=True)
        pg.stop()
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
