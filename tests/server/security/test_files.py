"""Secrets at rest (issue 22, item 5): the data directory genserve creates is 0700, the key and job
stores (with their -wal / -shm files) are 0600 whatever the umask, files an older version left
readable are narrowed, and an operator's existing directory is left alone with a warning."""
from __future__ import annotations

import asyncio
import logging
import os
import stat
import tomllib

import httpx
import pytest

from genserve.config.load import parse_config
from genserve.server.http.app import create_app
from genserve.server.runtime.runtime import Runtime
from genserve.server.security.keys import KeyStore
from genserve.workers.fake import FakePool


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # the usual umask: files 0644, directories 0755 unless made private
    yield
    os.umask(old)


def run_app(data, test):
    cfg = parse_config(tomllib.loads(f"""
[server]
data_dir = "{data}"
[models.img]
kind = "image"
source = "{data.parent}/no-weights"
default_size = "64x64"
"""))

    async def go():
        rt = Runtime(cfg, devices=["cpu"], pool=FakePool)
        app = create_app(cfg, rt)
        await rt.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await test(c, rt)
        finally:
            await rt.close()

    return asyncio.run(go())


def test_a_new_data_dir_is_private_and_so_are_the_stores_and_their_wal_files(tmp_path, umask_022):
    data = tmp_path / "new" / "data"

    async def test(c, rt):
        r = await c.post("/v1/jobs", json={"model": "img", "prompt": "x"})
        assert r.status_code == 202, r.text
        files = {p.name: mode(p) for p in data.iterdir() if p.name.startswith(("jobs.db", "keys.db"))}
        assert {"jobs.db", "jobs.db-wal", "jobs.db-shm", "keys.db"} <= set(files), files
        assert set(files.values()) == {0o600}, {k: oct(v) for k, v in files.items()}

    run_app(data, test)
    assert mode(data) == 0o700
    keys = KeyStore(data)
    keys.create("acme")
    keys.close()
    assert mode(data / "keys.db") == 0o600


def test_the_cli_creates_a_private_key_store(tmp_path, umask_022):
    keys = KeyStore(tmp_path / "d")  # what `genserve keys create --data-dir d` opens
    keys.create("acme")
    keys.close()
    assert (mode(tmp_path / "d"), mode(tmp_path / "d" / "keys.db")) == (0o700, 0o600)


def test_stores_an_older_version_left_readable_are_narrowed(tmp_path, umask_022, caplog):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    for name in ("keys.db", "jobs.db", "jobs.db-wal", "jobs.db-shm"):
        (data / name).touch(mode=0o644)
        assert mode(data / name) == 0o644
    with caplog.at_level(logging.WARNING, logger="genserve.security"):
        KeyStore(data).close()
        KeyStore(data).close()
    assert mode(data / "keys.db") == 0o600
    # the operator's directory keeps its mode, with one warning saying so
    assert mode(data) == 0o755
    assert [r.getMessage() for r in caplog.records].count(
        f"data directory {data} is mode 755: other users may read its files (chmod 700 to prevent it)") == 1

    async def test(c, rt):
        return {n: mode(data / n) for n in ("jobs.db", "jobs.db-wal", "jobs.db-shm")}

    assert set(run_app(data, test).values()) == {0o600}
