"""Percentiles, breakdowns, window stats and time series over hand-made job records."""
import pytest

from genserve.server.observe.stats import breakdown, percentile, queue_depth_at, summarize, timeseries, window_stats
from genserve.server.observe.usage import UsageLedger


def job(i, model="img", status="succeeded", t0=100.0, wait=1.0, load=0.0, infer=2.0, write=0.1, batch="b1",
        size=1, code=None, dev=None, cost=None):
    t_disp = t0 + wait
    t_inf = t_disp + load
    r = {"id": f"j{i}", "model": model, "status": status, "error_code": code, "batch_id": batch, "batch_size": size,
         "t_received": t0, "t_queued": t0, "t_dispatched": t_disp,
         "t_load_start": t_disp if load else None, "t_load_end": t_disp + load if load else None,
         "t_inference_start": t_inf, "t_inference_end": t_inf + infer, "t_output_written": t_inf + infer + write,
         "t_finished": t_inf + infer + write, "device_seconds": dev, "cost_usd": cost}
    return r


def test_percentile_linear_interpolation():
    assert percentile([], 50) is None
    assert percentile([5.0], 99.9) == 5.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    xs = list(range(1, 101))  # 1..100
    assert percentile(xs, 95) == pytest.approx(95.05) and percentile(xs, 99.9) == pytest.approx(99.901)
    s = summarize([3.0, 1.0, 2.0])
    assert s["count"] == 3 and s["p50"] == 2.0 and s["max"] == 3.0 and s["mean"] == 2.0


def test_breakdown_of_a_cold_job():
    b = breakdown(job(1, wait=0.5, load=3.0, infer=2.0, write=0.25))
    assert b.pop("downtime") is None  # it ran and was reported: no downtime
    assert b == pytest.approx({"queue_wait": 0.5, "cold_start": 3.0, "inference": 2.0, "output_write": 0.25,
                               "total": 5.75})
    assert breakdown({"t_received": 1.0})["total"] is None


def test_window_stats_per_model_matches_records():
    recs = [job(i, wait=i * 0.1, infer=1.0, batch=f"b{i // 2}", size=2, dev=0.5, cost=0.001) for i in range(10)]
    for r in recs[:2]:  # batch b0 waited for a model load
        r.update(t_load_start=100.0, t_load_end=100.5)
    recs.append(job(10, status="failed", code="out_of_memory", batch="bx", dev=1.0, cost=0.002))
    recs.append(job(11, model="vid", infer=4.0, batch="bv", dev=4.0, cost=0.01))
    recs.append(job(12, t0=10.0))  # finished long before the window
    led = UsageLedger()
    led.worker_up("w0", "cpu", 90.0)
    led.resident("w0", {"img"}, 90.0)
    st = window_stats(recs, 95.0, 125.0, n_workers=1, usage=led.window(95.0, 125.0), prices={"cpu": 3600.0},
                      models=["img", "vid", "unused"])
    img = st["models"]["img"]
    assert img["count"] == 11 and img["by_status"] == {"succeeded": 10, "failed": 1, "canceled": 0}
    totals = [breakdown(r)["total"] for r in recs[:10]]
    assert img["latency_s"]["p50"] == pytest.approx(percentile(totals, 50))
    assert img["latency_s"]["p99"] == pytest.approx(percentile(totals, 99))
    assert img["stages_s"]["queue_wait"]["max"] == pytest.approx(0.9)
    assert img["failure_rate"] == pytest.approx(1 / 11)
    assert img["failures_by_code"] == {"out_of_memory": {"count": 1, "rate": pytest.approx(1 / 11)}}
    assert img["cold_starts"] == 1 and img["cold_start_rate"] == pytest.approx(2 / 11)
    assert img["batches"] == 6 and img["mean_batch_size"] == pytest.approx((5 * 2 + 1) / 6)
    assert img["device_seconds"] == pytest.approx(6.0) and img["utilization"] == pytest.approx(6.0 / 30)
    assert img["cost_per_inference_usd"] == pytest.approx(0.012 / 10)
    assert img["throughput_per_s"] == pytest.approx(10 / 30)
    # The worker sat warm with img for the whole window (the ledger knows nothing of these batches).
    assert img["idle_warm_s"] == pytest.approx(30.0) and img["idle_cost_usd"] == pytest.approx(30.0)
    assert st["models"]["vid"]["count"] == 1 and st["models"]["unused"]["count"] == 0
    assert st["models"]["unused"]["latency_s"]["p50"] is None
    assert st["overall"]["count"] == 12 and st["overall"]["idle_cost_usd"] == pytest.approx(30.0)


def test_queue_depth_from_timestamps():
    recs = [job(1, t0=0.0, wait=5.0), job(2, t0=2.0, wait=1.0),
            {"id": "c", "model": "img", "status": "canceled", "t_queued": 1.0, "t_dispatched": None, "t_finished": 4.0},
            {"id": "q", "model": "img", "status": "queued", "t_queued": 3.5, "t_dispatched": None, "t_finished": None}]
    assert [queue_depth_at(recs, t) for t in (0.5, 1.5, 2.5, 3.6, 4.5, 6.0)] == [1, 2, 3, 3, 2, 1]


def test_timeseries_buckets():
    recs = [job(i, t0=100.0 + i, wait=0.0, infer=0.5, write=0.0, batch=f"b{i}", cost=0.01) for i in range(6)]
    recs[4].update(status="failed")
    recs[0].update(t_load_start=100.0, t_load_end=100.1)
    pts = timeseries(recs, 100.0, 106.0, 2.0, utilization=[0.5, None, 1.0])
    assert [p["t"] for p in pts] == [102.0, 104.0, 106.0]
    assert [p["completed"] for p in pts] == [2, 2, 2]
    assert pts[0]["throughput_per_s"] == pytest.approx(1.0) and pts[2]["throughput_per_s"] == pytest.approx(0.5)
    assert pts[2]["failure_rate"] == pytest.approx(0.5) and pts[0]["failure_rate"] == 0.0
    assert [p["cold_starts"] for p in pts] == [1, 0, 0]
    assert pts[0]["latency_p50_s"] == pytest.approx(0.5) and pts[2]["cost_per_inference_usd"] == pytest.approx(0.02)
    assert [p["utilization"] for p in pts] == [0.5, None, 1.0]
