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
