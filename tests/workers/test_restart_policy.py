"""RestartPolicy (when an exited worker comes back, or is benched) and the worker's FaultInjector."""
import signal
import subprocess
import sys

import pytest

from genserve.engine.policies.liveness import RestartPolicy
from genserve.engine.policies.retry import Backoff
from genserve.engine.types import ErrorCode, classify_exception
from genserve.workers import faults as faults_mod
from genserve.workers.faults import FaultInjector

# ---- RestartPolicy ----------------------------------------------------------------------------------


def test_default_backoff_grows_then_quarantines():
    p = RestartPolicy()  # 0.5 s, then 1, 2, 4 …; the 5th crash within 300 s benches the worker
    now = 1000.0
    crashes: list[float] = []
    delays = []
    for i in range(5):
        crashes.append(now + i)
        delays.append(p.after_exit(crashes, now + i))
    assert delays == [0.5, 1.0, 2.0, 4.0, None]


def test_backoff_is_capped():
    p = RestartPolicy(backoff=Backoff(first_s=1.0, base_s=10.0, factor=10.0, max_s=25.0, jitter=0.0),
                      quarantine_after=100, window_s=1e9)
    got = [p.after_exit([0.0] * n, 1.0) for n in range(1, 6)]
    assert got == [1.0, 10.0, 25.0, 25.0, 25.0]
    assert got == sorted(got)  # never shrinks as crashes pile up


def test_quarantine_threshold_is_configurable():
    p = RestartPolicy(quarantine_after=2, window_s=60.0)
    assert p.after_exit([10.0], 10.0) is not None
    assert p.after_exit([10.0, 20.0], 20.0) is None


def test_crashes_outside_the_window_do_not_count():
    p = RestartPolicy(quarantine_after=3, window_s=100.0)
    now = 10_000.0
    old = [now - 500, now - 400, now - 300, now - 101]  # four old crashes: none within the window
    assert p.after_exit(old + [now], now) == 0.5  # as if this were the first crash
    assert p.after_exit(old + [now - 50, now], now) == 1.0  # two recent ones
    assert p.after_exit(old + [now - 100, now - 50, now], now) is None  # the window's edge counts (<=)
    # the same history, judged later: the early ones have aged out
    assert p.after_exit([now - 100, now - 50, now], now + 1) == 1.0


def test_jitter_keeps_delays_within_bounds_and_deterministic():
    p = RestartPolicy(backoff=Backoff(first_s=2.0, base_s=4.0, factor=2.0, max_s=60.0, jitter=0.25))
    d1 = p.after_exit([0.0], 0.0)
    assert 1.5 <= d1 <= 2.5
    assert p.after_exit([0.0], 0.0) == d1  # same history, same answer (no global RNG)
    d2 = p.after_exit([0.0, 1.0], 1.0)
    assert 3.0 <= d2 <= 5.0


# ---- FaultInjector ----------------------------------------------------------------------------------


def test_no_spec_injects_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(faults_mod.os, "kill", lambda *a: calls.append(("kill", a)))
    monkeypatch.setattr(faults_mod.time, "sleep", lambda s: calls.append(("sleep", s)))
    for inj in (FaultInjector(None), FaultInjector({})):
        inj.on_load("any-model")
        for size in (1, 64):
            inj.on_batch(size)
            for step in range(3):
                inj.on_step(step)
        assert inj.batches == 2
    assert calls == []


def test_fail_load_only_for_named_models():
    inj = FaultInjector({"fail_load": ["broken"]})
    inj.on_load("fine")
    with pytest.raises(RuntimeError, match="injected fault: loading broken fails"):
        inj.on_load("broken")
    with pytest.raises(RuntimeError):
        inj.on_load("broken")  # every time, not once


def test_oom_above_batch_raises_an_oom_the_classifier_recognises():
    inj = FaultInjector({"oom_above_batch": 2})
    inj.on_batch(1)
    inj.on_batch(2)
    with pytest.raises(Exception) as ei:
        inj.on_batch(3)
    assert "OutOfMemoryError" in type(ei.value).__name__
    assert "batch of 3 (limit 2)" in str(ei.value)
    assert classify_exception(ei.value) == ErrorCode.OUT_OF_MEMORY
    assert inj.batches == 3  # the failed batch still counts as started


def test_crash_on_batch_kills_at_the_first_step_of_that_batch(monkeypatch):
    kills = []
    monkeypatch.setattr(faults_mod.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    inj = FaultInjector({"crash_on_batch": 2})
    inj.on_batch(1)
    for step in range(3):
        inj.on_step(step)
    assert kills == []  # batch 1: untouched
    inj.on_batch(1)
    inj.on_step(1)
    assert kills == []  # only at step 0
    inj.on_step(0)
    assert kills == [(faults_mod.os.getpid(), signal.SIGKILL)]
    inj.on_batch(1)
    inj.on_step(0)
    assert len(kills) == 1  # batch 3: untouched


class _Hung(Exception):
    pass


def test_hang_on_batch_sleeps_forever_at_step_zero(monkeypatch):
    sleeps = []

    def fake_sleep(s):
        sleeps.append(s)
        if len(sleeps) >= 3:  # it kept sleeping: it would never have returned
            raise _Hung

    monkeypatch.setattr(faults_mod.time, "sleep", fake_sleep)
    inj = FaultInjector({"hang_on_batch": 1})
    inj.on_batch(2)
    inj.on_step(1)  # not step 0
    assert sleeps == []
    with pytest.raises(_Hung):
        inj.on_step(0)
    assert sleeps == [3600, 3600, 3600]
    inj.on_batch(2)
    sleeps.clear()
    inj.on_step(0)  # batch 2: no hang
    assert sleeps == []


def test_crash_really_sigkills_the_process():
    code = (
        "from genserve.workers.faults import FaultInjector\n"
        "inj = FaultInjector({'crash_on_batch': 1})\n"
        "inj.on_batch(1)\n"
        "print('before', flush=True)\n"
        "inj.on_step(0)\n"
        "print('survived', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == "before\n"  # no cleanup, no "survived"
