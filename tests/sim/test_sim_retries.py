"""The simulator keeps going while jobs wait out a retry backoff (none is left unfinished)."""
import math

from genserve.sim.driver import Simulator
from genserve.sim.scenario import parse_scenario


def test_jobs_waiting_to_be_retried_are_not_dropped_at_the_end():
    for seed in range(8):
        raw = {"sim": {"seed": seed, "duration_s": 600},
               "fleet": {"initial": 2, "crash_rate_per_hour": 120, "provisioning_s": 5},
               "models": {"m": {"t1_s": 20.0, "max_batch_size": 1}},
               "workload": {"rate_per_s": 0.05, "max_requests": 20, "mix": [{"model": "m"}]},
               "engine": {"max_attempts": 5}}
        r = Simulator(parse_scenario(raw)).run()
        assert len(r.jobs) == 20
        assert all(not math.isnan(j.finished) for j in r.jobs), seed  # each finished or failed with a code
        assert any(j.retries for j in r.jobs)  # crashes did happen and were retried


def test_the_initial_fleet_is_up_before_the_autoscaler_first_decides():
    raw = {"sim": {"seed": 1, "duration_s": 60},
           "fleet": {"initial": 8, "provisioning_s": 60,
                     "autoscale": {"policy": "queue_depth", "min_devices": 1, "max_devices": 8,
                                   "scale_down_delay_s": 300}},
           "models": {"m": {"t1_s": 5.0}},
           "workload": {"rate_per_s": 1.0, "mix": [{"model": "m"}]}}
    r = Simulator(parse_scenario(raw)).run()
    assert r.samples[0][2] + r.samples[0][3] + r.samples[0][4] == 8  # all 8 up at t=0
    assert all(d.ready_at == 0.0 for d in r.devices[:8])
    assert not any(t < 300 and n < 8 for t, n, _ in r.scale_decisions)  # none cancelled at start
