"""``genserve db upgrade|version``: the job store's schema (server/jobs/store/migrations.py).

``serve`` applies pending migrations at start too; running ``db upgrade`` first, once, is the way
before a rolling deploy of several gateways and engines (docs/ha.md)."""
from __future__ import annotations

import argparse

from .common import CONFIG_HELP, FORMATTER, load_config


def upgrade(config) -> tuple[str, list[int], list[int]]:
    """Apply the configured store's pending migrations: (backend, versions applied now, all applied)."""
    from ..server.jobs.store import migrations

    if config.store.backend == "postgres":
        import psycopg

        with psycopg.connect(config.store.dsn, autocommit=True) as c:
            done = migrations.upgrade_postgres(c)
            return "postgres", done, migrations.applied_postgres(c)
    from ..server.jobs.jobstore import JobStore

    store = JobStore(config.server.data_dir / "jobs.db")  # opening migrates
    try:
        have = migrations.applied_sqlite(store.db)
        return "sqlite", [], have
    finally:
        store.close()


def cmd_db(a: argparse.Namespace) -> int:
    from ..server.jobs.store import migrations

    config = load_config(a.config).with_overrides(data_dir=a.data_dir)
    where = config.store.dsn.split("@")[-1] if config.store.backend == "postgres" else config.server.data_dir / "jobs.db"
    if a.db_cmd == "version":
        if config.store.backend == "postgres":
            import psycopg

            with psycopg.connect(config.store.dsn, autocommit=True) as c:
                have = migrations.applied_postgres(c)
        else:
            import sqlite3

            path = config.server.data_dir / "jobs.db"
            have = migrations.applied_sqlite(sqlite3.connect(path)) if path.exists() else []
        latest = migrations.LATEST[config.store.backend]
        print(f"{config.store.backend} {where}: schema version {max(have, default=0)} (latest {latest})")
        return 0 if max(have, default=0) == latest else 1
    backend, done, have = upgrade(config)
    print(f"{backend} {where}: " + (f"applied {', '.join(map(str, done))}; " if done else "up to date; ")
          + f"schema version {max(have, default=0)}")
    return 0


def add_parsers(sub) -> None:
    d = sub.add_parser("db", help="the job store's schema: upgrade it, show its version", formatter_class=FORMATTER,
                       description="The job store's schema ([store] backend: SQLite in the data directory, or "
                                   "PostgreSQL at [store] dsn).",
                       epilog="examples:\n  genserve db upgrade\n  GENSERVE_STORE__BACKEND=postgres "
                              "GENSERVE_STORE__DSN=postgresql://genserve@db/genserve genserve db upgrade\n"
                              "  genserve db version   # exit 1 when migrations are pending")
    ds = d.add_subparsers(dest="db_cmd", required=True)
    for name, text in (("upgrade", "apply the pending schema migrations (serve does so at start too)"),
                       ("version", "print the schema version; exit 1 when migrations are pending")):
        p = ds.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
        p.add_argument("--data-dir", metavar="DIR", help="the SQLite store's directory (overrides server.data_dir)")
        p.set_defaults(func=cmd_db)
