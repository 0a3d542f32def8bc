"""MemoryModel (engine/memory.py): what weights and batches are expected to need, learned from the
workers' measurements. Pure bookkeeping: no engine, no clock."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genserve.engine.memory import MemoryModel, batch_units
from genserve.engine.types import BatchKey

A = BatchKey("a", 100, 100, 0, 4, 1.0)  # 10 000 units per job
A_BIG = BatchKey("a", 200, 100, 0, 4, 1.0)  # 20 000 units per job
A_OTHER_STEPS = BatchKey("a", 100, 100, 0, 30, 7.5)  # steps and guidance do not change memory units
V = BatchKey("v", 100, 100, 5, 4, 1.0)  # 50 000 units per job (frames count)
C = BatchKey("c", 100, 100, 0, 4, 1.0)


def test_batch_units_are_jobs_times_pixels_times_frames():
    assert batch_units(A, 1) == 10_000
    assert batch_units(A, 3) == 30_000
    assert batch_units(V, 2) == 100_000
    assert batch_units(BatchKey("x", 8, 8, 1), 1) == 64  # one frame == an image
    assert batch_units(A_OTHER_STEPS, 1) == batch_units(A, 1)


# ---- weights ---------------------------------------------------------------------------------------


def test_hint_until_measured_then_the_measurement():
    mem = MemoryModel({"a": 1000})
    assert mem.weights("a") == mem.known_weights("a") == 1000
    mem.observe_weights("a", 700)  # smaller than the hint: the measurement wins all the same
    assert mem.weights("a") == mem.known_weights("a") == 700
    mem.observe_weights("a", 900)  # the latest measurement, not the largest
    assert mem.weights("a") == 900


def test_measurement_without_hint():
    mem = MemoryModel()
    mem.observe_weights("a", 500)
    assert mem.weights("a") == mem.known_weights("a") == 500


def test_unknown_model_guesses_the_largest_measured_weights_but_does_not_know_them():
    mem = MemoryModel({"hinted": 5000})
    assert mem.weights("c") == 0 and mem.known_weights("c") == 0  # nothing measured yet
    mem.observe_weights("a", 300)
    mem.observe_weights("v", 800)
    mem.observe_weights("a", 400)
    assert mem.weights("c") == 800  # the largest measured, not the hint of another model
    assert mem.known_weights("c") == 0  # a guess, never a known figure
    assert mem.weights("hinted") == 5000  # a hinted model keeps its hint, it is not guessed


def test_hints_are_copied():
    hints = {"a": 10}
    mem = MemoryModel(hints)
    hints["a"] = 99
    assert mem.weights("a") == 10


@pytest.mark.parametrize("nbytes", [0, -1, -10_000])
def test_zero_or_negative_weights_are_ignored(nbytes):
    mem = MemoryModel({"a": 1000})
    mem.observe_weights("a", nbytes)
    assert mem.weights("a") == 1000
    mem.observe_weights("a", 600)
    mem.observe_weights("a", nbytes)
    assert mem.weights("a") == 600
    mem.observe_weights("c", nbytes)
    assert "c" not in mem.weights_measured and mem.weights("zzz") == 600


# ---- working memory -----------------------------------------------------------------------------------


def test_nothing_observed_means_zero_working_memory():
    mem = MemoryModel()
    assert mem.working(A, 1) == 0 and mem.working(A, 4, known_only=True) == 0
    assert not mem.working_is_known(A, 1)


def test_exact_figure_per_key_and_batch_size():
    mem = MemoryModel()
    mem.observe_batch(A, 2, 3000)
    assert mem.working(A, 2) == 3000
    assert mem.working(A, 2, known_only=True) == 3000
    assert mem.working_is_known(A, 2)


def test_exact_figure_keeps_the_largest_peak():
    mem = MemoryModel()
    mem.observe_batch(A, 2, 3000)
    mem.observe_batch(A, 2, 2000)
    assert mem.working(A, 2) == 3000
    mem.observe_batch(A, 2, 3500)
    assert mem.working(A, 2) == 3500


def test_unseen_batch_size_and_shape_scale_by_the_per_unit_ratio():
    mem = MemoryModel()
    mem.observe_batch(A, 2, 4000)  # 4000 / 20 000 units = 0.2 bytes per unit
    assert mem.working(A, 1) == 2000
    assert mem.working(A, 4) == 8000
    assert mem.working(A_BIG, 1) == 4000
    assert mem.working(A_OTHER_STEPS, 3) == 6000  # same model, other key: scaled, not exact
    assert mem.working_is_known(A_BIG, 3)  # the model has a measured ratio


def test_exact_figure_beats_the_ratio_for_its_own_shape_only():
    mem = MemoryModel()
    mem.observe_batch(A, 1, 5000)  # ratio 0.5
    mem.observe_batch(A, 4, 8000)  # ratio 0.2: exact for n=4, the ratio stays 0.5
    assert mem.working(A, 4) == 8000
    assert mem.working(A, 2) == 10_000
    assert mem.per_unit["a"] == 0.5


def test_the_largest_ratio_is_kept():
    mem = MemoryModel()
    mem.observe_batch(A, 1, 1000)  # 0.1
    mem.observe_batch(A_BIG, 1, 6000)  # 0.3
    mem.observe_batch(A, 2, 1000)  # 0.05: lower, ignored for the ratio
    assert mem.per_unit["a"] == pytest.approx(0.3)
    assert mem.working(A, 3) == int(0.3 * 30_000)


def test_model_that_has_not_run_is_as_hungry_as_the_hungriest_seen():
    mem = MemoryModel()
    mem.observe_batch(A, 1, 1000)  # 0.1
    mem.observe_batch(V, 1, 25_000)  # 0.5
    assert mem.working(C, 2) == int(0.5 * 20_000)
    assert mem.working(C, 2, known_only=True) == 0  # known figures only: no guess
    assert not mem.working_is_known(C, 2)
    # The guess only applies until the model runs once.
    mem.observe_batch(C, 1, 2000)  # 0.2
    assert mem.working(C, 2) == 4000 and mem.working_is_known(C, 7)


def test_known_only_does_not_hide_the_models_own_figures():
    mem = MemoryModel()
    mem.observe_batch(A, 2, 4000)
    assert mem.working(A, 2, known_only=True) == 4000
    assert mem.working(A, 3, known_only=True) == 6000


@pytest.mark.parametrize("n, peak", [(2, 0), (2, -5), (0, 1000), (-1, 1000)])
def test_zero_or_negative_observations_are_ignored(n, peak):
    mem = MemoryModel()
    mem.observe_batch(A, n, peak)
    assert mem.working_exact == {} and mem.per_unit == {}
    assert mem.working(A, 1) == 0 and not mem.working_is_known(A, 2)
    mem.observe_batch(A, 1, 1000)
    mem.observe_batch(A, n, peak)
    assert mem.working(A, 1) == 1000 and mem.per_unit["a"] == pytest.approx(0.1)


@settings(max_examples=200, deadline=None)
@given(obs=st.lists(st.tuples(st.sampled_from([A, A_BIG, V, C]), st.integers(1, 8), st.integers(-10, 10**7)),
                    max_size=20),
       key=st.sampled_from([A, A_BIG, A_OTHER_STEPS, V, C]), n=st.integers(1, 8))
def test_estimates_never_undercut_what_was_measured(obs, key, n):
    """Over-estimating costs a smaller batch, under-estimating an OOM: whatever the history, the
    estimate for a batch is at least the largest peak seen at that exact size, and at least the
    per-unit share of any peak seen for the model (up to int rounding)."""
    mem = MemoryModel()
    for k, size, peak in obs:
        mem.observe_batch(k, size, peak)
    est = mem.working(key, n)
    exact = [p for k, size, p in obs if k == key and size == n and p > 0]
    if exact:
        assert est == max(exact)
    else:
        same_model = [p / batch_units(k, size) for k, size, p in obs if k.model == key.model and p > 0]
        any_model = [p / batch_units(k, size) for k, size, p in obs if p > 0]
        ratio = max(same_model) if same_model else max(any_model, default=0.0)
        assert est == int(ratio * batch_units(key, n))
        assert mem.working(key, n, known_only=True) == (est if same_model else 0)
    assert mem.working_is_known(key, n) == bool(exact or any(k.model == key.model and p > 0 for k, _, p in obs))


def test_an_estimate_is_a_hint_never_a_known_figure():
    mem = MemoryModel()
    mem.observe_estimate(A, 2, 4000)
    assert mem.working(A, 2) == 4000  # stands in for the shape
    assert mem.working(A_BIG, 1) == 4000  # scaled per unit: 0.2 bytes per unit
    assert not mem.working_is_known(A, 2)
    assert mem.working(A, 2, known_only=True) == 0  # nothing may refuse a shape on it
    mem.observe_batch(A, 2, 1000)  # a measurement replaces it
    assert mem.working(A, 2) == 1000 and mem.working_is_known(A, 2)
    assert mem.working(A_BIG, 1) == 1000  # measured ratio 0.05 per unit wins over the estimate's


def test_the_batch_key_variant_does_not_split_memory_figures():
    mem = MemoryModel()
    mem.observe_batch(A._replace(variant="img:0123"), 1, 900)
    assert mem.working(A._replace(variant="img:4567"), 1) == mem.working(A, 1) == 900
    assert mem.working_is_known(A._replace(variant="neg"), 1)
    assert len(mem.working_exact) == 1  # one entry per shape, not per conditioning image
