"""Accept rate of POST /v1/jobs (docs/ha.md): one SQLite server, one gateway on PostgreSQL, two
gateways on PostgreSQL. No engine runs (``--workers 0`` for the SQLite server): this measures
taking jobs — validate, persist, acknowledge — not running them. The load generator (asyncio,
httpx, ``--concurrency`` clients spread over the gateways) runs on the same machine as the servers
and the database. Starts its own throwaway PostgreSQL (tests/server/jobs/pg_server.py).

    python benchmarks/gateway_accept.py --seconds 15 --concurrency 16
"""
from __future__ import annotations

import argparse
import shutil
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from genserve.bench.live import LiveServer  # noqa: E402
from tests.server.jobs.pg_server import PgServer, find_bin, fresh_database  # noqa: E402

MODEL = """
[models.demo-image]
kind = "image"
source = "demo:image"
sizes = ["64x64"]
default_steps = 2
max_queue = 10000000
"""


async def load(urls: list[str], seconds: float, concurrency: int) -> tuple[float, int, list[float], int]:
    lat: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=urls[i % len(urls)], timeout=30) as c:
            n = 0
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = await c.post("/v1/jobs", json={"model": "demo-image", "prompt": f"c{i} job {n}"})
                lat.append(time.perf_counter() - t)
                errors += r.status_code != 202
                n += 1

    t0 = time.monotonic()
    await asyncio.gather(*[client(i) for i in range(concurrency)])
    return time.monotonic() - t0, len(lat), lat, errors


def report(name: str, seconds: float, n: int, lat: list[float], errors: int) -> str:
    """``seconds``: the measured span, first request to last answer."""
    lat = sorted(lat)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
    return (f"| {name} | {n / seconds:.0f} | {p(0.5):.1f} | {p(0.99):.1f} | {n} | {errors} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args()
    rows = ["| setup | submits/s | P50 ms | P99 ms | submits | non-202 |", "|---|---|---|---|---|---|"]
    data = Path(tempfile.mkdtemp(prefix="genserve-accept-"))
    srv = LiveServer(data / "sqlite", MODEL, workers=0).start()
    try:
        rows.append(report("1 server, SQLite (--role all)", *asyncio.run(load([srv.url], a.seconds, a.concurrency))))
    finally:
        srv.stop()
    sizes: list[str] = []
    pg = PgServer(find_bin())
    base = pg.start()
    try:
        for n_gw in (1, 2):
            dsn = fresh_database(base)
            config = f'[store]\nbackend = "postgres"\ndsn = "{dsn}"\n' + MODEL
            gws = [LiveServer(data / f"pg{n_gw}", config, extra_args=["--role", "gateway"]).start() for _ in range(n_gw)]
            try:
                res = asyncio.run(load([g.url for g in gws], a.seconds, a.concurrency))
                rows.append(report(f"{n_gw} gateway{'s' if n_gw > 1 else ''}, PostgreSQL", *res))
                with psycopg.connect(dsn) as db:
                    size, n = db.execute("SELECT pg_total_relation_size('jobs'), COUNT(*) FROM jobs").fetchone()
                sizes.append(f"{n} queued jobs: {size / n:.0f} bytes per job in PostgreSQL (table and indexes)")
            finally:
                for g in gws:
                    g.stop()
    finally:
        pg.stop()
        shutil.rmtree(data, ignore_errors=True)
    print(f"{a.concurrency} concurrent clients, {a.seconds:g} s per setup")
    print("\n".join(rows))
    print("\n".join(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
