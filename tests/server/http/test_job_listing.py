"""Job listing pages: the store's cursor query (JobStore.page) and GET /v1/jobs over it, and the
OpenAI client's paging of /v1/videos (in process: the app over a runtime on the fake pool)."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from genserve.server.jobs.jobstore import JobStore
from genserve.server.security.keys import KeyStore

from .test_videos_api import VideoWorld

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


def params(model: str = "img") -> dict:
    return {"model": model, "priority": "standard", "prompt": "p"}


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """The listing query on both store backends (PostgreSQL's tie-break is its seq column)."""
    if request.param == "sqlite":
        s = JobStore(tmp_path / "jobs.sqlite")
    else:
        from genserve.server.jobs.store.postgres import PgJobStore

        s = PgJobStore(request.getfixturevalue("pg_database"), 2)
    yield s
    s.close()


def walk(store: JobStore, limit: int, **kw) -> list[list[str]]:
    pages, after = [], None
    while True:
        page = store.page(limit, after=after, **kw)
        pages.append([j["id"] for j in page.items])
        if not page.has_more:
            return pages
        after = page.items[-1]["id"]


def test_pages_cover_every_job_once_in_order_with_ties_in_insertion_order(store):
    # j0..j6; j2, j3, j4 share a timestamp (one clock read for several submits)
    for i, t in enumerate((1.0, 2.0, 3.0, 3.0, 3.0, 4.0, 5.0)):
        store.insert(f"j{i}", None, params(), t)
    assert walk(store, 3) == [["j6", "j5", "j4"], ["j3", "j2", "j1"], ["j0"]]
    assert walk(store, 3, order="asc") == [["j0", "j1", "j2"], ["j3", "j4", "j5"], ["j6"]]
    assert walk(store, 7) == [["j6", "j5", "j4", "j3", "j2", "j1", "j0"]]  # exactly one page: has_more false
    assert store.page(10, after="j0").items == [] and not store.page(10, after="j0").has_more
    assert [j["id"] for j in store.recent(2)] == ["j6", "j5"]


def test_a_cursor_is_stable_while_jobs_arrive_and_change(store):
    for i in range(5):
        store.insert(f"j{i}", None, params(), float(i))
    first = store.page(2)
    assert [j["id"] for j in first.items] == ["j4", "j3"] and first.has_more
    store.insert("new", None, params(), 10.0)  # arrives between pages: before page one, not repeated
    store.update(["j2"], status="succeeded")  # a status change does not move a job
    store.delete_job("j4")  # nor does deleting one already shown
    assert [j["id"] for j in store.page(2, after="j3").items] == ["j2", "j1"]
    asc = store.page(3, order="asc")
    store.insert("newer", None, params(), 11.0)
    assert [j["id"] for j in store.page(10, after=asc.items[-1]["id"], order="asc").items] == ["j3", "new", "newer"]


def test_filters_and_an_unknown_cursor(store):
    for i in range(6):
        store.insert(f"j{i}", None, params("vid" if i % 2 else "img"), float(i), tenant="a" if i < 4 else "b")
    store.update(["j1"], status="failed")
    assert [j["id"] for j in store.page(10, tenant="a").items] == ["j3", "j2", "j1", "j0"]
    assert [j["id"] for j in store.page(10, models=("vid",)).items] == ["j5", "j3", "j1"]
    assert [j["id"] for j in store.page(10, models=()).items] == []
    assert [j["id"] for j in store.page(10, status="failed").items] == ["j1"]
    assert [j["id"] for j in store.page(1, tenant="a", models=("vid",), after="j3").items] == ["j1"]
    # the cursor is a position: it need not match the filters (a job's status changes)
    assert [j["id"] for j in store.page(10, status="queued", after="j1").items] == ["j0"]
    with pytest.raises(KeyError):
        store.page(10, after="nope")
    with pytest.raises(ValueError):
        store.page(10, order="sideways")


def test_get_jobs_pages_with_has_more_and_refuses_bad_parameters(tmp_path):
    async def go():
        keys = KeyStore(tmp_path)
        _, acme = keys.create("acme")
        _, other = keys.create("other")
        _, admin = keys.create("ops", "admin")
        keys.close()
        async with VideoWorld(tmp_path) as w, w.http(acme) as a, w.http(other) as b, w.http(admin) as ad:
            ids = []
            for i in range(5):
                w.clock.t += 1
                ids.append((await a.post("/v1/jobs", json={"model": "img", "prompt": f"p{i}"})).json()["id"])
            w.clock.t += 1
            theirs = (await b.post("/v1/jobs", json={"model": "img", "prompt": "b"})).json()["id"]
            p1 = (await a.get("/v1/jobs?limit=2")).json()
            assert [j["id"] for j in p1["data"]] == ids[:2:-1] and p1["has_more"] is True
            assert (p1["object"], p1["first_id"], p1["last_id"]) == ("list", ids[4], ids[3])
            p2 = (await a.get(f"/v1/jobs?limit=2&after={p1['last_id']}")).json()
            p3 = (await a.get(f"/v1/jobs?limit=2&after={p2['last_id']}")).json()
            assert [j["id"] for j in p2["data"] + p3["data"]] == ids[2::-1] and p3["has_more"] is False
            asc = (await a.get("/v1/jobs?order=asc&limit=10")).json()
            assert [j["id"] for j in asc["data"]] == ids and asc["has_more"] is False
            empty = (await a.get(f"/v1/jobs?after={ids[0]}")).json()
            assert empty == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
            assert [j["id"] for j in (await a.get("/v1/jobs?model=vid")).json()["data"]] == []
            # one worker, batches of 1: the first job was dispatched, the rest wait
            assert [j["id"] for j in (await a.get("/v1/jobs?status=running")).json()["data"]] == [ids[0]]
            assert len((await a.get("/v1/jobs?status=queued")).json()["data"]) == 4
            # the admin: everyone's, or one tenant's; a cursor of any tenant
            assert [j["id"] for j in (await ad.get("/v1/jobs?limit=1")).json()["data"]] == [theirs]
            r = (await ad.get(f"/v1/jobs?tenant=acme&after={theirs}&limit=1")).json()
            assert [j["id"] for j in r["data"]] == [ids[4]]
            for query, field in ((f"after={theirs}", "after"), ("after=nope", "after"), ("limit=0", "limit"),
                                 ("limit=1001", "limit"), ("order=up", "order")):
                r = await a.get(f"/v1/jobs?{query}")
                assert r.status_code == 400 and r.json()["error"]["param"] == field, (query, r.text)
            # another tenant's cursor reads exactly like a made-up one
            assert (await a.get(f"/v1/jobs?after={theirs}")).json()["error"]["message"].replace(theirs, "X") == \
                (await a.get("/v1/jobs?after=nope")).json()["error"]["message"].replace("nope", "X")
    asyncio.run(go())


def test_the_official_client_pages_through_videos(tmp_path):
    async def go():
        async with VideoWorld(tmp_path) as w:
            client = w.client()
            made = []
            for i in range(5):
                w.clock.t += 1
                made.append((await client.videos.create(prompt=f"v{i}")).id)
            async with w.http() as c:  # an image job is not listed among videos
                await c.post("/v1/jobs", json={"model": "img", "prompt": "not a video"})
            page = await client.videos.list(limit=2)
            assert [v.id for v in page.data] == made[:2:-1] and page.has_more is True and page.last_id == made[3]
            seen = [v.id async for v in await client.videos.list(limit=2)]  # the client follows last_id
            assert seen == made[::-1]
            page = await client.videos.list(limit=2, after=made[1], order="asc")
            assert [v.id for v in page.data] == made[2:4] and page.has_more is True
            page = await client.videos.list(limit=3, after=made[1], order="asc")
            assert [v.id for v in page.data] == made[2:] and page.has_more is False
    asyncio.run(go())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(times=st.lists(st.integers(0, 5), max_size=25), limit=st.integers(1, 6), asc=st.booleans(),
       arrivals=st.lists(st.integers(0, 8), max_size=4))
def test_walking_pages_yields_each_job_once_in_order(tmp_path_factory, times, limit, asc, arrivals):
    """Any timestamps (many equal), any page size, jobs arriving between pages (at the current
    time or later, as a clock gives them): every job present at the start is seen exactly once,
    in (time, insertion) order."""
    s = JobStore(tmp_path_factory.mktemp("walk") / "jobs.sqlite")
    try:
        for i, t in enumerate(times):
            s.insert(f"j{i}", None, params(), float(t))
        want = [f"j{i}" for i, _ in sorted(enumerate(times), key=lambda x: (x[1], x[0]))]
        want = want if asc else want[::-1]
        seen, after, late = [], None, iter(arrivals)
        while True:
            page = s.page(limit, after=after, order="asc" if asc else "desc")
            seen += [j["id"] for j in page.items]
            if not page.has_more:
                break
            after = page.items[-1]["id"]
            extra = next(late, None)
            if extra is not None:  # a new job, no older than the newest so far
                s.insert(f"new{len(seen)}", None, params(), float(max(times) + extra))
        assert [i for i in seen if i.startswith("j")] == want
        assert len(seen) == len(set(seen))
        assert asc or all(i.startswith("j") for i in seen)  # newest first: later arrivals are not reached
    finally:
        s.close()
