"""Friday 16:00–22:00 figures for the friday-evening scenario: latency of the jobs arriving then and the
mean number of ready devices hour by hour (run from the repository root)."""
import sys, math
from genserve.sim.scenario import load_scenario, variant
from genserve.sim.driver import simulate
from genserve.sim.report import percentile
s = load_scenario("scenarios/friday-evening/scenario.toml")
runs = [("queue_depth", s)] + [(n, variant(s, o)) for n, o in s.compare]
fri = 4 * 86400
for name, sc in runs:
    r = simulate(sc)
    w = [j for j in r.jobs if fri + 16*3600 <= j.arrival < fri + 22*3600 and not j.failed]
    lat = sorted(j.finished - j.arrival for j in w)
    def devs_at(h):
        t = fri + h*3600
        return sum(1 for d in r.devices if d.started <= t < d.retired)
    def ready_at(h):
        t = fri + h*3600
        return sum(1 for d in r.devices if d.ready_at <= t < d.retired)
    def mean_ready(h0, h1):
        a, b = fri + h0*3600, fri + h1*3600
        return sum(max(0.0, min(b, d.retired) - max(a, d.ready_at)) for d in r.devices) / (b - a)
    print(name, "mean ready devices Fri 16-17h %.1f 17-18h %.1f 18-19h %.1f 19-20h %.1f" % tuple(mean_ready(h, h+1) for h in (16,17,18,19)))
    print(f"{name}: Fri 16-22h jobs={len(w)} p50={percentile(lat,50):.1f} p99={percentile(lat,99):.1f} slo={sum(x<=sc.slo_s for x in lat)/len(lat):.3f} "
          f"ready devices @16h={ready_at(16)} @17h={ready_at(17)} @18h={ready_at(18)} @19h={ready_at(19)} @20h={ready_at(20)}")
