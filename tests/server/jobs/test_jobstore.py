"""Direct tests of the SQLite job store: rows, retries' attempts, webhook deliveries, migrations."""
import json
import sqlite3

import pytest

from genserve.server.jobs import jobstore
from genserve.server.jobs.jobstore import JobStore


def params(model: str = "demo-image", priority: str = "normal", **extra) -> dict:
    return {"model": model, "priority": priority, "prompt": "a fox", "width": 64, "height": 64, **extra}


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "db" / "jobs.sqlite")  # the parent directory does not exist yet
    yield s
    s.close()


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


def test_journal_is_wal(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"


def test_client_ids_are_unique_but_optional(store):
    store.insert("j1", "client-a", params(), 1.0)
    store.insert("j2", "client-b", params(model="other"), 2.0)
    assert store.get_by_client_id("client-a")["id"] == "j1"
    assert store.get_by_client_id("client-b")["model"] == "other"
    assert store.get_by_client_id("client-c") is None
    with pytest.raises(sqlite3.IntegrityError):
        store.insert("j3", "client-a", params(), 3.0)
    assert store.get("j3") is None  # the failed insert left nothing behind
    # Most jobs carry no client id: NULLs never collide.
    store.insert("j4", None, params(), 4.0)
    store.insert("j5", None, params(), 5.0)
    assert store.get("j4") and store.get("j5")
    with pytest.raises(sqlite3.IntegrityError):
        store.insert("j1", None, params(), 6.0)  # the job id is the primary key


def test_update_many_fields_and_json_results(store):
    for i in range(3):
        store.insert(f"j{i}", None, params(), float(i))
    refs = [{"key": "j0/output.png", "content_type": "image/png", "bytes": 123}]
    store.update(["j0", "j1"], status="running", worker="w3", batch_id="b1", batch_size=2)
    store.update(("j0",), results=refs, status="succeeded", t_finished=9.5, cancel_requested=1)
    j0, j1, j2 = (store.get(f"j{i}") for i in range(3))
    assert j0["results"] == refs  # stored as JSON, read back as a list of dicts
    assert json.loads(store.db.execute("SELECT results FROM jobs WHERE id='j0'").fetchone()[0]) == refs
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
    path = store.db.execute("PRAGMA database_list").fetchone()["file"]
    other = sqlite3.connect(path)
    try:
        assert other.execute("SELECT status, attempts FROM jobs WHERE id = 'run2'").fetchone() == ("queued", 2)
        assert other.execute("SELECT code FROM attempts WHERE job_id = 'run2'").fetchone() == ("worker_crashed",)
    finally:
        other.close()
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
