"""LocalPool: device detection, worker states, thread and memory shares, exit handling (with fakes),
and one real worker process that reports its thread settings, is killed and comes back."""
import asyncio
import multiprocessing
import os
import signal
import subprocess
import time

import pytest

from genserve.engine.policies.liveness import RestartPolicy
from genserve.engine.policies.retry import Backoff
from genserve.workers import pool as pool_mod
from genserve.workers.pool import LocalPool, WorkerHandle, detect_devices

# ---- detect_devices ---------------------------------------------------------------------------------


def _fake_run(stdout=None, exc=None):
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        if exc is not None:
            raise exc
        return subprocess.CompletedProcess(cmd, 0, stdout=stdout, stderr="")

    return run, calls


@pytest.mark.parametrize("stdout,expected", [
    ("2\n", ["cuda:0", "cuda:1"]),
    ("1\n", ["cuda:0"]),
    ("0\n", ["cpu", "cpu", "cpu"]),
    ("", ["cpu", "cpu", "cpu"]),
    ("Traceback (most recent call last)\n", ["cpu", "cpu", "cpu"]),
])
def test_detect_devices_maps_the_probe_answer(monkeypatch, stdout, expected):
    run, calls = _fake_run(stdout)
    monkeypatch.setattr(pool_mod.subprocess, "run", run)
    assert detect_devices(3) == expected
    assert len(calls) == 1 and "torch" in calls[0][-1]  # asked of a child, not this process


@pytest.mark.parametrize("exc", [OSError("no python"), subprocess.TimeoutExpired("python", 120)])
def test_detect_devices_falls_back_to_cpu_when_the_probe_fails(monkeypatch, exc):
    run, _ = _fake_run(exc=exc)
    monkeypatch.setattr(pool_mod.subprocess, "run", run)
    assert detect_devices(2) == ["cpu", "cpu"]


def test_detect_devices_real_probe_without_cuda(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the child sees no GPU, on any machine
    assert detect_devices(3) == ["cpu", "cpu", "cpu"]


# ---- WorkerHandle.state -----------------------------------------------------------------------------


class FakeProc:
    def __init__(self, alive=True, exitcode=None, pid=4242):
        self.alive, self.exitcode, self.pid = alive, exitcode, pid
        self.killed = 0
        self.joined = 0

    def is_alive(self):
        return self.alive

    def kill(self):
        self.killed += 1

    def join(self, timeout=None):
        self.joined += 1


class FakeConn:
    """Messages to deliver, then EOF (the worker died) unless ``eof`` is False."""

    def __init__(self, msgs=(), eof=True, fd=77):
        self.msgs, self.eof, self.fd = list(msgs), eof, fd
        self.sent, self.closed = [], False

    def poll(self):
        return bool(self.msgs) or self.eof

    def recv(self):
        if self.msgs:
            return self.msgs.pop(0)
        raise EOFError

    def send(self, msg):
        if self.closed:
            raise OSError("handle is closed")
        self.sent.append(msg)

    def fileno(self):
        return self.fd

    def close(self):
        self.closed = True


class FakeLoop:
    def __init__(self):
        self.removed, self.later = [], []

    def remove_reader(self, fd):
        self.removed.append(fd)

    def call_later(self, delay, cb):
        self.later.append((delay, cb))

    def run_in_executor(self, executor, fn, *args):
        fn(*args)


def test_worker_handle_state():
    w = WorkerHandle("w0", "cpu")
    assert w.state == "restarting"  # no process (yet, or between lives)
    w.process = FakeProc(alive=True)
    assert w.state == "starting"
    w.ready = True
    assert w.state == "ready"
    w.ready = False
    w.process.alive = False
    assert w.state == "restarting"  # dead, its exit not handled yet
    w.ready = True
    w.quarantined = True
    assert w.state == "quarantined"  # wins over everything


# ---- construction, active() -----------------------------------------------------------------------


def make_pool(devices, tmp_path, **kw):
    msgs, exits = [], []
    p = LocalPool(devices, str(tmp_path), lambda wid, m: msgs.append((wid, m)), lambda wid, c: exits.append((wid, c)),
                  **kw)
    return p, msgs, exits


def test_pool_splits_threads_and_memory_among_cpu_workers(monkeypatch, tmp_path):
    monkeypatch.setattr(pool_mod.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(pool_mod, "_physical_memory", lambda: 12 << 30)
    p, _, _ = make_pool(["cpu", "cpu", "cpu"], tmp_path)
    assert list(p.workers) == ["w0", "w1", "w2"]
    assert [w.device for w in p.workers.values()] == ["cpu"] * 3
    assert p.threads == 2  # 8 cores // 3 workers
    assert p.cpu_memory == 4 << 30  # an equal share of physical memory
    p, _, _ = make_pool(["cpu"] * 16, tmp_path)
    assert p.threads == 1  # never zero
    p, _, _ = make_pool(["cpu", "cpu"], tmp_path, cpu_memory_bytes=123)
    assert p.cpu_memory == 123  # configured wins
    p, _, _ = make_pool(["cuda:0", "cuda:1"], tmp_path)
    assert p.threads == 4  # GPU workers get their share of the cores too
    p, _, _ = make_pool(["cpu", "cpu"], tmp_path, threads=3)
    assert p.threads == 3  # [server] worker_threads wins
    assert all(not w.ready and w.process is None for w in p.workers.values())  # nothing spawned before start()


def test_active_excludes_retiring_and_quarantined(tmp_path):
    p, _, _ = make_pool(["cpu"] * 4, tmp_path)
    p.workers["w1"].retiring = True
    p.workers["w2"].quarantined = True
    assert [w.id for w in p.active()] == ["w0", "w3"]


def test_add_worker_ids_are_never_reused(monkeypatch, tmp_path):
    p, _, _ = make_pool(["cpu", "cpu"], tmp_path)
    spawned = []
    monkeypatch.setattr(p, "_spawn", lambda w: spawned.append(w.id))
    assert p.add_worker("cpu") == "w2"
    del p.workers["w2"]  # retired
    assert p.add_worker("cuda:0") == "w3"
    assert spawned == ["w2", "w3"]
    assert p.workers["w3"].device == "cuda:0"


# ---- messages and exits, with fake processes --------------------------------------------------------


def attach(p, wid, conn, proc):
    w = p.workers[wid]
    w.conn, w.process = conn, proc
    return w


def test_messages_are_forwarded_and_ready_is_recorded(tmp_path):
    p, msgs, exits = make_pool(["cpu"], tmp_path)
    p.loop = FakeLoop()
    ready = {"ev": "ready", "worker": "w0", "pid": 4242, "capacity_bytes": 10}
    conn = FakeConn([ready, {"ev": "heartbeat", "t": 1.0}], eof=False)
    w = attach(p, "w0", conn, FakeProc())
    p._readable(w)
    assert msgs == [("w0", ready), ("w0", {"ev": "heartbeat", "t": 1.0})]
    assert w.ready and w.info == ready and w.state == "ready"
    assert exits == [] and not conn.closed


def test_retiring_a_worker_not_ready_yet_cancels_it_and_a_ready_one_is_asked_to_shut_down(tmp_path):
    # issue 22.7: a scale-down cancels a pending worker: killed at once, never reported, never restarted.
    p, msgs, exits = make_pool(["cpu", "cpu", "cpu"], tmp_path)
    p.loop = loop = FakeLoop()
    starting = attach(p, "w0", FakeConn(eof=False, fd=70), FakeProc())
    ready = attach(p, "w1", FakeConn(eof=False, fd=71), FakeProc())
    ready.ready = True
    p.retire("w0")
    assert "w0" not in p.workers and starting.process.killed == 1 and starting.process.joined == 1
    assert loop.removed == [70] and starting.conn.closed  # its messages (a late ready) are never read
    p.retire("w1")
    assert ready.conn.sent == [{"op": "shutdown"}] and ready.process.killed == 0 and "w1" in p.workers
    p.retire("w2")  # never started (or waiting to restart): dropped, and a scheduled restart skips it
    assert list(p.workers) == ["w1"] and exits == [] and msgs == []


def test_a_lost_worker_is_reported_and_restarted_after_the_backoff(monkeypatch, tmp_path):
    policy = RestartPolicy(backoff=Backoff(first_s=0.7, base_s=1.5, factor=2.0, max_s=30.0, jitter=0.0),
                           quarantine_after=3, window_s=300.0)
    p, msgs, exits = make_pool(["cpu", "cpu"], tmp_path, restart=policy)
    p.loop = loop = FakeLoop()
    spawned = []
    monkeypatch.setattr(p, "_spawn", lambda w: spawned.append(w.id))

    proc = FakeProc(alive=False, exitcode=-9)
    conn = FakeConn([{"ev": "ready"}], fd=31)
    w = attach(p, "w1", conn, proc)
    p._readable(w)  # the ready message, then EOF: the worker died
    assert exits == [("w1", -9)]
    assert loop.removed == [31] and conn.closed and proc.joined
    assert not w.ready and not w.quarantined
    assert w.restarts == 1 and len(w.exits) == 1
    [(delay, cb)] = loop.later
    assert delay == 0.7
    assert spawned == []  # not before the delay
    cb()
    assert spawned == ["w1"]

    # a second crash waits longer; the third within the window benches it
    attach(p, "w1", FakeConn(fd=32), FakeProc(alive=False, exitcode=1))
    p._readable(w)
    assert loop.later[-1][0] == 1.5 and w.restarts == 2
    attach(p, "w1", FakeConn(fd=33), FakeProc(alive=False, exitcode=1))
    p._readable(w)
    assert exits == [("w1", -9), ("w1", 1), ("w1", 1)]
    assert w.quarantined and w.state == "quarantined"
    assert len(loop.later) == 2 and w.restarts == 2  # no third restart
    assert [x.id for x in p.active()] == ["w0"]


def test_no_restart_once_closing(monkeypatch, tmp_path):
    p, _, exits = make_pool(["cpu"], tmp_path)
    p.loop = loop = FakeLoop()
    spawned = []
    monkeypatch.setattr(p, "_spawn", lambda w: spawned.append(w.id))
    w = attach(p, "w0", FakeConn(), FakeProc(alive=False, exitcode=0))
    p._readable(w)
    [(_, cb)] = loop.later
    p.closing = True  # shutdown began during the restart delay
    cb()
    assert spawned == []
    w = attach(p, "w0", FakeConn(), FakeProc(alive=False, exitcode=0))
    p._readable(w)
    assert exits == [("w0", 0), ("w0", 0)]  # still reported
    assert len(loop.later) == 1  # but nothing scheduled


def test_retired_worker_is_removed_not_restarted(tmp_path):
    p, msgs, exits = make_pool(["cpu", "cpu"], tmp_path)
    p.loop = loop = FakeLoop()
    conn = FakeConn(eof=False)
    w = attach(p, "w1", conn, FakeProc())
    w.ready = True  # an idle worker that is up (one still starting is canceled: the test above)
    p.retire("w1")
    assert w.retiring and conn.sent == [{"op": "shutdown"}]
    assert [x.id for x in p.active()] == ["w0"]
    conn.eof = True  # it shut down
    w.process.alive, w.process.exitcode = False, 0
    p._readable(w)
    assert "w1" not in p.workers
    assert exits == [] and loop.later == []  # a retirement is not a crash
    p.retire("w1")  # gone: harmless
    p.send("w1", {"op": "load"})


def test_kill_and_send(tmp_path):
    p, _, _ = make_pool(["cpu", "cpu"], tmp_path)
    alive, dead = FakeProc(alive=True), FakeProc(alive=False)
    attach(p, "w0", FakeConn(eof=False), alive)
    c1 = attach(p, "w1", FakeConn(eof=False), dead).conn
    p.kill("w0")
    p.kill("w1")  # already dead: nothing to kill
    p.kill("w7")  # unknown
    assert (alive.killed, dead.killed) == (1, 0)
    p.send("w1", {"op": "unload", "model": "m"})
    assert c1.sent == [{"op": "unload", "model": "m"}]
    c1.closed = True
    p.send("w1", {"op": "unload", "model": "m"})  # a dead pipe is not an error here: the reader sees EOF


# ---- shutdown: every worker waited on together ------------------------------------------------------


def _worker_stand_in(conn, busy: bool) -> None:
    """A worker process's shutdown behaviour: an idle one exits on ``shutdown``; a busy one is
    inside a batch and does not read its pipe (only the kill after the grace period ends it)."""
    if busy:
        time.sleep(120)
    while conn.recv().get("op") != "shutdown":
        pass


def test_close_waits_for_all_workers_together_then_kills_the_busy_ones(tmp_path):
    """Shutdown with several busy workers takes one grace period in all, not one per worker (the
    issue: 8 busy GPUs x 5 s one after another, past Kubernetes' 30 s). Real processes and pipes."""
    ctx = multiprocessing.get_context("fork")
    busy, idle, grace = 4, 2, 1.0
    p, _, exits = make_pool(["cpu"] * (busy + idle), tmp_path)
    procs = []
    for i, wid in enumerate(p.workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_stand_in, args=(child, i < busy), daemon=True)
        proc.start()
        child.close()
        attach(p, wid, parent, proc)
        procs.append(proc)

    async def main() -> float:
        p.loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        await p.close(grace_s=grace)
        return time.monotonic() - t0

    try:
        elapsed = asyncio.run(main())
    finally:
        for proc in procs:
            proc.kill()
    assert not any(proc.is_alive() for proc in procs)
    assert [proc.exitcode for proc in procs] == [-signal.SIGKILL] * busy + [0] * idle
    # one grace period (plus reaping), far below busy x grace
    assert grace <= elapsed < grace + 1.5 < busy * grace, elapsed
    assert exits == []  # a shutdown is not reported as crashes


# ---- a real worker process --------------------------------------------------------------------------


@pytest.mark.slow
def test_real_worker_comes_up_heartbeats_and_is_restarted_after_a_kill(tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        msgs: list[tuple[str, dict]] = []
        exits: list[tuple[str, int | None]] = []
        changed = asyncio.Event()

        def on_message(wid, msg):
            msgs.append((wid, msg))
            changed.set()

        def on_exit(wid, code):
            exits.append((wid, code))
            changed.set()

        async def until(pred, timeout, what):
            deadline = loop.time() + timeout
            while not pred():  # callbacks only run while we await, so check-then-clear cannot miss one
                changed.clear()
                left = deadline - loop.time()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}; messages: "
                                         f"{[m['ev'] for _, m in msgs]}, exits: {exits}")
                try:
                    await asyncio.wait_for(changed.wait(), left)
                except asyncio.TimeoutError:
                    pass

        def readies():
            return [m for _, m in msgs if m["ev"] == "ready"]

        def heartbeats_after(n_ready):
            idx = [i for i, (_, m) in enumerate(msgs) if m["ev"] == "ready"][n_ready - 1]
            return sum(1 for _, m in msgs[idx + 1:] if m["ev"] == "heartbeat")

        policy = RestartPolicy(backoff=Backoff(first_s=0.05, base_s=0.1, factor=2.0, max_s=1.0, jitter=0.0))
        pool = LocalPool(["cpu"], str(tmp_path / "results"), on_message, on_exit, heartbeat_s=0.2,
                         restart=policy, cpu_memory_bytes=1 << 30, threads=3)
        pool.start()
        try:
            w = pool.workers["w0"]
            first_pid = w.process.pid
            assert w.state == "starting" and not w.ready
            await until(lambda: len(readies()) == 1, 240, "the first ready")
            r = readies()[0]
            assert (r["worker"], r["device"], r["device_name"], r["pid"]) == ("w0", "cpu", "cpu", first_pid)
            assert r["capacity_bytes"] == 1 << 30
            # [server] worker_threads = 3: torch and every OpenMP / MKL / BLAS pool, set before torch
            # was imported (issue 22.8: a local worker's OpenMP pool took every core).
            assert (r["threads"], r["interop_threads"]) == (3, 3)
            env = dict(r["thread_env"])
            assert env.pop("OMP_WAIT_POLICY") == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep
            assert env == {k: "3" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                            "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}
            assert w.state == "ready" and w.ready
            await until(lambda: heartbeats_after(1) >= 2, 60, "two heartbeats")
            assert all(wid == "w0" for wid, _ in msgs)

            pool.kill("w0")
            await until(lambda: exits, 60, "on_exit")
            assert exits == [("w0", -signal.SIGKILL)]
            assert w.restarts == 1 and not w.quarantined
            assert not w.ready  # restarting: the runtime's readiness counts it out until it is back
            await until(lambda: len(readies()) == 2, 240, "the second ready")
            second = readies()[1]
            assert second["pid"] == w.process.pid != first_pid
            assert w.state == "ready"
            await until(lambda: heartbeats_after(2) >= 1, 60, "a heartbeat from the new process")
        finally:
            await pool.close()
        assert not w.process.is_alive()
        assert exits == [("w0", -signal.SIGKILL)]  # a shutdown is not reported as a crash

    asyncio.run(main())
