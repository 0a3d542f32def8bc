"""Which idle workers a scale-down retires: the cheapest to lose, never a warm-pool copy, never the
last holder of a model with queued work."""
from genserve.engine.scaling import choose_retirees
from genserve.engine.types import Resident, WorkerState


def worker(wid: str, **models: int) -> WorkerState:
    return WorkerState(wid, resident={m: Resident(b, 0.0, loading=False) for m, b in models.items()})


def test_cheapest_first():
    ws = [worker("a", sdxl=100), worker("b"), worker("c", sd=10)]
    assert choose_retirees(ws, ws, set(), 2, now=10.0) == ["b", "c"]


def test_never_the_last_holder_of_a_model_with_queued_work():
    a, b = worker("a", video=50), worker("b", image=10)
    # "a" alone holds the video model and video jobs are queued: "b" goes although it holds more
    # than nothing, and asking for two retires only "b".
    assert choose_retirees([a, b], [a, b], {"video"}, 2, now=0.0) == ["b"]
    # With a second holder one of them may go, but not both.
    c = worker("c", video=50)
    assert choose_retirees([a, c], [a, c], {"video"}, 2, now=0.0) == ["a"]
    # No queued work for it: the holder is as retirable as any.
    assert choose_retirees([a, b], [a, b], set(), 2, now=0.0) == ["b", "a"]


def test_never_a_warm_pool_copy_or_a_loading_worker():
    pinned = WorkerState("p", resident={"m": Resident(10, 0.0, pinned=True, loading=False)})
    loading = WorkerState("l", resident={"m": Resident(10, 0.0, loading=True)})
    free = worker("f")
    assert choose_retirees([pinned, loading, free], [pinned, loading, free], set(), 3, now=0.0) == ["f"]


def test_pending_workers_are_retired_before_idle_up_ones():
    # issue 22.7: a scale-down retired idle up workers while a pending one went on to take a freed slot.
    ws = [worker("a"), worker("b"), worker("c")]
    assert choose_retirees(ws, ws, set(), 1, now=0.0, pending=["p1", "p2"]) == ["p2"]  # the newest first
    assert choose_retirees(ws, ws, set(), 2, now=0.0, pending=["p1", "p2"]) == ["p2", "p1"]
    assert choose_retirees(ws, ws, set(), 3, now=0.0, pending=["p1", "p2"]) == ["p2", "p1", "a"]
