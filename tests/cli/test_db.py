"""``genserve db upgrade|version`` on both backends, and ``genserve keys`` writing to PostgreSQL."""
import psycopg

from genserve.cli.main import main
from genserve.server.jobs.store import migrations


def test_db_upgrade_and_version_on_sqlite(tmp_path, capsys):
    assert main(["db", "version", "--data-dir", str(tmp_path)]) == 1  # no database yet: behind
    assert main(["db", "upgrade", "--data-dir", str(tmp_path)]) == 0
    assert (tmp_path / "jobs.db").exists()
    assert main(["db", "version", "--data-dir", str(tmp_path)]) == 0
    assert f"schema version {migrations.LATEST['sqlite']}" in capsys.readouterr().out


def test_db_upgrade_on_postgres_then_keys(pg_database, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("GENSERVE_STORE__BACKEND", "postgres")
    monkeypatch.setenv("GENSERVE_STORE__DSN", pg_database)
    assert main(["db", "version"]) == 1
    assert main(["db", "upgrade"]) == 0
    out = capsys.readouterr().out
    every = ", ".join(str(m.version) for m in migrations.POSTGRES)
    assert f"applied {every};" in out and "postgres" in out and f"schema version {migrations.LATEST['postgres']}" in out
    assert main(["db", "upgrade"]) == 0 and "up to date" in capsys.readouterr().out
    assert main(["db", "version"]) == 0
    assert main(["keys", "create", "--tenant", "acme", "--data-dir", str(tmp_path)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("gsk_") and not (tmp_path / "keys.db").exists()
    with psycopg.connect(pg_database) as db:
        assert db.execute("SELECT tenant, scope FROM api_keys").fetchall() == [("acme", "jobs")]


def test_split_roles_need_postgres(tmp_path, capsys):
    for role in ("gateway", "engine"):
        assert main(["serve", "--role", role, "--data-dir", str(tmp_path)]) == 2
        assert 'needs [store] backend = "postgres"' in capsys.readouterr().err
