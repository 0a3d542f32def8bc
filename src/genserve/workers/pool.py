"""The local process pool: starts one worker process per device, watches and restarts them.

It is driven from the asyncio loop: each worker's pipe is registered with ``loop.add_reader``, so
messages arrive as callbacks with no polling and no threads in the server.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from ..engine.policies.liveness import RestartPolicy
from .base import OnExit, OnMessage, WorkerHandle
from .process import worker_main

log = logging.getLogger("genserve.pool")


def detect_devices(cpu_workers: int) -> list[str]:
    """``cuda:N`` for every visible GPU, else ``cpu`` × ``cpu_workers``. Asked of a child process so
    the server process never loads torch (hundreds of MB it has no use for)."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        n = int(out.stdout.strip() or 0)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        n = 0
    if n:
        return [f"cuda:{i}" for i in range(n)]
    return ["cpu"] * cpu_workers


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 << 30


class LocalPool:
    """Worker processes on this machine (implements ``base.Pool``)."""

    def __init__(self, devices: list[str], results: dict[str, Any] | str, on_message: OnMessage, on_exit: OnExit, *,
                 heartbeat_s: float = 2.0, restart: RestartPolicy | None = None,
                 faults: Callable[[str, int], dict[str, Any] | None] | None = None,
                 cpu_memory_bytes: int = 0, host_cache_bytes: int = 0, threads: int | None = None) -> None:
        self.ctx = mp.get_context("spawn")
        self.results = results  # a result-store spec: each worker opens the store
        self.on_message = on_message
        self.on_exit = on_exit
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n_cpu = sum(1 for d in devices if d == "cpu")
        # Each worker's share of the cores (configured: [server] worker_threads), applied to torch and
        # every OpenMP/MKL pool before the worker imports torch (process.limit_threads), as on Ray.
        self.threads = threads or max(1, cpu_count // max(1, len(devices)))
        # A CPU worker's budget: configured, or an equal share of physical memory.
        self.cpu_memory = cpu_memory_bytes or (_physical_memory() // max(1, n_cpu))
        self.host_cache_bytes = host_cache_bytes
        self.workers = {f"w{i}": WorkerHandle(f"w{i}", d) for i, d in enumerate(devices)}
        self._next_id = len(devices)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self.heartbeat_s = heartbeat_s
        self.restart = restart or RestartPolicy()
        self.faults = faults or (lambda worker_id, life: None)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for w in self.workers.values():
            self._spawn(w)

    def _spawn(self, w: WorkerHandle) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=worker_main, name=f"genserve-worker-{w.id}", daemon=True,
                                args=(child, w.id, w.device, self.results, self.threads, self.heartbeat_s,
                                      self.faults(w.id, w.restarts), self.cpu_memory, self.host_cache_bytes))
        proc.start()
        child.close()
        w.process, w.conn, w.ready = proc, parent, False
        assert self.loop is not None
        self.loop.add_reader(parent.fileno(), self._readable, w)

    def _readable(self, w: WorkerHandle) -> None:
        conn = w.conn
        try:
            while conn.poll():
                msg = conn.recv()
                if msg.get("ev") == "ready":
                    w.ready, w.info = True, msg
                self.on_message(w.id, msg)
                if w.conn is not conn:  # handler tore the worker down
                    return
        except (EOFError, OSError):
            self._lost(w)

    def _lost(self, w: WorkerHandle) -> None:
        assert self.loop is not None
        try:
            self.loop.remove_reader(w.conn.fileno())
        except (ValueError, OSError):
            pass
        w.conn.close()
        w.process.join(timeout=5)
        code = w.process.exitcode
        w.ready = False
        if w.retiring:  # scaled down on purpose: gone for good, nothing to recover
            del self.workers[w.id]
            log.info("worker %s retired (exit code %s)", w.id, code)
            return
        self.on_exit(w.id, code)
        if self.closing:
            return
        now = time.time()
        w.exits.append(now)
        delay = self.restart.after_exit(w.exits, now)
        if delay is None:
            w.quarantined = True
            log.error("worker %s exited with %s, %d times in %gs: quarantined (not restarted)", w.id, code,
                      len(w.exits), self.restart.window_s)
            return
        w.restarts += 1
        log.warning("worker %s exited with %s; restarting in %.1fs", w.id, code, delay)
        self.loop.call_later(delay, lambda: None if self.closing or w.retiring else self._spawn(w))

    def kill(self, worker_id: str) -> None:
        """SIGKILL a hung or stuck worker. Its exit is reported like any crash (``on_exit``)."""
        w = self.workers.get(worker_id)
        if w is not None and w.process is not None and w.process.is_alive():
            w.process.kill()

    def send(self, worker_id: str, msg: dict[str, Any]) -> None:
        w = self.workers.get(worker_id)
        if w is None:
            return  # retired meanwhile
        try:
            w.conn.send(msg)
        except (OSError, ValueError):
            pass  # the reader callback sees the EOF and reports the worker lost

    def in_flight(self) -> dict[str, str]:
        return {}  # local workers never outlive the server that started them

    # ---- the local provider: autoscaling starts and retires worker processes ------------------------

    def active(self) -> list[WorkerHandle]:
        """Workers that count towards the fleet: not retiring, not quarantined."""
        return [w for w in self.workers.values() if not w.retiring and not w.quarantined]

    def add_worker(self, device: str) -> str:
        wid = f"w{self._next_id}"
        self._next_id += 1
        w = self.workers[wid] = WorkerHandle(wid, device)
        self._spawn(w)
        log.info("worker %s starting on %s (scale up)", wid, device)
        return wid

    def retire(self, worker_id: str) -> None:
        """Graceful shutdown of an idle worker; its exit is not a crash. One not ready yet (starting,
        or waiting to restart) is canceled at once: it holds nothing, and it must not come up
        later and take a device the scale-down meant to free."""
        w = self.workers.get(worker_id)
        if w is None:
            return
        w.retiring = True
        if w.ready:
            self.send(worker_id, {"op": "shutdown"})
            return
        del self.workers[worker_id]
        if w.conn is not None:
            try:
                self.loop.remove_reader(w.conn.fileno())  # type: ignore[union-attr]
            except (ValueError, OSError):
                pass
            w.conn.close()
        if w.process is not None and w.process.is_alive():
            w.process.kill()  # reaped below, off the event loop
            assert self.loop is not None
            self.loop.run_in_executor(None, w.process.join, 30.0)
        log.info("worker %s canceled before it was ready (scale down)", worker_id)

    async def close(self, grace_s: float = 2.0) -> None:
        """Ask every worker to exit, wait for all of them together up to ``grace_s``, then kill
        the rest (a worker still inside a batch does not read ``shutdown`` until it ends).
        Idempotent. The first part, up to the first wait, runs at once: workers killed just before
        this call are not reported lost nor restarted."""
        first = not self.closing
        self.closing = True
        if first:
            for w in self.workers.values():
                if w.conn is None:
                    continue
                try:
                    self.loop.remove_reader(w.conn.fileno())
                except (ValueError, OSError):
                    pass
                try:
                    w.conn.send({"op": "shutdown"})
                except (OSError, ValueError):
                    pass
        procs = [w.process for w in self.workers.values() if w.process is not None]
        await asyncio.get_running_loop().run_in_executor(None, _wait_all, procs, grace_s)
        for p in procs:
            if p.is_alive():
                p.kill()
        # SIGKILL cannot be refused, but a busy kernel may take seconds to tear down a process
        # holding a large address space: wait for it (bounded), so close() returns with none alive
        await asyncio.get_running_loop().run_in_executor(None, _wait_all, procs, 30.0)


def _wait_all(procs: list, timeout: float) -> None:
    """Block until every process has exited or ``timeout`` passed (all waited on together)."""
    deadline = time.monotonic() + timeout
    pending = [p.sentinel for p in procs if p.is_alive()]
    while pending and (left := deadline - time.monotonic()) > 0:
        done = mp_connection.wait(pending, timeout=left)
        pending = [s for s in pending if s not in done]
    for p in procs:
        if p.sentinel not in pending:
            # Its sentinel fired: the process has closed its files and is exiting. It may not be a
            # zombie yet (a busy kernel can preempt it between closing its files and its exit), so
            # is_alive() could still say True: join with a timeout does a blocking waitpid and reaps it.
            p.join(5.0)
