"""The single-process server (``--role all``) over PostgreSQL: the same runtime and routes as over
SQLite, with jobs, attempts and API keys in the database (AutoPool workers: no pipelines run)."""
import asyncio
import tomllib

import httpx
import psycopg

from genserve.config.load import parse_config
from genserve.server.http.app import create_app
from genserve.server.runtime.runtime import Runtime
from genserve.server.security.auth import open_key_store

from ..auto_pool import auto_pool


def make_config(tmp_path, dsn, auth=False):
    return parse_config(tomllib.loads(f"""
[server]
data_dir = "{tmp_path}"
[store]
backend = "postgres"
dsn = "{dsn}"
[auth]
required = {'true' if auth else 'false'}
[models.img]
kind = "image"
source = "{tmp_path}/no-weights-needed"
sizes = ["64x64"]
default_steps = 2
"""))


async def wait_for(c, job_id, headers=None):
    async def poll():
        while (job := (await c.get(f"/v1/jobs/{job_id}", headers=headers)).json())["status"] not in (
                "succeeded", "failed", "canceled"):
            await asyncio.sleep(0.02)
        return job
    return await asyncio.wait_for(poll(), 20)


def test_jobs_and_keys_live_in_postgres(tmp_path, pg_database):
    cfg = make_config(tmp_path, pg_database, auth=True)

    async def go():
        rt = Runtime(cfg, devices=["cpu"], pool=auto_pool(str(tmp_path / "results")))
        keys = open_key_store(cfg)  # the runtime's store migrated the database: api_keys exists
        _, key = keys.create("acme")
        keys.close()
        app = create_app(cfg, rt)
        await rt.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                assert (await c.post("/v1/jobs", json={"model": "img", "prompt": "p"})).status_code == 401
                auth = {"authorization": f"Bearer {key}"}
                r = await c.post("/v1/jobs", json={"model": "img", "prompt": "p"}, headers=auth)
                assert r.status_code == 202, r.text
                job = await wait_for(c, r.json()["id"], auth)
                assert job["status"] == "succeeded" and job["tenant"] == "acme"
                assert [a["code"] for a in job["attempts"]] == [None] and len(job["results"]) == 1
                usage = (await c.get("/v1/usage", headers=auth)).json()
                [acme] = usage["data"]  # computed from the job records in PostgreSQL
                assert acme["tenant"] == "acme" and acme["jobs"] == 1
                assert acme["by_model_day"][0]["succeeded"] == 1
        finally:
            await rt.close()
        # everything is in the database, nothing in SQLite files
        assert not (tmp_path / "jobs.db").exists() and not (tmp_path / "keys.db").exists()
        with psycopg.connect(pg_database) as db:
            assert db.execute("SELECT status, tenant FROM jobs").fetchall() == [("succeeded", "acme")]
            assert db.execute("SELECT COUNT(*) FROM attempts WHERE code IS NULL").fetchone() == (1,)
            assert db.execute("SELECT tenant FROM api_keys").fetchall() == [("acme",)]

    asyncio.run(go())
