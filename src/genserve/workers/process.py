"""Worker process main: one per device. Loads pipelines on demand and runs batches."""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..engine.types import ErrorCode, classify_exception
from . import protocol as P
from .faults import FaultInjector

# The thread pools a worker's libraries size from the environment when they load (OpenMP, MKL,
# OpenBLAS, numexpr, Accelerate): read once, at import, so they must be set before torch is imported.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS")


def limit_threads(threads: int) -> None:
    """Size every thread pool of this process to ``threads`` (0: leave the libraries' defaults) and
    make idle OpenMP threads sleep instead of spinning (unless the environment already says).
    Called by both pools' workers before torch is imported.

    Why passive: OpenMP threads spin at every barrier by default. On a machine whose cores are
    busy with other work, a worker with 2 threads on 2 cores then waits for a descheduled peer at
    each of thousands of barriers per step: an 8-step demo batch took 18.5 s (median) against 0.2 s
    with OMP_WAIT_POLICY=PASSIVE or with one thread (benchmarks/RESULTS.md, issue 22.8). That, not
    the transport, was why a Ray actor (1 thread: Ray sets OMP_NUM_THREADS to its CPUs) ran the
    same job 25x faster than a local worker (2 threads) on a loaded 2-core machine."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads > 0:
        for key in THREAD_ENV:
            os.environ[key] = str(threads)


def worker_main(conn: Connection, worker_id: str, device: str, results: dict[str, Any] | str, threads: int,
                heartbeat_s: float = 2.0, faults: dict[str, Any] | None = None,
                memory_budget: int = 0, host_cache_bytes: int = 0) -> None:
    """A local worker process: messages over a multiprocessing pipe."""
    import signal

    # SIGINT / SIGTERM sent to the whole process group (Ctrl+C in a terminal, systemd's default
    # KillMode) are the server's to handle: it drains, then asks workers to exit. A worker ends on
    # "shutdown", when its pipe closes (the server is gone), or when killed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    send_lock = threading.Lock()

    def emit(msg: dict[str, Any]) -> None:
        with send_lock:
            conn.send(msg)

    run_worker(conn.recv, emit, worker_id, device, results, threads, heartbeat_s, faults, memory_budget,
               host_cache_bytes)


def run_worker(recv: Callable[[], dict[str, Any]], emit: Callable[[dict[str, Any]], None], worker_id: str,
               device: str, results: dict[str, Any] | str, threads: int, heartbeat_s: float = 2.0,
               faults: dict[str, Any] | None = None, memory_budget: int = 0, host_cache_bytes: int = 0,
               ready_info: dict[str, Any] | None = None) -> None:
    """The worker, whatever carries its messages (a pipe, a Ray actor): ``recv()`` blocks for the
    next op and raises EOFError when the server is gone; ``emit`` is thread-safe. Returns on
    shutdown. ``results`` is a result-store spec (``open_store``): outputs go straight there."""
    import warnings

    # Library deprecation noise is hidden; diffusers' own warnings (a size it will round, an input
    # it ignores) reach the log: they are how a misconfigured model shows itself.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    limit_threads(threads)
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # torch ran parallel work in this process already (a reused Ray worker)
            pass
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_warning()
    dlogging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from ..backends.runner import BatchAborted, PipelineRunner
    from ..backends.step_runner import run_grouped, run_steps, step_driver
    from ..storage.open import open_store

    inbox: queue.Queue = queue.Queue()
    joins: queue.Queue = queue.Queue()  # step-level batching: read between steps of a running set
    canceled: set[str] = set()
    pausing: set[str] = set()  # step mode: jobs to take out of the running set at the next boundary
    parked: dict = {}  # step mode: paused jobs' slots (latents, own scheduler), resumed by a later run/join

    def reader() -> None:
        # Cancels must be seen while the main thread is inside a pipeline call, so a thread reads.
        while True:
            try:
                msg = recv()
            except (EOFError, OSError):
                os._exit(0)  # the server is gone: never outlive it
            if msg["op"] == P.CANCEL:
                canceled.update(msg["job_ids"])
            elif msg["op"] == P.JOIN:
                joins.put(msg)
            elif msg["op"] == P.PAUSE:
                pausing.update(msg["job_ids"])
            else:
                inbox.put(msg)

    def heartbeat() -> None:
        # From its own thread, so a worker busy inside a long step still counts as alive; "hung"
        # is judged by step progress, not by heartbeats.
        while True:
            time.sleep(heartbeat_s)
            try:
                emit({"ev": "heartbeat", "t": time.time()})
            except (OSError, ValueError):
                os._exit(0)

    threading.Thread(target=reader, daemon=True, name="genserve-reader").start()
    threading.Thread(target=heartbeat, daemon=True, name="genserve-heartbeat").start()
    injector = FaultInjector(faults)
    runner = PipelineRunner(device, open_store(results), host_cache_bytes)

    def ready() -> None:
        emit({"ev": "ready", "worker": worker_id, "device": device, "pid": os.getpid(),
              "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
              "thread_env": {k: os.environ.get(k) for k in (*THREAD_ENV, "OMP_WAIT_POLICY")}, "capacity_bytes": runner.capacity(memory_budget),
              "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",  # prices
              **(ready_info or {})})

    ready()
    failed_loads: dict[str, str] = {}

    def unloads_between_steps() -> None:
        # The engine may evict an idle model to make room for a growing running set: unloads at the
        # head of the inbox run between steps (only the head, so they keep their order with loads).
        while True:
            with inbox.mutex:
                if not inbox.queue or inbox.queue[0]["op"] != P.UNLOAD:
                    return
                msg = inbox.queue.popleft()
            emit({"ev": "unloaded", **runner.unload(msg["model"])})

    while True:
        msg = inbox.get()
        op = msg["op"]
        if op == P.SHUTDOWN:
            return
        if op == P.HELLO:  # a new server attached: it knows nothing of us, so start from a clean slate
            for model in list(runner.pipes):
                runner.unload(model)
            parked.clear()  # paused jobs' latents belonged to the old server's bookkeeping
            pausing.clear()
            ready()
            continue
        if op == P.LOAD:
            model = msg["model"]
            try:
                injector.on_load(model)
                info = _load(runner, model, msg["spec"])
                failed_loads.pop(model, None)
                emit({"ev": "loaded", **info})
            except Exception as e:  # any load error is reported, never fatal to the worker
                failed_loads[model] = f"{type(e).__name__}: {e}"
                emit({"ev": "load_failed", "model": model, "code": ErrorCode.MODEL_LOAD_FAILED.value,
                      "message": failed_loads[model]})
        elif op == P.UNLOAD:
            emit({"ev": "unloaded", **runner.unload(msg["model"])})
        elif op == P.RUN:
            batch_id = msg["batch_id"]
            seen = {j["id"] for j in msg["jobs"]}  # step mode adds the jobs that join
            try:
                if msg["model"] not in runner.pipes:
                    raise RuntimeError(failed_loads.get(msg["model"], f"model {msg['model']} is not loaded"))
                injector.on_batch(len(msg["jobs"]), [j["prompt"] for j in msg["jobs"]])
                if msg.get("mode") != "step":
                    peak = runner.run(msg, emit, canceled, on_step=injector.on_step)
                elif step_driver(runner, msg["model"]) is not None and all(
                        (j.get("task") or "text") == "text" for j in msg["jobs"]):  # the step loop: text only
                    peak = run_steps(runner, msg, emit, canceled, joins, seen, injector.on_step, msg["max_size"],
                                     between=unloads_between_steps, pausing=pausing, parked=parked)
                else:
                    peak = run_grouped(runner, msg, emit, canceled, injector.on_step)
                # Unmeasured (CPU): the family's estimate goes as a hint, never as a measurement.
                estimate = 0 if peak or msg.get("mode") == "step" else runner.estimated_bytes(msg)
                emit({"ev": "batch_done", "batch_id": batch_id, "t": time.time(), "peak_bytes": peak,
                      "estimated_bytes": estimate, "compiles": runner.compiles,
                      "loras": runner.loras.cache.resident()})
            except BatchAborted:
                emit({"ev": "batch_done", "batch_id": batch_id, "t": time.time()})
            except Exception as e:
                code = ErrorCode.MODEL_LOAD_FAILED if msg["model"] in failed_loads else classify_exception(e)
                traceback.print_exc()
                emit({"ev": "batch_failed", "batch_id": batch_id, "code": code.value, "message": f"{type(e).__name__}: {e}"})
            finally:
                canceled.difference_update(seen)
                pausing.difference_update(seen)



def _load(runner: Any, model: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Load ``model``; an ``s3://`` source is first fetched into this node's cache (load tier
    ``remote`` for the load that downloaded it, timed from the start of the download)."""
    if "source" not in spec or model in runner.pipes:
        return runner.load(model, spec)
    from ..storage.model_cache import fetch_model

    t0 = time.time()
    path, downloaded = fetch_model(spec["source"], spec.get("cache"), endpoint_url=spec.get("endpoint_url"),
                                   region=spec.get("region"))
    info = runner.load(model, {**spec, "path": str(path)})
    if downloaded and not info.get("cached"):
        info.update(tier="remote", load_start=t0)
    return info
