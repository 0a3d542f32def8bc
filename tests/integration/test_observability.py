"""Metrics, cost, /v1/stats and JSON logs against the live server, checked against what the test did
and against the job records."""
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from genserve.bench.live import post_concurrently, wait_for, wait_until
from genserve.server.observe.metrics import METRIC_NAMES, TIERS
from genserve.server.observe.stats import percentile

from .conftest import OBS_PRICE_CPU

pytestmark = pytest.mark.slow


def scrape(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(m: dict, name: str, **labels) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def submit(client, **body):
    r = client.post("/v1/jobs", json={"model": "demo-image", "prompt": "observed", **body})
    assert r.status_code == 202, r.text
    return r.json()


def concurrent(url, bodies):
    out = post_concurrently(url, bodies)
    assert all(r.status_code == 202 for r in out), [r.text for r in out]
    return [r.json()["id"] for r in out]


def charged(client, job_id, timeout=30.0):
    """The job record once its batch has ended and its cost is set."""
    def job_if_charged():
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["cost"]["device_seconds"] is not None else None

    return wait_until(job_if_charged, timeout, what=f"job {job_id} to be charged", every=0.05)


def residency_loads(client, model: str) -> list[dict]:
    """The model loads in the workers' residency log (each one a real load: a ``genserve_cold_starts``)."""
    changes = client.get("/v1/workers").json()["recent_residency_changes"]
    return [e for e in changes if e["action"] == "load" and e["model"] == model]


def load_key(e: dict) -> tuple:
    return (e["t"], e["worker"], e["tier"], e["seconds"])


def test_metrics_match_what_the_test_did(obs_client, obs_server):
    # Unload demo-image if an earlier test left it resident, so this test's jobs wait for a load of
    # their own (a cold start the metrics must show). Nothing runs now, so nothing refuses the unload.
    r = obs_client.post("/v1/models/demo-image/unload")
    assert r.status_code == 200, r.text
    # The engine forgets the model as it answers (the worker unloads it before any later load).
    assert not any(m["model"] == "demo-image" for w in obs_client.get("/v1/workers").json()["data"]
                   for m in w["resident_models"])
    loads_before = {load_key(e) for e in residency_loads(obs_client, "demo-image")}
    before = scrape(obs_client)
    # A job that waits (slow-lane's window is ten minutes): the queue depth gauge shows it.
    waiting = submit(obs_client, model="slow-lane")
    m = scrape(obs_client)
    assert val(m, "genserve_queue_depth", model="slow-lane", device_type="any") == 1
    ids = concurrent(obs_server.url, [{"model": "demo-image", "prompt": f"m{i}", "steps": 2} for i in range(3)])
    jobs = [wait_for(obs_client, j) for j in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    obs_client.post(f"/v1/jobs/{waiting['id']}/cancel")
    jobs = [charged(obs_client, j) for j in ids]
    after = scrape(obs_client)

    def delta(name, **labels):
        return val(after, name, **labels) - val(before, name, **labels)

    assert val(after, "genserve_queue_depth", model="slow-lane", device_type="any") == 0
    assert delta("genserve_jobs_total", model="demo-image", status="succeeded", code="none") == 3
    assert delta("genserve_jobs_total", model="slow-lane", status="canceled", code="none") == 1
    assert delta("genserve_job_latency_seconds_count", model="demo-image") == 3
    assert delta("genserve_batch_size_sum", model="demo-image") == 3
    assert delta("genserve_batch_size_count", model="demo-image") == len({j["batch"]["id"] for j in jobs})
    # Every latency bucket moved by exactly the jobs whose recorded total fits in it.
    totals = [j["timestamps"]["finished"] - j["timestamps"]["received"] for j in jobs]
    for le in ("0.5", "1.0", "2.5", "5.0", "10.0", "+Inf"):
        bound = float(le)
        assert delta("genserve_job_latency_seconds_bucket", model="demo-image", le=le) == sum(t <= bound for t in totals), le
    assert delta("genserve_job_stage_seconds_count", model="demo-image", stage="inference") == 3
    # genserve_cold_starts counts model loads, not the batches or jobs that waited for them: under
    # load two batches can be placed behind one load. So the counter moved by exactly the loads the
    # workers' residency log recorded meanwhile, per tier, and the cold-start duration histogram with it.
    new_loads = [e for e in residency_loads(obs_client, "demo-image") if load_key(e) not in loads_before]
    assert new_loads, "demo-image was unloaded: this test's jobs must have waited for a load"
    for tier in TIERS:
        of_tier = [e for e in new_loads if e["tier"] == tier]
        assert delta("genserve_cold_starts_total", model="demo-image", tier=tier) == len(of_tier), tier
        assert delta("genserve_cold_start_seconds_count", model="demo-image", tier=tier) == len(of_tier), tier
        assert delta("genserve_cold_start_seconds_sum", model="demo-image", tier=tier) == pytest.approx(
            sum(e["seconds"] for e in of_tier), abs=1e-3), tier
    # Every batch of this test that waited, waited for one of those loads: the jobs' records name
    # the load (worker, tier, start and end), and however many batches shared a load it counts once.
    waited = {(j["batch"]["worker"], j["cold_start"]["tier"], j["timestamps"]["load_start"], j["timestamps"]["load_end"])
              for j in jobs if j["cold_start"]["waited"]}
    assert waited, "no job of this test waited for the load it caused"
    assert len(waited) <= len(new_loads)
    for worker, tier, start, end in waited:
        assert any(e["worker"] == worker and e["tier"] == tier and e["seconds"] == pytest.approx(end - start, abs=1e-4)
                   for e in new_loads), (worker, tier, end - start, new_loads)
    assert val(after, "genserve_models_resident", model="demo-image", device_type="cpu") == 1
    assert val(after, "genserve_workers", state="idle") + val(after, "genserve_workers", state="busy") == 1
    assert val(after, "genserve_device_busy_seconds_total", worker="w0", device_type="cpu") > 0
    # Every documented metric family is exposed (retries included, though nothing retried yet).
    names = {n for n, _ in after} | {line.split()[2] for line in obs_client.get("/metrics").text.splitlines()
                                      if line.startswith("# TYPE")}
    missing = [n for n in METRIC_NAMES if n not in names and f"{n}_total" not in names]
    assert not missing, missing


def test_cost_apportioning_sums_to_batch_device_time(obs_client, obs_server):
    ids = concurrent(obs_server.url, [{"model": "demo-image", "prompt": f"c{i}", "steps": 3, "width": 128,
                                       "height": 64} for i in range(4)])
    jobs = [charged(obs_client, wait_for(obs_client, j)["id"]) for j in ids]
    by_batch = {}
    for j in jobs:
        by_batch.setdefault(j["batch"]["id"], []).append(j)
    for batch, members in by_batch.items():
        shares = [j["cost"]["device_seconds"] for j in members]
        assert len(members) == members[0]["batch"]["size"]
        assert max(shares) == pytest.approx(min(shares))  # same shape: equal shares
        batch_s = sum(shares)
        t = members[0]["timestamps"]
        # The batch held the device from dispatch to its end: at least until its last output was written.
        last_write = max(j["timestamps"]["output_written"] for j in members)
        assert last_write - t["dispatched"] <= batch_s + 1e-6 < last_write - t["dispatched"] + 1.0
        assert sum(j["cost"]["usd"] for j in members) == pytest.approx(batch_s * OBS_PRICE_CPU / 3600)
        assert all(j["cost"]["device_type"] == "cpu" for j in members)
    m = scrape(obs_client)
    every = obs_client.get("/v1/jobs", params={"limit": 1000}).json()["data"]
    charged_s = sum(j["cost"]["device_seconds"] or 0 for j in every)
    per_model = sum(v for (n, _), v in m.items() if n == "genserve_device_seconds_total")
    assert per_model == pytest.approx(charged_s)
    usd = sum(v for (n, _), v in m.items() if n == "genserve_cost_usd_total")
    assert usd == pytest.approx(charged_s * OBS_PRICE_CPU / 3600)
    # What was charged is what the device was busy (the ledger sees the same dispatch..end spans).
    busy = val(m, "genserve_device_busy_seconds_total", worker="w0", device_type="cpu")
    assert busy == pytest.approx(charged_s, abs=0.05 * len({j["batch"]["id"] for j in every if j["batch"]}))


def test_stats_percentiles_match_job_records(obs_client, obs_server):
    ids = concurrent(obs_server.url, [{"model": "demo-image", "prompt": f"s{i}", "steps": 2} for i in range(5)])
    for j in ids:
        charged(obs_client, wait_for(obs_client, j)["id"])
    st = obs_client.get("/v1/stats", params={"window": "1h"}).json()
    every = obs_client.get("/v1/jobs", params={"limit": 1000}).json()["data"]
    ok = [j for j in every if j["model"] == "demo-image" and j["status"] == "succeeded"]
    img = st["models"]["demo-image"]
    assert img["by_status"]["succeeded"] == len(ok) and st["window_s"] == 3600
    totals = [j["timestamps"]["finished"] - j["timestamps"]["received"] for j in ok]
    for name, q in (("p50", 50), ("p95", 95), ("p99", 99), ("p99.9", 99.9)):
        assert img["latency_s"][name] == pytest.approx(percentile(totals, q), abs=1e-6), name
    inference = [j["breakdown"]["inference_s"] for j in ok]
    assert img["stages_s"]["inference"]["p50"] == pytest.approx(percentile(inference, 50), abs=1e-3)
    batches = {j["batch"]["id"]: j["batch"]["size"] for j in ok}
    assert img["batches"] >= len(batches) and img["mean_batch_size"] >= 1
    assert img["cost_per_inference_usd"] == pytest.approx(
        sum(j["cost"]["usd"] for j in every if j["model"] == "demo-image") / len(ok))
    assert 0 < img["utilization"] <= 1 and 0 <= st["overall"]["utilization"] <= 1
    assert img["idle_warm_s"] > 0 and img["idle_cost_usd"] == pytest.approx(img["idle_warm_s"] * OBS_PRICE_CPU / 3600)
    for model, mst in st["models"].items():  # every model's count is its terminal jobs in the records
        assert mst["count"] == sum(1 for j in every if j["model"] == model and j["status"] in
                                   ("succeeded", "failed", "canceled")), model
    for bad in ("abc", "0", "30d"):
        r = obs_client.get("/v1/stats", params={"window": bad})
        assert r.status_code == 400 and r.json()["error"]["field"] == "window"


def test_json_logs_carry_job_batch_worker_stage_and_timings(obs_client, obs_server):
    job = charged(obs_client, wait_for(obs_client, submit(obs_client, steps=2)["id"])["id"])
    lines = [json.loads(line) for line in obs_server.log_path.read_text().splitlines() if line.startswith("{")]
    mine = [e for e in lines if e.get("job_id") == job["id"]]
    stages = [e["stage"] for e in mine]
    assert stages[:2] == ["queued", "dispatched"] and "finished" in stages and "charged" in stages
    fin = next(e for e in mine if e["stage"] == "finished")
    assert fin["batch_id"] == job["batch"]["id"] and fin["worker"] == job["batch"]["worker"]
    assert fin["status"] == "succeeded" and fin["timings"]["total_s"] == pytest.approx(job["breakdown"]["total_s"], abs=1e-3)
    assert next(e for e in mine if e["stage"] == "charged")["device_seconds"] == pytest.approx(job["cost"]["device_seconds"])
