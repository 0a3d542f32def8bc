"""The simulator: determinism, conservation of jobs, cost accounting, autoscaling under a burst,
scenario validation, the CLI, and every shipped scenario. No torch, no event loop."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from genserve.config.load import ConfigError
from genserve.engine import ErrorCode
from genserve.sim.driver import simulate
from genserve.sim.report import summarize
from genserve.sim.scenario import deep_merge, load_scenario, parse_scenario, variant

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "scenarios").glob("*/scenario.toml"))
# What a simulated job's ``failed`` can say: an engine error code, or why admission turned it away.
FAILURE_CODES = {c.value for c in ErrorCode} | {"queue_full", "unknown_model"}

TINY = {
    "sim": {"name": "tiny", "seed": 1, "duration_s": 600, "slo_s": 30},
    "fleet": {"initial": 2, "provisioning_s": 30, "memory_gb": 80, "price_per_hour": 2.0},
    "models": {
        "img": {"weights_gb": 13, "working_gb": 3, "t1_s": 4.0, "batch_curve": {"2": 1.1, "4": 1.3},
                "load_disk_s": 12, "max_batch_size": 4, "max_wait_ms": 500, "ref_steps": 28},
        "vid": {"kind": "video", "weights_gb": 60, "working_gb": 12, "t1_s": 60.0, "load_disk_s": 45,
                "max_batch_size": 1, "ref_width": 1280, "ref_height": 720, "ref_frames": 121, "ref_steps": 50},
    },
    "workload": {"rate_per_s": 0.3, "mix": [
        {"model": "img", "weight": 0.9, "steps": 28},
        {"model": "vid", "weight": 0.1, "width": 1280, "height": 720, "num_frames": 121, "steps": 50},
    ]},
}

TINY_TOML = """
[sim]
name = "tiny"
seed = 1
duration_s = 300
[fleet]
initial = 1
[models.img]
t1_s = 2.0
max_batch_size = 2
[workload]
rate_per_s = 0.2
[[workload.mix]]
model = "img"
[[compare]]
name = "no batching"
models.img.max_batch_size = 1
"""


def run(over: dict | None = None):
    return simulate(parse_scenario(deep_merge(TINY, over or {})))


def test_same_seed_same_summary_different_seed_differs():
    a, b = summarize(run()), summarize(run())
    assert a == b
    c = summarize(run({"sim": {"seed": 2}}))
    assert c["requests"] != a["requests"] or c["overall"]["latency_s"] != a["overall"]["latency_s"]


def test_no_job_lost_even_with_crashes_and_full_queues():
    r = run({"fleet": {"crash_rate_per_hour": 6.0}, "models": {"img": {"max_queue": 5}},
             "workload": {"rate_per_s": 1.0}})
    assert r.jobs
    for j in r.jobs:
        assert not math.isnan(j.finished), j  # every job reached an end
        if j.failed:
            assert j.failed in FAILURE_CODES, j  # ...and a failure carries a known code
    x = summarize(r)
    assert x["failed"] > 0  # the small queue rejected some: the test exercises both paths
    assert x["overall"]["completed"] + x["failed"] == x["requests"] == len(r.jobs)


def test_cost_is_device_hours_times_price():
    r = run()
    x = summarize(r)
    billed = sum(d.retired - d.started for d in r.devices)
    assert x["device_hours"] == pytest.approx(billed / 3600)
    assert x["cost_total"] == pytest.approx(x["device_hours"] * 2.0)
    # A fixed fleet is billed for its whole life: initial devices × the makespan.
    assert x["device_hours"] == pytest.approx(2 * r.end / 3600)
    assert x["cost_per_inference"] == pytest.approx(x["cost_total"] / x["overall"]["completed"])


def test_burst_scales_up_and_back_down():
    over = {"fleet": {"initial": 2, "autoscale": {"policy": "queue_depth", "min_devices": 2, "max_devices": 20,
                                                  "target_queue_s": 30, "scale_down_delay_s": 60}},
            "workload": {"rate_per_s": 0.05, "mix": [{"model": "img", "steps": 28}],
                         "bursts": [{"model": "img", "at_s": 60, "count": 300, "over_s": 10, "steps": 28}]},
            "sim": {"duration_s": 1800}}
    r = run(over)
    targets = [n for _, n, _ in r.scale_decisions]
    assert max(targets) > 2  # scaled up for the burst...
    assert targets[-1] < max(targets)  # ...and back down after it
    assert summarize(r)["peak_devices"] > 2
    assert all(not j.failed for j in r.jobs)


@pytest.mark.parametrize("over, key", [
    ({"workload": {"mix": [{"model": "nope"}]}}, "workload.mix[0].model"),
    ({"workload": {"bursts": [{"model": "img", "count": 3}]}}, "workload.bursts[0].at_s"),
    ({"models": {"img": {"t1_s": "fast"}}}, "models.img.t1_s"),
    ({"models": {"img": {"batch_curve": {"0": 1.0}}}}, "models.img.batch_curve.0"),
    ({"fleet": {"autoscale": {"policy": "magic"}}}, "fleet.autoscale.policy"),
    ({"workload": {"kind": "trace"}}, "workload.trace"),
    ({"workload": {"profile": "monthly"}}, "workload.profile"),
])
def test_validation_errors_name_the_key(over, key):
    with pytest.raises(ConfigError) as e:
        parse_scenario(deep_merge(TINY, over))
    assert e.value.key == key


def test_cli_table_and_json(tmp_path):
    sc = tmp_path / "tiny.toml"
    sc.write_text(TINY_TOML)
    out = tmp_path / "out.json"
    p = subprocess.run([sys.executable, "-m", "genserve.cli", "simulate", str(sc), "--compare", "--json", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "| metric | base | no batching |" in p.stdout
    assert "| P99 latency (s) |" in p.stdout
    data = json.loads(out.read_text())
    assert set(data) == {"base", "no batching"}
    assert data["base"]["requests"] == data["no batching"]["requests"] > 0
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_TOML.replace('model = "img"', 'model = "nope"'))
    p = subprocess.run([sys.executable, "-m", "genserve.cli", "simulate", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "workload.mix[0].model" in p.stderr


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.parent.name for p in SCENARIOS])
def test_shipped_scenarios_run(path):
    base = load_scenario(path)
    base = parse_scenario(deep_merge(base.raw, {"workload": {"max_requests": 200}}), base.base)
    for sc in [base] + [variant(base, over) for _, over in base.compare]:
        x = summarize(simulate(sc))
        assert 0 < x["requests"] <= 200
        assert x["overall"]["completed"] + x["failed"] == x["requests"]


def test_scenarios_have_a_readme():
    assert SCENARIOS, "no scenarios found"
    for p in SCENARIOS:
        assert (p.parent / "README.md").exists(), p.parent
