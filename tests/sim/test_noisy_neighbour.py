"""scenarios/noisy-neighbour, smaller: fair share keeps the trickle tenant's latency through a burst."""
from pathlib import Path

from genserve.sim.driver import simulate
from genserve.sim.report import summarize
from genserve.sim.scenario import load_scenario, variant

SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "noisy-neighbour" / "scenario.toml"


def test_fair_share_keeps_the_trickle_fast_and_changes_nothing_for_one_tenant():
    base = load_scenario(SCENARIO)
    small = {"sim": {"duration_s": 2400}, "workload": {"bursts": [dict(base.raw["workload"]["bursts"][0], count=200)]}}

    def p99(over):
        x = summarize(simulate(variant(base, {**small, **over})))
        return x["per_tenant"]["trickle"]["latency_s"]["p99"], x

    on, x_on = p99({})
    off, x_off = p99({"engine": {"fair_share": False}})
    assert on < 200 < 1000 < off  # with fair share, one running video at most ahead; without, the burst
    assert x_on["per_tenant"]["burst"]["completed"] == x_off["per_tenant"]["burst"]["completed"] == 200
    alone_on, a = p99({"workload": {"bursts": []}, "engine": {"fair_share": True}})
    alone_off, b = p99({"workload": {"bursts": []}, "engine": {"fair_share": False}})
    a.pop("wall_s", None), b.pop("wall_s", None)
    assert a == b  # one tenant: fair share decides exactly as FIFO
