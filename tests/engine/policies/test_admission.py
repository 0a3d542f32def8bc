"""Tenant-aware admission (engine/policies/admission.py): the rule at its boundaries."""
import pytest

from genserve.engine.policies.admission import admits, share


def test_alone_a_tenant_may_fill_the_whole_queue_and_no_more():
    assert admits(100, depth=99, mine=99, weight=1.0, others_weight=0.0)
    assert not admits(100, depth=100, mine=100, weight=1.0, others_weight=0.0)
    assert admits(100, depth=96, mine=96, weight=1.0, others_weight=0.0, n=4)
    assert not admits(100, depth=97, mine=97, weight=1.0, others_weight=0.0, n=4)


def test_with_others_waiting_a_tenant_gets_its_share_even_past_max_queue():
    # A flood filled the queue alone; a newcomer under its share gets in although depth = max_queue.
    assert admits(100, depth=100, mine=0, weight=1.0, others_weight=1.0)
    assert admits(100, depth=149, mine=49, weight=1.0, others_weight=1.0)  # share 50: the 50th job
    assert not admits(100, depth=150, mine=50, weight=1.0, others_weight=1.0)  # the 51st
    # The flood itself, over its share while the newcomer waits: refused although it asks for one.
    assert not admits(100, depth=101, mine=100, weight=1.0, others_weight=1.0)
    # ... and also when the queue has room: the share binds whenever another tenant waits.
    assert not admits(100, depth=60, mine=50, weight=1.0, others_weight=1.0)


@pytest.mark.parametrize("weight, others, expected", [(1.0, 1.0, 50), (2.0, 1.0, 66), (1.0, 2.0, 33),
                                                      (1.0, 3.0, 25), (1.0, 1000.0, 1), (3.0, 1.0, 75)])
def test_share_is_by_weight_with_a_floor_of_one(weight, others, expected):
    assert share(100, weight, weight + others) == expected


def test_the_queue_never_exceeds_twice_max_queue():
    assert admits(100, depth=199, mine=0, weight=1.0, others_weight=1.0)
    assert not admits(100, depth=200, mine=0, weight=1.0, others_weight=1.0)
    assert not admits(100, depth=199, mine=0, weight=1.0, others_weight=1.0, n=2)


def test_n_jobs_at_once_count_whole():
    assert admits(100, depth=100, mine=45, weight=1.0, others_weight=1.0, n=5)
    assert not admits(100, depth=100, mine=46, weight=1.0, others_weight=1.0, n=5)
