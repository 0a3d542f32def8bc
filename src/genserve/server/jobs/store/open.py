"""Open the configured job store: ``[store] backend`` (sqlite: ``<data_dir>/jobs.db``; postgres:
``[store] dsn``). Both apply their pending schema migrations on open."""
from __future__ import annotations

from ....config.load import Config
from .interface import Store


def open_job_store(config: Config) -> Store:
    s = config.store
    if s.backend == "postgres":
        from .postgres import PgJobStore  # psycopg only where PostgreSQL is used

        assert s.dsn is not None  # parse_store requires it
        return PgJobStore(s.dsn, s.pool_size)
    from ..jobstore import JobStore

    return JobStore(config.server.data_dir / "jobs.db")
