"""Autoscaling policies on a fake timeline."""
from genserve.engine import BatchKey, Engine, ModelLimits, Priority, RetireWorker, ScaleTo
from genserve.engine.policies.autoscale import Autoscaler, FleetSnapshot, ScaleLimits, budget_cap

IMG = BatchKey("img", 64, 64, 0, 10, 1.0)  # work units = 64·64·10/1e6


class Run:
    """Threads the autoscaler's explicit state through successive decisions, as the engine does."""

    def __init__(self, autoscaler):
        self.a, self.state = autoscaler, autoscaler.initial_state()

    def decide(self, s):
        n, self.state = self.a.decide(s, self.state)
        return n

    @property
    def target(self):
        return self.state.target


def snap(now=0.0, up=1, pending=0, busy=0, queued=0.0, running=0.0, rate=0.0, warm=0):
    return FleetSnapshot(now, up, pending, busy, queued, running, rate, warm)


def test_queue_depth_scales_up_when_work_per_device_exceeds_threshold():
    a = Run(Autoscaler("queue_depth", ScaleLimits(0, 10), target_queue_s=30.0))
    assert a.decide(snap(up=2, busy=2, queued=50.0)) == 2  # 25 s per device: fine
    assert a.decide(snap(up=2, busy=2, queued=130.0)) == 5  # ceil(130 / 30)


def test_scale_down_waits_for_the_delay_and_keeps_the_peak_of_the_window():
    a = Run(Autoscaler("queue_depth", ScaleLimits(0, 10, scale_down_delay_s=60.0), target_queue_s=30.0))
    assert a.decide(snap(now=0, up=4, busy=4, queued=100.0)) == 4
    assert a.decide(snap(now=10, up=4, busy=1)) == 4  # nothing queued, 1 busy: wants 1, must wait
    assert a.decide(snap(now=40, up=4, busy=2)) == 4
    assert a.decide(snap(now=69, up=4, busy=1)) == 4
    assert a.decide(snap(now=70, up=4, busy=1)) == 2  # 60 s below; the highest wish meanwhile was 2
    # Scale up is immediate.
    assert a.decide(snap(now=71, up=2, busy=2, queued=200.0)) == 7


def test_budget_cap_and_bounds_are_respected():
    lim = ScaleLimits(1, 50, price_per_hour=2.6, budget_per_hour=20.0)
    assert budget_cap(lim) == 7
    a = Run(Autoscaler("queue_depth", lim, target_queue_s=1.0))
    assert a.decide(snap(up=1, queued=1000.0)) == 7
    a = Run(Autoscaler("headroom", ScaleLimits(2, 50)))
    assert a.decide(snap(up=2)) == 2  # min devices even with no demand


def test_headroom_keeps_spare_capacity():
    a = Run(Autoscaler("headroom", ScaleLimits(0, 100), headroom=0.2, horizon_s=60.0))
    assert a.decide(snap(up=10, busy=10, rate=10.0)) == 12  # 10 in use × 1.2
    assert a.decide(snap(up=12, busy=5, rate=4.0, queued=60.0)) == 12  # (5 + 1) × 1.2 = 7.2 -> wait for delay


def test_warm_pools_set_a_floor():
    a = Run(Autoscaler("queue_depth", ScaleLimits(0, 10)))
    assert a.decide(snap(up=0, warm=2)) == 2


def test_predictive_leads_a_periodic_load_by_the_provisioning_lag():
    period, lag = 3600.0, 120.0
    a = Run(Autoscaler("predictive", ScaleLimits(0, 100, scale_down_delay_s=0.0), lead_s=lag, period_s=period,
                   bucket_s=60.0, headroom=0.0))

    def load(t):  # 2 devices' worth of work, 10 during minutes 30-40 of each hour
        return 10.0 if 1800 <= t % period < 2400 else 2.0

    first_rise = None
    for t in range(0, int(3 * period), 60):
        n = a.decide(snap(now=float(t), up=a.target or 0, rate=load(float(t))))
        if t >= 2 * period and n >= 10 and first_rise is None:
            first_rise = t
    # In the third hour, capacity for the peak is wanted `lag` seconds before the peak starts.
    assert first_rise == 2 * period + 1800 - lag


def test_engine_emits_scale_decisions_and_retires_idle_workers():
    eng = Engine({"img": ModelLimits(4, 0.0, est_job_seconds=20.0)},
                 autoscaler=Autoscaler("queue_depth", ScaleLimits(0, 5, scale_down_delay_s=30.0, interval_s=5.0),
                                       target_queue_s=30.0))
    for i in range(6):
        eng.submit(f"j{i}", IMG, Priority.STANDARD, 0.0)
    # No devices at all (scale to zero): 120 s of queued work asks for 4.
    [scale] = [d for d in eng.step(0.0) if isinstance(d, ScaleTo)]
    assert scale.devices == 4
    assert eng.next_deadline(0.0) == 5.0
    for w in ("w0", "w1", "w2", "w3"):
        eng.worker_up(w, 3.0)
    decisions = eng.step(3.0)
    runs = [d for d in decisions if hasattr(d, "batch_id")]
    # The second batch does not wait ~80 s for the warm worker: a cold start (~10 s) is cheaper.
    assert sorted(len(r.job_ids) for r in runs) == [2, 4] and len({r.worker for r in runs}) == 2
    for d in decisions:
        if type(d).__name__ == "LoadModel":
            eng.model_loaded(d.worker, d.model, 0, 4.0)
    for r in runs:
        eng.batch_finished(r.batch_id, 10.0)
    retired = []
    t = 10.0
    while t < 60:
        retired += [d.worker for d in eng.step(t) if isinstance(d, RetireWorker)]
        t = eng.next_deadline(t)
    assert sorted(retired) == ["w0", "w1", "w2", "w3"] and eng.scaling.target_devices == 0
    # Work estimates are learned from the timed batches (7 s for 4 or 2 jobs), replacing the 20 s prior.
    assert 7.0 / 4 <= eng.job_work(IMG) <= 7.0 / 2


def test_a_retired_worker_is_forgotten_not_killed_for_silence():
    from genserve.engine import KillWorker, Liveness

    eng = Engine({"img": ModelLimits(idle_unload_s=None)}, liveness=Liveness(None, 60.0, None),
                 autoscaler=Autoscaler("queue_depth", ScaleLimits(1, 4, scale_down_delay_s=0, interval_s=5)))
    for w in ("w0", "w1"):
        eng.worker_up(w, 0.0, None)
    retired = [d.worker for d in eng.step(0.0) if isinstance(d, RetireWorker)]
    assert len(retired) == 1
    kept = next(iter(eng.workers))
    t = 0.0
    while t < 300:  # the kept worker keeps sending heartbeats; the retired one is gone for good
        t = eng.next_deadline(t)
        eng.worker_seen(kept, t)
        assert not any(isinstance(d, KillWorker) for d in eng.step(t))
    assert not eng.failures.killing


def test_a_lost_device_is_asked_for_again():
    eng = Engine({"img": ModelLimits()}, autoscaler=Autoscaler("queue_depth", ScaleLimits(2, 4, interval_s=5)))
    for w in ("d0", "d1"):
        eng.worker_up(w, 0.0)
    assert [d.devices for d in eng.step(0.0) if isinstance(d, ScaleTo)] == [2]
    eng.worker_down("d1", 1.0)  # crashed
    assert [d.devices for d in eng.step(5.0) if isinstance(d, ScaleTo)] == [2]  # the provider tops up again


def test_queue_depth_shrinks_when_a_short_queue_remains_from_batching_windows():
    a = Run(Autoscaler("queue_depth", ScaleLimits(0, 30, scale_down_delay_s=0.0), target_queue_s=30.0))
    assert a.decide(snap(now=0, up=20, busy=20, queued=700.0)) == 24
    # Load fell: 6 busy and a few seconds of work waiting for its batching window.
    assert a.decide(snap(now=10, up=24, busy=6, queued=5.0)) == 7


def test_scale_down_continues_as_higher_wishes_age_out_of_the_window():
    a = Run(Autoscaler("queue_depth", ScaleLimits(0, 20, scale_down_delay_s=100.0), target_queue_s=10.0))
    assert a.decide(snap(now=0, up=14, busy=14, queued=200.0)) == 20
    assert a.decide(snap(now=10, up=20, busy=8)) == 20  # wishes 8: the delay starts
    for t in range(20, 110, 10):
        a.decide(snap(now=float(t), up=20, busy=0))  # then nothing at all
    assert a.decide(snap(now=110, up=20, busy=0)) == 8   # 100 s below: the window's peak is the 8 at t=10…
    assert a.decide(snap(now=120, up=8, busy=0)) == 0    # …which ages out 10 s later, not a whole delay later


def test_decide_is_pure_state_in_state_out():
    a = Autoscaler("hybrid", ScaleLimits(0, 50, scale_down_delay_s=30.0), period_s=600.0, bucket_s=60.0)
    s0 = a.initial_state()
    n1, s1 = a.decide(snap(now=0, up=3, busy=3, queued=500.0, rate=4.0), s0)
    again, s1b = a.decide(snap(now=0, up=3, busy=3, queued=500.0, rate=4.0), s0)
    assert (n1, s1) == (again, s1b)  # same snapshot and state: same answer
    assert s0 == a.initial_state() and s0.target is None and not s0.wishes  # the input state was not mutated
    assert s1.target == n1 and s1.wishes == ((0, n1),) and s1.policy != s0.policy  # the profile learned a reading


def test_a_scale_down_cancels_a_pending_worker_before_retiring_idle_ones():
    # issue 22.7: 3 device slots, max 4 workers: scale-down retired two idle up workers while the 4th,
    # still pending, then took a freed slot, cold-started and was retired 3.5 s later.
    eng = Engine({"img": ModelLimits()}, autoscaler=Autoscaler("queue_depth", ScaleLimits(1, 4, scale_down_delay_s=0,
                                                                                          interval_s=5)))
    for w in ("w0", "w1", "w2", "w3"):
        eng.worker_starting(w)
    for w in ("w0", "w1", "w2"):
        eng.worker_up(w, 0.0)
    retired = [d.worker for d in eng.step(0.0) if isinstance(d, RetireWorker)]
    assert retired[0] == "w3" and len(retired) == 3  # 3 up + 1 pending, want 1: the pending one first
    assert set(eng.workers) | set(retired) == {"w0", "w1", "w2", "w3"} and len(eng.workers) == 1
