"""Step-level batching in the simulator: running sets advance step by step; short jobs leave
while long ones go on; every request finishes exactly once; on the same trace at request level a
short job waits for whole long batches on the device."""
from __future__ import annotations

import math

import pytest

from genserve.config.errors import ConfigError
from genserve.sim.driver import simulate
from genserve.sim.scenario import parse_scenario, variant

MIXED = {
    "sim": {"name": "steps", "seed": 3, "duration_s": 900, "slo_s": 60},
    "fleet": {"initial": 1, "provisioning_s": 0, "memory_gb": 80, "price_per_hour": 2.0},
    "models": {"img": {"weights_gb": 13, "working_gb": 3, "t1_s": 4.0, "batch_curve": {"2": 1.1, "4": 1.3},
                       "load_disk_s": 0, "max_batch_size": 4, "max_wait_ms": 500, "ref_steps": 28,
                       "idle_unload_s": "never"}},
    "workload": {"rate_per_s": 0.35, "mix": [{"model": "img", "weight": 0.5, "steps": 28},
                                              {"model": "img", "weight": 0.5, "steps": 4}]},
}


def run(batching: str):
    return simulate(variant(parse_scenario(MIXED), {"models": {"img": {"batching": batching}}}))


def test_every_request_finishes_once_and_short_jobs_do_not_wait_for_long_ones():
    req, step = run("request"), run("step")
    for r in (req, step):
        assert r.jobs and all(not j.failed and not math.isnan(j.finished) for j in r.jobs)
    assert len(req.jobs) == len(step.jobs)

    def short_p50(r):
        lat = sorted(j.finished - j.arrival for j in r.jobs if j.steps == 4)
        return lat[len(lat) // 2]

    # a 4-step job takes 4/28 of a 28-step one: at request level it waits for the device to finish a
    # whole 28-step batch; in step mode it joins the running set at the next step
    assert short_p50(step) < 0.7 * short_p50(req)
    # joins happened: some jobs entered a set that was already running
    assert max(j.batch_size for j in step.jobs) > 1


LONE = {
    "sim": {"name": "cost", "seed": 1, "duration_s": 100, "slo_s": 60},
    "fleet": {"initial": 1, "provisioning_s": 0, "memory_gb": 80, "price_per_hour": 2.0},
    "models": {"img": {"weights_gb": 1, "working_gb": 1, "t1_s": 2.0, "job_overhead_s": 0.5,
                       "batch_curve": {"2": 1.5}, "load_disk_s": 0, "max_batch_size": 2, "max_wait_ms": 100,
                       "ref_steps": 10, "ref_width": 64, "ref_height": 64, "idle_unload_s": "never"}},
    "workload": {"bursts": [{"at_s": 1, "count": 2, "over_s": 0, "model": "img",
                                               "width": 64, "height": 64, "steps": 10}]},
}


def two_jobs(batching: str, **model):
    r = simulate(variant(parse_scenario(LONE), {"models": {"img": {"batching": batching, **model}}}))
    assert len(r.jobs) == 2 and all(not j.failed for j in r.jobs)
    return sorted(j.finished - j.arrival for j in r.jobs)


def test_the_per_job_fixed_cost_is_paid_once_per_job_and_the_curve_covers_only_the_steps():
    # one full batch of 2 at once: 2 × 0.5 s fixed + 10 steps × (1.5 s / 10) × f(2)
    assert two_jobs("request") == pytest.approx([3.25, 3.25])
    # without the split, the whole batch follows the curve: 2.0 × f(2)
    assert two_jobs("request", job_overhead_s=0.0) == pytest.approx([3.0, 3.0])
    # step level, no window: the first job sets up (0.5) and steps alone (0.15); the second sets up
    # at that boundary (0.5) and joins a step of 2 (0.225); 8 more steps of 2 finish the first; the
    # second's last step runs alone: each job's fixed cost once, not once per step
    assert two_jobs("step") == pytest.approx([0.65 + 0.725 + 1.8, 0.65 + 0.725 + 1.8 + 0.15])


def test_a_fixed_cost_not_below_t1_is_refused():
    with pytest.raises(ConfigError, match="job_overhead_s"):
        variant(parse_scenario(LONE), {"models": {"img": {"job_overhead_s": 2.0}}})
