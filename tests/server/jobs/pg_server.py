"""A throwaway PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` into a temporary directory,
listening on 127.0.0.1 at a free port (as the ``postgres`` user when the tests run as root, which
PostgreSQL refuses to run as). Where the binaries are missing the tests that need it skip, unless
``GENSERVE_REQUIRE_POSTGRES`` is set (CI: .ci/run), which makes that a failure.

``pg_dsn`` (session-scoped) is the server's maintenance DSN; ``fresh_database(dsn)`` creates an
empty database on it and returns its DSN, so every test starts from nothing.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

REQUIRE_ENV = "GENSERVE_REQUIRE_POSTGRES"


def find_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(d, "initdb").exists() and Path(d, "pg_ctl").exists():
            return Path(d)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="genserve-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        user = "postgres" if self.as_root else os.environ.get("USER", "postgres")
        r = self._run("initdb", "-D", str(self.data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync")
        if r.returncode:
            raise RuntimeError(f"initdb failed: {r.stderr[-2000:]}")
        # fsync off: a test server's data need not survive a power loss; keeps CREATE DATABASE fast.
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        r = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts, "-w", "-t", "60", "start")
        if r.returncode:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stderr[-1000:]} {log[-2000:]}")
        self.dsn = f"postgresql://{user}@127.0.0.1:{self.port}/postgres"
        return self.dsn

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def fresh_database(dsn: str) -> str:
    """An empty database on the server of ``dsn``; its DSN."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return dsn.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def pg_dsn():
    bindir = find_bin()
    if bindir is None:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"PostgreSQL binaries (initdb, pg_ctl) not found and {REQUIRE_ENV} is set")
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found")
    server = PgServer(bindir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def pg_database(pg_dsn):
    """A DSN of an empty database for one test."""
    return fresh_database(pg_dsn)
