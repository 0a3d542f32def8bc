"""Direct tests of the job store: rows, retries' attempts, webhook deliveries, migrations. The
same tests run on both backends (the ``store`` fixture: SQLite, and PostgreSQL on a throwaway
server, tests/server/jobs/pg_server.py); those about SQLite files use ``sqlite_store``."""
import json
import sqlite3

import pytest

from genserve.server.jobs import jobstore
from genserve.server.jobs.jobstore import JobStore


def params(model: str = "demo-image", priority: str = "normal", **extra) -> dict:
    return {"model": model, "priority": priority, "prompt": "a fox", "width": 64, "height": 64, **extra}


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = JobStore(tmp_path / "db" / "jobs.sqlite")  # the parent directory does not exist yet
    else:
        from genserve.server.jobs.store.postgres import PgJobStore

        s = PgJobStore(request.getfixturevalue("pg_database"), 2)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path):
    s = JobStore(tmp_path / "db" / "jobs.sqlite")
    yield s
    s.close()


def other_connection_reads(store, sql: str) -> tuple:
    """``sql``'s first row through a new connection (another process's view of what is committed)."""
    if store.backend == "sqlite":
        path = store.db.execute("PRAGMA database_list").fetchone()["file"]
        other = sqlite3.connect(path)
        try:
            return other.execute(sql).fetchone()
        finally:
            other.close()
    import psycopg

    with psycopg.connect(store.dsn) as other:
        return other.execute(sql).fetchone()


# ---- jobs --------------------------------------------------------------------------------------------


def test_insert_and_get_round_trip(store):
    p = params(seed=7, webhook=None)
    store.insert("j1", None, p, 100.0)
    job = store.get("j1")
    assert job["id"] == "j1"
    assert job["params"] == p  # decoded from JSON, not a string
    assert job["model"] == "demo-image" and job["priority"] == "normal"
    assert job["status"] == "queued"
    assert job["results"] == []
    assert job["cancel_requested"] is False
    assert job["attempts"] == 0
    assert job["t_received"] == job["t_queued"] == 100.0
    assert job["t_finished"] is None and job["worker"] is None
    assert store.get("nope") is None


def test_journal_is_wal(sqlite_store):
    store = sqlite_store
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"


def test_client_ids_are_unique_but_optional(store):
    store.insert("j1", "client-a", params(), 1.0)
    store.insert("j2", "client-b", params(model="other"), 2.0)
    assert store.get_by_client_id("client-a")["id"] == "j1"
    assert store.get_by_client_id("client-b")["model"] == "other"
    assert store.get_by_client_id("client-c") is None
    with pytest.raises(store.IntegrityError):
        store.insert("j3", "client-a", params(), 3.0)
    assert store.get("j3") is None  # the failed insert left nothing behind
    # Most jobs carry no client id: NULLs never collide.
    store.insert("j4", None, params(), 4.0)
    store.insert("j5", None, params(), 5.0)
    assert store.get("j4") and store.get("j5")
    with pytest.raises(store.IntegrityError):
        store.insert("j1", None, params(), 6.0)  # the job id is the primary key


def test_update_many_fields_and_json_results(store):
    for i in range(3):
        store.insert(f"j{i}", None, params(), float(i))
    refs = [{"key": "j0/output.png", "content_type": "image/png", "bytes": 123}]
    store.update(["j0", "j1"], status="running", worker="w3", batch_id="b1", batch_size=2)
    store.update(("j0",), results=refs, status="succeeded", t_finished=9.5, cancel_requested=1)
    j0, j1, j2 = (store.get(f"j{i}") for i in range(3))
    assert j0["results"] == refs  # stored as JSON, read back as a list of dicts
    assert json.loads(other_connection_reads(store, "SELECT results FROM jobs WHERE id='j0'")[0]) == refs
    assert j0["status"] == "succeeded" and j0["t_finished"] == 9.5 and j0["cancel_requested"] is True
    assert j0["worker"] == "w3" and j0["batch_size"] == 2
    assert j1["status"] == "running" and j1["batch_id"] == "b1" and j1["results"] == []
    assert j2["status"] == "queued" and j2["worker"] is None  # not named: untouched
    store.update([], status="failed")  # no ids: nothing happens (and no SQL error)
    assert [store.get(f"j{i}")["status"] for i in range(3)] == ["succeeded", "running", "queued"]


def test_update_added_columns(store):
    store.insert("j1", None, params(), 1.0)
    store.update(["j1"], served_model="fallback", device_seconds=1.25, cost_usd=0.01, device_type="cpu",
                 load_tier="page_cache")
    job = store.get("j1")
    assert (job["served_model"], job["device_seconds"], job["cost_usd"], job["device_type"], job["load_tier"]) == (
        "fallback", 1.25, 0.01, "cpu", "page_cache")


def test_unfinished_recent_active_since(store):
    # received/queued times out of id order, to see the ORDER BYs at work
    store.insert("a", None, params(), 30.0)
    store.insert("b", None, params(), 10.0)
    store.insert("c", None, params(), 20.0)
    store.insert("d", None, params(), 40.0)
    store.insert("e", None, params(), 50.0)
    store.update(["c"], status="running")
    store.update(["d"], status="succeeded", t_finished=45.0)
    store.update(["e"], status="failed", t_finished=55.0)
    assert [j["id"] for j in store.unfinished()] == ["b", "c", "a"]  # queued + running, by t_queued
    assert [j["id"] for j in store.recent()] == ["e", "d", "a", "c", "b"]  # newest first
    assert [j["id"] for j in store.recent(limit=2)] == ["e", "d"]
    # unfinished jobs always; finished ones at or after `since`
    assert [j["id"] for j in store.active_since(45.0)] == ["e", "d", "a", "c", "b"]
    assert [j["id"] for j in store.active_since(45.01)] == ["e", "a", "c", "b"]
    assert [j["id"] for j in store.active_since(100.0)] == ["a", "c", "b"]
    assert [j["id"] for j in store.active_since(0.0, limit=1)] == ["e"]
    store.update(["c"], status="canceled", t_finished=60.0)
    assert [j["id"] for j in store.unfinished()] == ["b", "a"]


def test_unfinished_ties_ordered_by_id(store):
    for jid in ("z", "m", "a"):
        store.insert(jid, None, params(), 5.0)
    assert [j["id"] for j in store.unfinished()] == ["a", "m", "z"]


# ---- attempts ---------------------------------------------------------------------------------------


def test_attempts_are_numbered_per_job_across_retries(store):
    for j in ("a", "b"):
        store.insert(j, None, params(), 0.0)
    store.start_attempts(("a", "b"), "w0", "demo-image", "batch1", 1.0)
    store.end_attempt("a", "out_of_memory", "CUDA out of memory", 2.0)
    store.end_attempt("b", "out_of_memory", "CUDA out of memory", 2.0)
    store.start_attempts(("a",), "w1", "demo-image", "batch2", 3.0)  # the OOM split: alone this time
    store.end_attempt("a", None, None, 4.0)  # success
    store.start_attempts(("b",), "w1", "fallback", "batch3", 5.0)

    a = store.attempts("a")
    assert [r["attempt"] for r in a] == [1, 2]
    assert (a[0]["worker"], a[0]["batch_id"], a[0]["batch_size"], a[0]["code"], a[0]["message"]) == (
        "w0", "batch1", 2, "out_of_memory", "CUDA out of memory")
    assert (a[0]["started"], a[0]["ended"]) == (1.0, 2.0)
    assert (a[1]["worker"], a[1]["batch_id"], a[1]["batch_size"], a[1]["code"], a[1]["ended"]) == (
        "w1", "batch2", 1, None, 4.0)
    b = store.attempts("b")
    assert [r["attempt"] for r in b] == [1, 2]
    assert b[1]["model"] == "fallback" and b[1]["ended"] is None and b[1]["code"] is None
    assert store.attempts("nobody") == []


def test_end_attempt_touches_only_the_open_attempt(store):
    store.insert("a", None, params(), 0.0)
    store.start_attempts(("a",), "w0", "m", "b1", 1.0)
    store.end_attempt("a", "timeout", "hung", 2.0)
    store.end_attempt("a", "internal", "late duplicate", 9.0)  # nothing open: a no-op
    [only] = store.attempts("a")
    assert (only["code"], only["message"], only["ended"]) == ("timeout", "hung", 2.0)


def test_requeue_unfinished_after_a_crash(store):
    for j, t in (("run1", 1.0), ("run2", 2.0), ("queued", 3.0), ("done", 0.5)):
        store.insert(j, None, params(), t)
    store.update(["run1", "run2"], status="running", batch_id="b7", batch_size=2, worker="w0", attempts=1,
                 t_dispatched=10.0, t_load_start=10.1, t_load_end=10.2, load_tier="disk",
                 t_inference_start=10.3, t_inference_end=10.9)
    store.start_attempts(("done",), "w0", "m", "b0", 5.0)
    store.end_attempt("done", None, None, 6.0)
    store.update(["done"], status="succeeded", t_finished=6.0, t_dispatched=5.0)
    store.start_attempts(("run1",), "w0", "m", "b6", 7.0)
    store.end_attempt("run1", "out_of_memory", "oom", 8.0)
    store.start_attempts(("run1", "run2"), "w0", "m", "b7", 10.0)

    back = store.requeue_unfinished(99.0)

    assert [j["id"] for j in back] == ["run1", "run2", "queued"]
    for jid in ("run1", "run2"):
        j = store.get(jid)
        assert j["status"] == "queued"
        assert j["attempts"] == 2  # the crash counts as a failed attempt
        for col in ("batch_id", "batch_size", "worker", "t_dispatched", "t_load_start", "t_load_end", "load_tier",
                    "t_inference_start", "t_inference_end"):
            assert j[col] is None, (jid, col)
        assert j["t_received"] is not None and j["t_queued"] is not None
    r1 = store.attempts("run1")
    assert [(r["attempt"], r["code"], r["ended"]) for r in r1] == [(1, "out_of_memory", 8.0), (2, "worker_crashed", 99.0)]
    assert r1[1]["message"] == "the server stopped during the attempt"
    [r2] = store.attempts("run2")
    assert (r2["code"], r2["ended"]) == ("worker_crashed", 99.0)
    # Jobs that were not running keep their state and attempts.
    q = store.get("queued")
    assert q["status"] == "queued" and q["attempts"] == 0
    d = store.get("done")
    assert d["status"] == "succeeded" and d["t_dispatched"] == 5.0
    [da] = store.attempts("done")
    assert (da["code"], da["ended"]) == (None, 6.0)
    # Committed as one transaction: another connection (a process after a crash) sees it all.
    assert other_connection_reads(store, "SELECT status, attempts FROM jobs WHERE id = 'run2'") == ("queued", 2)
    assert other_connection_reads(store, "SELECT code FROM attempts WHERE job_id = 'run2'") == ("worker_crashed",)
    # A second start (nothing running any more) changes nothing.
    assert [j["id"] for j in store.requeue_unfinished(200.0)] == ["run1", "run2", "queued"]
    assert store.get("run1")["attempts"] == 2
    assert store.attempts("run1")[1]["ended"] == 99.0


# ---- webhook deliveries -----------------------------------------------------------------------------


def test_webhook_deliveries(store):
    store.insert("j1", None, params(), 0.0)
    store.insert("j2", None, params(), 0.0)
    store.add_delivery("msg_a", "j1", "http://127.0.0.1:1/hook", "started", '{"type": "job.started"}', 10.0)
    store.add_delivery("msg_b", "j1", "http://127.0.0.1:1/hook", "completed", '{"type": "job.completed"}', 11.0)
    store.add_delivery("msg_c", "j2", "http://127.0.0.1:1/other", "completed", "{}", 12.0)

    pending = store.pending_deliveries()
    assert [d["id"] for d in pending] == ["msg_a", "msg_b", "msg_c"]
    a = pending[0]
    assert (a["job_id"], a["url"], a["event"], a["payload"], a["status"], a["attempts"]) == (
        "j1", "http://127.0.0.1:1/hook", "started", '{"type": "job.started"}', "pending", 0)
    assert a["next_at"] == a["created"] == 10.0 and a["last_error"] is None and a["delivered"] is None
    assert [d["id"] for d in store.pending_deliveries(limit=2)] == ["msg_a", "msg_b"]

    # a retry pushes msg_a back behind the others; delivered and failed rows leave the pending list
    store.update_delivery("msg_a", attempts=1, last_error="HTTP 500", next_at=20.0)
    assert [d["id"] for d in store.pending_deliveries()] == ["msg_b", "msg_c", "msg_a"]
    store.update_delivery("msg_b", status="delivered", attempts=1, delivered=13.0, last_error=None)
    store.update_delivery("msg_c", status="failed", attempts=1, last_error="HTTP 400")
    assert [d["id"] for d in store.pending_deliveries()] == ["msg_a"]

    j1 = store.deliveries("j1")
    assert [(d["id"], d["event"], d["status"], d["attempts"], d["last_error"], d["delivered"]) for d in j1] == [
        ("msg_a", "started", "pending", 1, "HTTP 500", None),
        ("msg_b", "completed", "delivered", 1, None, 13.0),
    ]
    assert "payload" not in j1[0] and "url" not in j1[0]  # the API view leaves those out
    assert [(d["id"], d["status"], d["last_error"]) for d in store.deliveries("j2")] == [("msg_c", "failed", "HTTP 400")]
    assert store.deliveries("j3") == []


# ---- durability and migration -----------------------------------------------------------------------


def test_everything_survives_close_and_reopen(tmp_path):
    path = tmp_path / "jobs.sqlite"
    s = JobStore(path)
    s.insert("j1", "cid", params(), 1.0)
    s.update(["j1"], status="succeeded", results=[{"key": "j1/output.png"}], t_finished=2.0)
    s.start_attempts(("j1",), "w0", "m", "b1", 1.5)
    s.end_attempt("j1", None, None, 2.0)
    s.add_delivery("msg_1", "j1", "http://127.0.0.1:9/", "completed", "{}", 2.0)
    s.close()

    s2 = JobStore(path)
    try:
        job = s2.get_by_client_id("cid")
        assert job["id"] == "j1" and job["status"] == "succeeded" and job["results"] == [{"key": "j1/output.png"}]
        assert [(a["attempt"], a["ended"]) for a in s2.attempts("j1")] == [(1, 2.0)]
        assert [d["id"] for d in s2.pending_deliveries()] == ["msg_1"]
        # a committed write is visible to a second connection while the first is open (no open transaction)
        s2.insert("j2", None, params(), 3.0)
        other = sqlite3.connect(path)
        try:
            assert other.execute("SELECT status FROM jobs WHERE id = 'j2'").fetchone() == ("queued",)
        finally:
            other.close()
    finally:
        s2.close()


def test_old_database_gets_added_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    # The first release's schema: _SCHEMA itself, without any of _ADDED_COLUMNS.
    old = sqlite3.connect(path)
    old.executescript(jobstore._SCHEMA)
    have = {r[1] for r in old.execute("PRAGMA table_info(jobs)")}
    added = set(jobstore._ADDED_COLUMNS["jobs"])
    assert added and not (added & have)  # the test really starts from an old database
    old.execute("INSERT INTO jobs (id, model, params, priority, status, t_received, t_queued)"
                " VALUES ('old1', 'm', ?, 'normal', 'succeeded', 1.0, 1.0)", (json.dumps(params(model="m")),))
    old.commit()
    old.close()

    s = JobStore(path)
    try:
        cols = {r["name"]: r["type"] for r in s.db.execute("PRAGMA table_info(jobs)")}
        for col, decl in jobstore._ADDED_COLUMNS["jobs"].items():
            assert cols.get(col) == decl.split()[0], col
        job = s.get("old1")
        assert job["status"] == "succeeded" and job["params"]["model"] == "m"
        assert all(job[c] is None for c in added - {"tenant"})
        assert job["tenant"] == "default"  # jobs from before tenants belong to the default tenant
        s.update(["old1"], served_model="m2", cost_usd=0.5)
        assert (s.get("old1")["served_model"], s.get("old1")["cost_usd"]) == ("m2", 0.5)
        assert "jobs_finished" in {r["name"] for r in s.db.execute("PRAGMA index_list(jobs)")}
    finally:
        s.close()
    # Opening an already migrated database again is a no-op, not a "duplicate column" error.
    s = JobStore(path)
    try:
        assert s.get("old1")["served_model"] == "m2"
    finally:
        s.close()


def test_old_database_with_a_global_client_id_constraint_becomes_per_tenant(tmp_path):
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(jobstore._SCHEMA.replace("client_id TEXT,", "client_id TEXT UNIQUE,"))
    old.execute("INSERT INTO jobs (id, client_id, model, params, priority, status, t_received, t_queued)"
                " VALUES ('old1', 'c1', 'm', ?, 'standard', 'queued', 1.0, 1.0)", (json.dumps(params(model="m")),))
    old.commit()
    old.close()
    s = JobStore(path)
    try:
        assert s.get_by_client_id("c1")["id"] == "old1"  # kept, in the default tenant
        s.insert("new1", "c1", params(), 2.0, tenant="acme")  # the same client id, another tenant
        assert s.get_by_client_id("c1", "acme")["id"] == "new1"
        with pytest.raises(sqlite3.IntegrityError):
            s.insert("new2", "c1", params(), 3.0, tenant="acme")  # still unique inside a tenant
        assert s.queued_count("acme") == 1 and s.queued_count("default") == 1
        assert [j["id"] for j in s.recent(10, "acme")] == ["new1"] and len(s.recent(10)) == 2
    finally:
        s.close()
    s = JobStore(path)  # opening again does not rebuild anything
    try:
        assert len(s.recent(10)) == 2
    finally:
        s.close()


# ---- what both backends must agree on beyond single rows --------------------------------------------


def test_usage_by_tenant_model_and_utc_day(store):
    day1, day2 = 1_700_000_000.0, 1_700_000_000.0 + 86_400
    store.insert("a", None, params(), day1, tenant="acme")
    store.insert("b", None, params(), day1 + 1, tenant="acme")
    store.insert("c", None, params(model="other"), day2, tenant="acme")
    store.insert("d", None, params(), day1, tenant="zeta")
    store.update(["a"], status="succeeded", device_seconds=1.5, cost_usd=0.25)
    store.update(["b"], status="failed", device_seconds=0.5, cost_usd=0.05)
    store.update(["d"], status="canceled")
    rows = store.usage(0.0)
    assert [(r["tenant"], r["model"], r["day"], r["jobs"], r["succeeded"], r["failed"], r["canceled"]) for r in rows] == [
        ("acme", "demo-image", "2023-11-14", 2, 1, 1, 0), ("acme", "other", "2023-11-15", 1, 0, 0, 0),
        ("zeta", "demo-image", "2023-11-14", 1, 0, 0, 1)]
    assert rows[0]["device_seconds"] == pytest.approx(2.0) and rows[0]["cost_usd"] == pytest.approx(0.30)
    assert rows[1]["device_seconds"] == 0.0
    assert [r["tenant"] for r in store.usage(0.0, tenant="zeta")] == ["zeta"]
    assert [r["model"] for r in store.usage(day2)] == ["other"]


def test_retention_queries_and_delete(store):
    store.insert("old", None, params(), 1.0)
    store.insert("new", None, params(), 2.0)
    store.insert("live", None, params(), 3.0)
    ref = {"key": "old/output.png", "bytes": 100, "thumbnail": {"key": "old/thumb.webp", "bytes": 7}}
    store.update(["old"], status="succeeded", t_finished=10.0, results=[ref])
    store.update(["new"], status="succeeded", t_finished=20.0, results=[{"key": "new/o.png", "bytes": 50}])
    assert store.stored_result_bytes() == 157
    assert [r["id"] for r in store.finished_with_results(None, 10)] == ["old", "new"]
    assert [r["id"] for r in store.finished_with_results(15.0, 10)] == ["old"]
    assert store.finished_before(15.0, 10) == [{"id": "old", "results": [ref]}]
    store.results_deleted("old", 30.0)
    assert store.get("old")["results"] == [] and store.get("old")["t_results_deleted"] == 30.0
    assert store.stored_result_bytes() == 50
    store.start_attempts(("new",), "w0", "m", "b1", 5.0)
    store.add_delivery("msg_done", "new", "http://127.0.0.1:1/", "completed", "{}", 6.0)
    store.add_delivery("msg_pending", "new", "http://127.0.0.1:1/", "completed", "{}", 6.0)
    store.update_delivery("msg_done", status="delivered")
    assert store.delete_job("new") is True and store.delete_job("new") is False
    assert store.get("new") is None and store.attempts("new") == []
    assert [d["id"] for d in store.deliveries("new")] == ["msg_pending"]  # a pending one still goes out


def test_max_queued_counts_and_inserts_in_one_transaction(store):
    from genserve.server.jobs.store.interface import QueueLimitReached

    store.insert("a", None, params(), 1.0, tenant="acme", max_queued=2)
    store.insert("b", None, params(), 2.0, tenant="acme", max_queued=2)
    with pytest.raises(QueueLimitReached) as e:
        store.insert("c", None, params(), 3.0, tenant="acme", max_queued=2)
    assert (e.value.queued, e.value.limit) == (2, 2) and store.get("c") is None
    store.insert("z", None, params(), 3.0, tenant="other", max_queued=2)  # per tenant
    store.update(["a"], status="running")  # only queued jobs count
    store.insert("c", None, params(), 4.0, tenant="acme", max_queued=2)
    assert store.queued_count("acme") == 2


def test_max_queued_holds_for_writers_racing_on_one_postgres(pg_database):
    """Two gateways (two pools) and many threads racing for the last slots: never more than the
    limit. Without the advisory lock both would read "room" and insert (READ COMMITTED)."""
    import threading

    from genserve.server.jobs.store.interface import QueueLimitReached
    from genserve.server.jobs.store.postgres import PgJobStore

    gateways = [PgJobStore(pg_database, 4), PgJobStore(pg_database, 4)]
    accepted, refused = [], []
    start = threading.Barrier(8)

    def submit(i: int) -> None:
        start.wait()
        for k in range(5):
            try:
                gateways[i % 2].insert(f"j{i}-{k}", None, params(), float(k), tenant="acme", max_queued=7)
                accepted.append(i)
            except QueueLimitReached:
                refused.append(i)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(accepted) == 7 and len(refused) == 33
        assert gateways[0].queued_count("acme") == 7
    finally:
        for g in gateways:
            g.close()


def test_migrations_are_versioned_and_applied_once(tmp_path, pg_database):
    import psycopg

    from genserve.server.jobs.store import migrations
    from genserve.server.jobs.store.postgres import PgJobStore

    s = JobStore(tmp_path / "v.sqlite")
    assert migrations.applied_sqlite(s.db) == [m.version for m in migrations.SQLITE]
    s.close()
    s = JobStore(tmp_path / "v.sqlite")  # opening again applies nothing twice
    assert migrations.applied_sqlite(s.db) == [m.version for m in migrations.SQLITE]
    s.close()
    with psycopg.connect(pg_database, autocommit=True) as c:
        assert migrations.applied_postgres(c) == []
        assert migrations.upgrade_postgres(c) == [m.version for m in migrations.POSTGRES]
        assert migrations.upgrade_postgres(c) == []  # up to date: a no-op
        assert migrations.applied_postgres(c) == [1, 2, 3, 4] == [m.version for m in migrations.POSTGRES]
    PgJobStore(pg_database, 1).close()  # a store opened over an upgraded database does not fail


def test_a_new_postgres_job_is_announced_when_its_insert_commits(pg_database):
    import psycopg

    from genserve.server.jobs.store.postgres import PgJobStore

    s = PgJobStore(pg_database, 1)
    try:
        with psycopg.connect(pg_database, autocommit=True) as listener:
            listener.execute("LISTEN genserve_jobs")
            listener.execute("LISTEN genserve_events")
            s.insert("j1", None, params(), 5.0, tenant="acme")
            got = list(listener.notifies(timeout=10, stop_after=2))
        assert [(n.channel, n.payload if n.channel == "genserve_jobs" else json.loads(n.payload)) for n in got] == [
            ("genserve_jobs", "j1"),
            ("genserve_events", {"kind": "queued", "job_id": "j1", "now": 5.0,
                                 "data": {"model": "demo-image", "priority": "normal", "tenant": "acme"}})]
    finally:
        s.close()
