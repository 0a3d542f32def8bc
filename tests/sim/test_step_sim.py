"""Step-level batching in the simulator: running sets advance step by step; short jobs leave
while long ones go on; every request finishes exactly once; on the same trace at request level a
short job waits for whole long batches on the device."""
from __future__ import annotations

import math

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
