"""The speed levers through the live server: per-request step caches take part in the batch key
(different settings never share a batch), unsupported ones are 400s naming the field, the job
records what ran (``execution``), and prompt-cache hits and cache steps reach /metrics."""
import httpx
import pytest

from genserve.bench.live import LiveServer, post_concurrently, wait_for

from .test_observability import scrape, val

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(demo_models, tmp_path_factory):
    text = f"""
[models.fast-image]
kind = "image"
source = "{demo_models / 'demo-image'}"
max_batch_size = 8
max_wait_ms = 1500
sizes = ["64x64"]
default_steps = 6
default_guidance = 1.0
caches = ["deep"]

[models.fast-video]
kind = "video"
source = "{demo_models / 'demo-video'}"
max_batch_size = 2
max_pixels = 4096
size_multiple = 16
default_size = "32x32"
default_steps = 4
default_guidance = 1.0
default_frames = 5
max_frames = 5
frame_stride = 4
caches = ["first_block", "taylorseer"]
default_cache = {{method = "taylorseer", interval = 2}}
"""
    srv = LiveServer(tmp_path_factory.mktemp("speed"), text, workers=1).start()
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c
    srv.stop()


def test_different_cache_settings_never_share_a_batch(client):
    deep3 = {"method": "deep", "interval": 3}
    bodies = [{"model": "fast-image", "prompt": f"fox {i}", "seed": i, **({"cache": c} if c else {})}
              for i, c in enumerate([deep3, deep3, {"method": "deep", "interval": 2}, None])]
    ids = [r.json()["id"] for r in post_concurrently(client.base_url, bodies)]
    jobs = [wait_for(client, j) for j in ids]
    assert all(j["status"] == "succeeded" for j in jobs), [j["error"] for j in jobs]
    batch = [j["batch"]["id"] for j in jobs]
    assert batch[0] == batch[1] and len({batch[0], batch[2], batch[3]}) == 3
    assert jobs[0]["execution"]["cache"] == deep3
    assert (jobs[0]["execution"]["steps_computed"], jobs[0]["execution"]["steps_reused"]) == (2, 4)
    assert (jobs[2]["execution"]["steps_computed"], jobs[2]["execution"]["steps_reused"]) == (3, 3)
    assert jobs[3]["execution"]["cache"] is None and jobs[3]["execution"]["steps_reused"] == 0


def test_unsupported_caches_are_400s_naming_the_field(client):
    for cache, field in [({"method": "first_block"}, "cache.method"), ({"method": "nope"}, "cache.method"),
                         ({"method": "deep", "interval": 99}, "cache.interval")]:
        r = client.post("/v1/jobs", json={"model": "fast-image", "prompt": "x", "cache": cache})
        assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text
    r = client.post("/v1/jobs", json={"model": "fast-video", "prompt": "x", "cache": {"method": "first_block",
                                                                                     "threshold": 2}})
    assert r.status_code == 400 and r.json()["error"]["field"] == "cache.threshold"


def test_prompt_cache_and_default_cache_are_recorded_and_counted(client):
    before = scrape(client)
    first = wait_for(client, client.post("/v1/jobs", json={"model": "fast-video", "prompt": "tide"}).json()["id"])
    second = wait_for(client, client.post("/v1/jobs", json={"model": "fast-video", "prompt": "tide",
                                                            "seed": 5}).json()["id"])
    ex1, ex2 = first["execution"], second["execution"]
    assert (ex1["prompt_cache"], ex2["prompt_cache"]) == ("miss", "hit")
    assert ex1["cache"] == {"method": "taylorseer", "interval": 2} and ex1["steps_reused"] > 0  # the default cache
    after = scrape(client)

    def delta(name, **labels):
        return val(after, name, **labels) - val(before, name, **labels)

    assert delta("genserve_prompt_cache_total", model="fast-video", result="hit") == 1
    assert delta("genserve_prompt_cache_total", model="fast-video", result="miss") == 1
    reused = ex1["steps_reused"] + ex2["steps_reused"]
    assert delta("genserve_step_cache_steps_total", model="fast-video", method="taylorseer", kind="reused") == reused
