"""Residency with real worker processes: 2 CPU workers whose budgets fit one demo model each."""
import time

import httpx
import pytest

from genserve.bench.live import LiveServer, wait_for, wait_until

pytestmark = pytest.mark.slow

# One demo image model weighs ~4.8 MB and the SD family estimates a 64x64 job's working memory at
# ~2.4 MB: 8 MiB holds one model and one job, never two models.
BUDGET_GB = 8 / 1024


def model(name, models, **extra):
    lines = [f"[models.{name}]", 'kind = "image"', f'source = "{models / "demo-image"}"', "max_batch_size = 2",
             "max_wait_ms = 0", 'sizes = ["64x64"]', "default_steps = 2", "default_guidance = 1.0"]
    lines += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def workers(c):
    return {w["id"]: w for w in c.get("/v1/workers").json()["data"]}


def test_cycling_three_models_over_two_small_workers_evicts_lru(demo_models, tmp_path):
    cfg = f"[server]\nworker_memory_gb = {BUDGET_GB}\nidle_unload_s = \"never\"\n\n" + "".join(
        model(n, demo_models) for n in ("m-a", "m-b", "m-c"))
    with LiveServer(tmp_path, cfg, workers=2) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        ws = workers(c)
        assert [w["capacity_bytes"] for w in ws.values()] == [8 << 20] * 2
        order = ["m-a", "m-b", "m-c"] * 3
        jobs = []
        for i, m in enumerate(order):
            jid = c.post("/v1/jobs", json={"model": m, "prompt": f"cycle {i}", "seed": i}).json()["id"]
            jobs.append(wait_for(c, jid))
            for w in workers(c).values():
                assert w["used_bytes"] <= w["capacity_bytes"], w  # never over budget by planning
                assert len([r for r in w["resident_models"] if not r["loading"]]) <= 1
        assert [j["status"] for j in jobs] == ["succeeded"] * len(order)
        # Two workers, three models, round robin: every job after the first two waits for a load.
        assert all(j["cold_start"]["waited"] for j in jobs)
        assert all(j["cold_start"]["tier"] in ("disk", "page_cache") and j["cold_start"]["seconds"] > 0 for j in jobs)
        changes = c.get("/v1/workers").json()["recent_residency_changes"]
        evicted = [e["model"] for e in changes if e["action"] == "unload"]
        assert all(e["reason"] == "lru" for e in changes if e["action"] == "unload")
        # The least recently used model goes each time: a, b, c, a, …
        assert evicted == [order[i % 3] for i in range(len(order) - 2)]
        loads = [e for e in changes if e["action"] == "load"]
        assert len(loads) == len(order) and all(e["bytes"] > 4_000_000 for e in loads)


def test_warm_pool_idle_unload_and_operator_controls(demo_models, tmp_path):
    cfg = (f"[server]\nworker_memory_gb = {BUDGET_GB}\nidle_unload_s = 1.5\n\n"
           + model("warm", demo_models, min_warm=1) + model("cold", demo_models))
    with LiveServer(tmp_path, cfg, workers=2) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        # The warm-pool model is loaded at start-up without any request.
        def warm_loaded():
            res = [r for w in workers(c).values() for r in w["resident_models"] if r["model"] == "warm"]
            return res if res and not res[0]["loading"] else None
        [warm] = wait_until(warm_loaded, what="warm pool load")
        assert warm["warm_pool"] and warm["bytes"] > 4_000_000
        job = wait_for(c, c.post("/v1/jobs", json={"model": "cold", "prompt": "x"}).json()["id"])
        assert job["status"] == "succeeded" and job["cold_start"]["waited"]
        cold_worker = job["batch"]["worker"]
        assert workers(c)[cold_worker]["reported_used_bytes"] > 4_000_000
        # 1.5 s after its last use the idle model is unloaded, and the worker's own report agrees.
        def unloaded():
            w = workers(c)[cold_worker]
            return w if not w["resident_models"] and w["reported_used_bytes"] == 0 else None
        w = wait_until(unloaded, timeout=30, what="idle unload")
        assert w["used_bytes"] == 0
        # A deliberate sleep: proving the warm-pool model is NOT unloaded needs time to pass, here
        # well past idle_unload_s (1.5 s) again after the cold model's unload; no event to wait on.
        time.sleep(2.0)
        assert [r["model"] for ws in workers(c).values() for r in ws["resident_models"]] == ["warm"]
        # Operators can load and unload by hand.
        r = c.post("/v1/models/cold/load", json={"worker": cold_worker})
        assert r.status_code == 202 and r.json()["loading_on"] == [cold_worker]
        wait_until(lambda: any(m["model"] == "cold" and not m["loading"]
                               for m in workers(c)[cold_worker]["resident_models"]), what="operator load")
        r = c.post("/v1/models/cold/unload")
        assert r.status_code == 200 and r.json()["unloaded_from"] == [cold_worker]
        assert c.post("/v1/models/nope/load").status_code == 404
        assert c.post("/v1/models/cold/load", json={"worker": "w9"}).status_code == 404
