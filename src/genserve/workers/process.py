"""Worker process main: one per device. Loads pipelines on demand and runs batches."""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from ..engine.errors import ErrorCode, classify_exception
from . import protocol as P
from .faults import FaultInjector


def worker_main(conn: Connection, worker_id: str, device: str, results_dir: str, threads: int,
                heartbeat_s: float = 2.0, faults: dict[str, Any] | None = None,
                memory_budget: int = 0, host_cache_bytes: int = 0) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from ..backends.runner import BatchAborted, PipelineRunner
    from ..storage import LocalResultStore

    send_lock = threading.Lock()

    def emit(msg: dict[str, Any]) -> None:
        with send_lock:
            conn.send(msg)

    inbox: queue.Queue = queue.Queue()
    canceled: set[str] = set()

    def reader() -> None:
        # Cancels must be seen while the main thread is inside a pipeline call, so a thread reads.
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the server is gone: never outlive it
            if msg["op"] == P.CANCEL:
                canceled.update(msg["job_ids"])
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
    runner = PipelineRunner(device, LocalResultStore(results_dir), host_cache_bytes)
    emit({"ev": "ready", "worker": worker_id, "device": device, "pid": os.getpid(), "threads": torch.get_num_threads(),
          "capacity_bytes": runner.capacity(memory_budget),
          "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"})  # prices by GPU type
    failed_loads: dict[str, str] = {}
    while True:
        msg = inbox.get()
        op = msg["op"]
        if op == P.SHUTDOWN:
            return
        if op == P.LOAD:
            model = msg["model"]
            try:
                injector.on_load(model)
                info = runner.load(model, msg["spec"])
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
            try:
                if msg["model"] not in runner.pipes:
                    raise RuntimeError(failed_loads.get(msg["model"], f"model {msg['model']} is not loaded"))
                injector.on_batch(len(msg["jobs"]), [j["prompt"] for j in msg["jobs"]])
                peak = runner.run(msg, emit, canceled, on_step=injector.on_step)
                emit({"ev": "batch_done", "batch_id": batch_id, "t": time.time(), "peak_bytes": peak})
            except BatchAborted:
                emit({"ev": "batch_done", "batch_id": batch_id, "t": time.time()})
            except Exception as e:
                code = ErrorCode.MODEL_LOAD_FAILED if msg["model"] in failed_loads else classify_exception(e)
                traceback.print_exc()
                emit({"ev": "batch_failed", "batch_id": batch_id, "code": code.value, "message": f"{type(e).__name__}: {e}"})
            finally:
                canceled.difference_update(j["id"] for j in msg["jobs"])

