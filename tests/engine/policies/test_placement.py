"""WarmFirst placement (engine/policies/placement.py) on hand-built worker states: which worker gets a batch,
or None ("not yet"). No engine: utilization, evictions, waits and load times are given directly."""

from genserve.engine.policies.placement import PLACEMENT, WarmFirst
from genserve.engine.types import Resident, WorkerState

M = "m"


def worker(id, *, resident=(), busy=False, batches_run=0, capacity=None, last_used=None):
    """``resident``: model names, or (name, last_used) pairs."""
    w = WorkerState(id, capacity, batches_run=batches_run)
    for r in resident:
        name, used = (r, 0.0) if isinstance(r, str) else r
        w.resident[name] = Resident(10, used, loading=False)
    if busy:
        w.batch_id = f"batch-on-{id}"
    return w


def choose(workers, *, util=None, evict=None, backlog=1, wait=None, load_s=float("inf"), saturation=0.9,
           model=M):
    """``util``/``evict``/``wait``: per worker id (defaults: 0.0 / [] / 0.0)."""
    util, evict, wait = util or {}, evict or {}, wait or {}
    chosen = WarmFirst(saturation).choose(
        model, workers, lambda w: evict.get(w.id, []), lambda w: util.get(w.id, 0.0), backlog,
        lambda w: wait.get(w.id, 0.0), load_s)
    return None if chosen is None else chosen.id


def test_registered_by_name():
    assert PLACEMENT["warm-first"] is WarmFirst and WarmFirst.name == "warm-first"


# ---- a free warm worker ------------------------------------------------------------------------------


def test_free_warm_worker_beats_an_emptier_cold_one():
    ws = [worker("cold"), worker("warm", resident=[M, "other"], batches_run=50)]
    assert choose(ws, util={"warm": 0.8}) == "warm"


def test_among_free_warm_workers_least_utilization_wins():
    ws = [worker("w0", resident=[M]), worker("w1", resident=[M]), worker("w2", resident=[M])]
    assert choose(ws, util={"w0": 0.5, "w1": 0.2, "w2": 0.3}) == "w1"


def test_utilization_tie_goes_to_fewer_batches_run_then_to_the_id():
    ws = [worker("w2", resident=[M], batches_run=3), worker("w1", resident=[M], batches_run=7),
          worker("w0", resident=[M], batches_run=3)]
    assert choose(ws) == "w0"
    assert choose(ws[:2]) == "w2"
    assert choose(ws[:2], util={"w2": 0.1}) == "w1"  # utilization comes before batches run


def test_busy_warm_worker_is_not_free():
    ws = [worker("busy", resident=[M], busy=True), worker("idle", resident=[M])]
    assert choose(ws, util={"idle": 0.99}) == "idle"


def test_warm_worker_without_room_to_run_is_not_free():
    # Resident and idle, but the working memory cannot be made to fit: another warm worker is taken
    # even though it is more loaded.
    ws = [worker("warm", resident=[M]), worker("warm2", resident=[M]), worker("cold")]
    assert choose(ws, evict={"warm": None}, util={"warm2": 0.95}) == "warm2"


def test_idle_warm_worker_without_room_does_not_block_a_cold_start():
    ws = [worker("warm", resident=[M]), worker("cold")]
    assert choose(ws, evict={"warm": None}) == "cold"


# ---- busy warm workers: wait or cold start ------------------------------------------------------------


def test_busy_warm_worker_not_saturated_means_wait_no_cold_start():
    ws = [worker("warm", resident=[M], busy=True), worker("cold")]
    assert choose(ws, util={"warm": 0.5}) is None


def test_saturated_by_utilization_loads_on_a_free_worker():
    ws = [worker("warm", resident=[M], busy=True), worker("cold")]
    assert choose(ws, util={"warm": 0.95}) == "cold"
    assert choose(ws, util={"warm": 0.9}) == "cold"  # the threshold itself counts as saturated
    assert choose(ws, util={"warm": 0.89}) is None
    assert choose(ws, util={"warm": 0.6}, saturation=0.5) == "cold"


def test_every_warm_worker_must_be_saturated():
    ws = [worker("w0", resident=[M], busy=True), worker("w1", resident=[M], busy=True), worker("cold")]
    assert choose(ws, util={"w0": 0.95, "w1": 0.5}) is None
    assert choose(ws, util={"w0": 0.95, "w1": 0.91}) == "cold"


def test_saturated_by_backlog_beyond_one_batch_per_warm_worker():
    ws = [worker("warm", resident=[M], busy=True), worker("cold")]
    assert choose(ws, backlog=1) is None  # one batch can wait behind the running one
    assert choose(ws, backlog=2) == "cold"  # more cannot
    ws2 = [worker("w0", resident=[M], busy=True), worker("w1", resident=[M], busy=True), worker("cold")]
    assert choose(ws2, backlog=2) is None
    assert choose(ws2, backlog=3) == "cold"


def test_saturated_when_waiting_for_a_warm_worker_takes_longer_than_a_load():
    ws = [worker("warm", resident=[M], busy=True), worker("cold")]
    assert choose(ws, wait={"warm": 20.0}, load_s=10.0) == "cold"
    assert choose(ws, wait={"warm": 10.0}, load_s=10.0) is None  # equal: waiting is no worse
    assert choose(ws, wait={"warm": 20.0}) is None  # no load time known: never worth it


def test_wait_uses_the_soonest_free_warm_worker():
    ws = [worker("w0", resident=[M], busy=True), worker("w1", resident=[M], busy=True), worker("cold")]
    assert choose(ws, backlog=1, wait={"w0": 30.0, "w1": 2.0}, load_s=10.0) is None
    assert choose(ws, backlog=1, wait={"w0": 30.0, "w1": 12.0}, load_s=10.0) == "cold"


def test_saturated_but_no_free_worker_means_none():
    ws = [worker("warm", resident=[M], busy=True), worker("other", busy=True)]
    assert choose(ws, util={"warm": 1.0, "other": 0.0}) is None


def test_cold_start_never_goes_to_a_worker_that_already_has_the_model():
    # The only idle worker holds the model but has no room to run it; the busy warm one is
    # saturated: no cold start onto the resident copy (it is warm, not cold).
    ws = [worker("busy", resident=[M], busy=True), worker("stuck", resident=[M])]
    assert choose(ws, util={"busy": 1.0, "stuck": 1.0}, evict={"stuck": None}) is None


# ---- no warm worker: the cold choice -------------------------------------------------------------------


def test_no_warm_worker_loads_on_a_free_one_never_a_busy_one():
    ws = [worker("busy", busy=True), worker("idle", batches_run=9)]
    assert choose(ws, util={"idle": 0.99}) == "idle"
    assert choose([worker("busy", busy=True)]) is None


def test_no_worker_at_all():
    assert choose([]) is None


def test_none_when_no_worker_can_host():
    ws = [worker("w0", resident=["x"]), worker("w1", resident=["y"])]
    assert choose(ws, evict={"w0": None, "w1": None}) is None


def test_cold_choice_prefers_fewest_evictions():
    ws = [worker("two", resident=[("x", 1.0), ("y", 2.0)]), worker("one", resident=[("z", 50.0)]),
          worker("unhostable")]
    assert choose(ws, evict={"two": ["x", "y"], "one": ["z"], "unhostable": None}) == "one"
    ws.append(worker("roomy", resident=[("q", 0.0)]))
    assert choose(ws, evict={"two": ["x", "y"], "one": ["z"], "unhostable": None, "roomy": []}) == "roomy"


def test_cold_choice_evicts_the_models_used_longest_ago_across_the_fleet():
    ws = [worker("w0", resident=[("x", 100.0)]), worker("w1", resident=[("y", 10.0), ("keep", 500.0)])]
    # One victim each: w1's victim was used longer ago (its other model stays and does not count).
    assert choose(ws, evict={"w0": ["x"], "w1": ["y"]}) == "w1"
    assert choose(ws, evict={"w0": ["x"], "w1": ["keep"]}) == "w0"


def test_cold_choice_compares_the_newest_victim_of_each_worker():
    ws = [worker("w0", resident=[("a", 1.0), ("b", 90.0)]), worker("w1", resident=[("c", 50.0), ("d", 60.0)])]
    assert choose(ws, evict={"w0": ["a", "b"], "w1": ["c", "d"]}) == "w1"  # 60 < 90


def test_cold_ties_go_to_fewer_resident_models_then_least_loaded():
    ws = [worker("busier", resident=["x"], batches_run=5), worker("calm", resident=["x"], batches_run=1),
          worker("crowded", resident=["x", "y"])]
    assert choose(ws) == "calm"  # all fit as they are: fewest residents, then batches run
    assert choose(ws, util={"calm": 0.5}) == "busier"
    assert choose(ws[:2], util={"calm": 0.5, "busier": 0.5}) == "calm"


def test_saturated_warm_fleet_cold_start_still_prefers_cheapest_eviction():
    ws = [worker("warm", resident=[M], busy=True), worker("full", resident=[("x", 5.0)]), worker("empty")]
    assert choose(ws, util={"warm": 1.0}, evict={"full": ["x"]}) == "empty"
