"""Cost apportioning and the device usage ledger: pure, fed with fake times."""
import pytest

from genserve.config.load import DEFAULT_PRICES
from genserve.server.jobs.cost import apportion, cost_usd, device_type, job_weight
from genserve.server.observe.usage import UsageLedger


def test_device_type_from_gpu_name():
    assert device_type("cpu", None, DEFAULT_PRICES) == "cpu"
    assert device_type("cuda:0", "NVIDIA H100 80GB HBM3", DEFAULT_PRICES) == "H100"
    assert device_type("cuda:1", "NVIDIA H200", DEFAULT_PRICES) == "H200"
    assert device_type("cuda:0", "NVIDIA GeForce RTX 4090", DEFAULT_PRICES) == "gpu"
    # The longest key wins, so a custom "H100-NVL" price beats the generic H100 one.
    assert device_type("cuda:0", "NVIDIA H100-NVL", {**DEFAULT_PRICES, "H100-NVL": 2.2}) == "H100-NVL"


def test_apportion_sums_to_total_and_follows_weights():
    shares = apportion(3.0, [1, 1, 1])
    assert shares == pytest.approx([1.0, 1.0, 1.0]) and sum(shares) == 3.0
    w = [job_weight(64, 64, 0), job_weight(64, 64, 9), job_weight(128, 64, 0)]
    shares = apportion(1.3, w)
    assert sum(shares) == 1.3  # exact, not approximately: the last share takes the remainder
    assert shares[1] == pytest.approx(9 * shares[0]) and shares[2] == pytest.approx(2 * shares[0])
    assert apportion(0.7, [0, 0]) == pytest.approx([0.35, 0.35])
    assert apportion(1.0, []) == []


def test_batch_cost_is_device_seconds_times_price():
    batch_s, price = 7.2, DEFAULT_PRICES["H100"]
    costs = [cost_usd(s, price) for s in apportion(batch_s, [1] * 5)]
    assert sum(costs) == pytest.approx(batch_s * price / 3600)
    assert cost_usd(3600, 2.6) == pytest.approx(2.6)


def ledger_with_history():
    led = UsageLedger()
    led.worker_up("w0", "cpu", 0.0)        # 0-10 idle, nothing loaded
    led.busy("w0", 10.0)                   # 10-14 busy (a cold batch)
    led.resident("w0", {"img"}, 12.0)      # loaded during the batch: still busy
    led.idle("w0", 14.0)                   # 14-20 warm idle (img)
    led.resident("w0", {"img", "vid"}, 20.0)  # 20-30 warm idle (img + vid)
    led.busy("w0", 30.0)                   # 30-35 busy
    led.idle("w0", 35.0)
    return led


def test_ledger_totals_split_busy_warm_and_empty_idle():
    u = ledger_with_history().totals(40.0)["w0"]
    assert u.busy_s == pytest.approx(9.0)
    assert u.idle_empty_s == pytest.approx(10.0)
    assert u.idle_warm_s == pytest.approx(6.0 + 10.0 + 5.0)  # 35-40 is still open: counted up to now
    assert u.up_s == pytest.approx(40.0) and u.busy_fraction == pytest.approx(9 / 40)


def test_ledger_window_clips_and_splits_warm_idle_by_model():
    w = ledger_with_history().window(12.0, 32.0)
    u = w.workers["w0"]
    assert u.busy_s == pytest.approx(2.0 + 2.0) and u.idle_warm_s == pytest.approx(16.0)
    assert w.idle_warm_by_model[("img", "cpu")] == pytest.approx(6.0 + 5.0)
    assert w.idle_warm_by_model[("vid", "cpu")] == pytest.approx(5.0)
    assert w.busy_fraction == pytest.approx(4 / 20)


def test_ledger_series_and_worker_down():
    led = ledger_with_history()
    assert led.series(10.0, 40.0, 10.0) == pytest.approx([0.4, 0.0, 0.5])
    led.worker_down("w0", 40.0)
    assert not led.is_busy("w0")
    assert led.series(40.0, 50.0, 10.0) == [None]  # nothing up: no utilization to speak of
    assert led.totals(100.0)["w0"].up_s == pytest.approx(40.0)
