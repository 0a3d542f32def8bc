"""Bench workloads and reports: pure, no server."""
import pytest

from genserve.bench.report import compare, summarize_run, table
from genserve.bench.workload import (
    Arrival, Workload, WorkloadError, arrival_offsets, draw, load_workload, parse_workload,
)


def test_draw_follows_weights_and_is_deterministic():
    w = parse_workload({"requests": [{"model": "a", "weight": 3, "size": "64x64"}, {"model": "b", "weight": 1}]})
    reqs = draw(w, 400, seed=1)
    assert reqs == draw(w, 400, seed=1) and reqs != draw(w, 400, seed=2)
    share_a = sum(r["model"] == "a" for r in reqs) / 400
    assert 0.68 < share_a < 0.82
    assert len({r["prompt"] for r in reqs}) == 400 and all("weight" not in r for r in reqs)
    # Each request carries its own kind's keys: a's size, nothing for b (which names no size).
    assert all(r["size"] == "64x64" if r["model"] == "a" else "size" not in r for r in reqs)


def test_arrival_patterns():
    assert arrival_offsets(Arrival("closed"), 5) is None
    assert arrival_offsets(Arrival("rate", rate=4.0), 3) == [0.0, 0.25, 0.5]
    assert arrival_offsets(Arrival("bursts", burst_size=2, burst_interval_s=3.0), 5) == [0, 0, 3, 3, 6]
    p = arrival_offsets(Arrival("poisson", rate=10.0), 2000, seed=3)
    assert p == sorted(p) and p[-1] / 2000 == pytest.approx(0.1, rel=0.1)  # mean gap 1/rate


def test_workload_errors_and_files(tmp_path):
    for bad in ({"arrival": {"pattern": "zigzag"}}, {"arrival": {"speed": 1}}, {"requests": [{"weight": 1}]},
                {"requests": [{"model": "a", "weight": 0}]}, {"extra": {}}):
        with pytest.raises(WorkloadError):
            parse_workload(bad)
    f = tmp_path / "w.toml"
    f.write_text('[arrival]\npattern = "poisson"\nrate = 3.0\n[[requests]]\nmodel = "m"\nsteps = 2\n')
    w = load_workload(f).with_arrival(rate=5.0, concurrency=None)
    assert w.arrival == Arrival("poisson", rate=5.0) and w.requests[0]["model"] == "m"
    assert load_workload(None) == Workload()
    with pytest.raises(WorkloadError):
        Workload().with_arrival(concurrency=0)


def req(i, model="a", ok=True, latency=1.0, done=None, cost=None, stages=None):
    r = {"i": i, "model": model, "ok": ok, "latency_s": latency, "t_sent": 0.0, "t_done": done or latency,
         "error": None if ok else "http_429"}
    if stages:
        r.update(breakdown=stages, batch_id=f"b{i // 2}", batch_size=2 if i < 2 else 1, device_seconds=0.5,
                 cost_usd=cost)
    return r


def test_summary_tables_and_compare():
    stages = {"queue_wait_s": 0.1, "cold_start_s": None, "inference_s": 0.5, "output_write_s": 0.01, "total_s": 0.7}
    rs = [req(i, latency=float(i + 1), cost=0.01, stages=stages) for i in range(4)] + [req(9, "b", ok=False)]
    s = summarize_run(rs, duration_s=2.0)
    assert (s["count"], s["ok"], s["errors"]) == (5, 4, 1) and s["errors_by_kind"] == {"http_429": 1}
    assert s["throughput_per_s"] == 2.0 and s["latency_s"]["p50"] == 2.5
    assert s["mean_batch_size"] == pytest.approx((2 + 1) / 2)  # batches b0 (2 jobs) and b1 (size 1 as recorded)
    assert s["cost_per_inference_usd"] == pytest.approx(0.01) and s["stages_s"]["inference"]["p99"] == 0.5
    assert s["stages_s"]["cold_start"]["count"] == 0 and s["per_model"]["b"]["ok"] == 0
    result = {"target": {"url": "http://x"}, "label": "x", "summary": s}
    t = table(result)
    assert "| a | 4 | 4 | 0 | 2.00 | 2.500 |" in t and "| inference |" in t and "http_429 × 1" in t
    other = {"target": {"url": "http://y"}, "label": None,
             "summary": summarize_run([req(i, latency=2.0 * (i + 1)) for i in range(4)], duration_s=4.0)}
    c = compare(result, other)
    assert "| P50 (s) | 2.500 | 5.000 | 2.00× |" in c and "B: http://y" in c
    assert "| cost / inference ($) | 0.010 | – | – |" in c
