"""The worker as a Ray actor: the same worker code as a local process (``process.run_worker``),
with its messages carried by actor calls instead of a pipe.

Server -> worker: ``send(gen, seq, msg)``. A threaded actor may start calls out of order, so each
message carries a sequence number and the actor hands them to the worker strictly in order.
Worker -> server, one of two transports (the pool picks one):

- ``next_messages(gen, max_wait_s)``, a long poll (the one Ray Client can carry): it blocks until
  at least one message is ready and returns all that are; the pool keeps one such call outstanding
  per actor. An empty list means ``max_wait_s`` passed with nothing to say (the bound keeps a call
  that nobody awaits any more from holding one of the actor's threads).
- ``stream(gen)``, a streaming generator (the default over a direct connection): every message is
  yielded the moment the worker emits it.

Either way progress, results and heartbeats reach the server's event loop as they happen.

``gen`` is the attachment: a restarted server attaches to a surviving (named, detached) actor with
a higher one. The actor then forgets the old server's stream or poll and its batches (their messages
would describe batches the new server never dispatched), and the new server says ``hello`` so the
worker starts clean and announces itself again. The worker finishes what it had been given first
(the ``hello`` waits behind it), so before attaching, a new server asks ``in_flight()`` which jobs
those are: it holds them until the worker is ready again and adopts their outputs instead of
running them a second time. Jobs the worker finished that no server heard of count as in flight
too; the timings of their ``job_done`` ride on that ``ready`` (``finished_before``), so an adopted
job keeps its inference time and the server's downtime shows as its own stage.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any

import ray

_END = None  # on a stream's queue: the stream is over (worker shut down, or a newer attachment)
TIMINGS = ("inference_start", "inference_end", "output_written")  # of a job_done kept for the next server


def _memory_share(node_id: str, device_resource: str) -> int:
    """A CPU worker's budget when none is configured: its node's memory over the device units there."""
    units = next((n["Resources"].get(device_resource, 1) for n in ray.nodes() if n["NodeID"] == node_id), 1)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 << 30
    return int(total // max(1, units))


class WorkerActor:
    def __init__(self, worker_id: str, results: dict[str, Any], threads: int, heartbeat_s: float,
                 memory_budget: int, host_cache_bytes: int, model_cache: str, device_resource: str) -> None:
        self.lock = threading.Lock()
        self.gen = 0
        self.told_placed = False  # the current attachment's poll has said where the actor runs
        self.outbox: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        self.next_seq = 0
        self.held: dict[int, dict[str, Any]] = {}  # arrived early: waits for the ones before it
        self.batches: set[str] = set()  # dispatched by the current attachment
        self.active: dict[str, list[str]] = {}  # batch id -> its job ids, until it ends (any attachment)
        # job id -> timings of a job_done the old server never got (its batch outlived the server);
        # they ride on the next ``ready``, so the new server that adopts the output keeps them.
        self.finished_before: dict[str, dict[str, float]] = {}
        ctx = ray.get_runtime_context()
        gpus = ray.get_gpu_ids()
        # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU, so it is always cuda:0 from in here.
        device = "cuda:0" if gpus else "cpu"
        self.where = {"node": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "device": device}
        os.environ["GENSERVE_MODEL_CACHE"] = model_cache
        if not memory_budget and not gpus:
            memory_budget = _memory_share(ctx.get_node_id(), device_resource)
        args = (worker_id, device, results, threads, heartbeat_s, None, memory_budget, host_cache_bytes,
                {"node": self.where["node"], "node_ip": self.where["node_ip"]})
        threading.Thread(target=self._main, args=args, daemon=True, name="genserve-worker").start()

    def _main(self, *args: Any) -> None:
        from .process import run_worker

        try:
            run_worker(self.inbox.get, self._emit, *args)
        finally:
            with self.lock:
                self.outbox.put(_END)

    def _emit(self, msg: dict[str, Any]) -> None:
        with self.lock:
            bid = msg.get("batch_id")
            if msg.get("ev") in ("batch_done", "batch_failed"):
                self.active.pop(bid, None)
            if bid is not None and bid not in self.batches:
                # A batch of a server that is gone: the new one holds its jobs, adopts their outputs.
                self._keep_timings(msg)
                return
            if msg.get("ev") == "ready" and self.finished_before:
                msg, self.finished_before = {**msg, "finished_before": self.finished_before}, {}
            self.outbox.put(msg)

    def _keep_timings(self, msg: dict[str, Any] | None) -> None:
        if msg is not None and msg.get("ev") == "job_done":
            self.finished_before[msg["job_id"]] = {k: msg[k] for k in TIMINGS}

    def _attach(self, gen: int) -> None:
        """Called with the lock held: a newer server takes over."""
        if gen <= self.gen:
            return
        if self.gen:  # a fresh actor's first server keeps what the worker said already (its ``ready``)
            # What the old server never read: results among it are kept for the new one's adoption.
            while not self.outbox.empty():
                self._keep_timings(self.outbox.get_nowait())
            self.outbox.put(_END)  # ends the old stream or poll, if one is still open
            self.outbox = queue.Queue()
        self.gen, self.told_placed = gen, False
        self.next_seq, self.held, self.batches = 0, {}, set()

    def send(self, gen: int, seq: int, msg: dict[str, Any]) -> None:
        from . import protocol as P

        with self.lock:
            self._attach(gen)
            if gen < self.gen:
                return
            self.held[seq] = msg
            while self.next_seq in self.held:
                m = self.held.pop(self.next_seq)
                self.next_seq += 1
                if m["op"] == P.RUN:
                    self.batches.add(m["batch_id"])
                    self.active[m["batch_id"]] = [j["id"] for j in m["jobs"]]
                elif m["op"] == P.JOIN and m["batch_id"] in self.active:
                    self.active[m["batch_id"]] += [j["id"] for j in m["jobs"]]
                self.inbox.put(m)

    def in_flight(self) -> list[str]:
        """The jobs of every batch the worker was given and has not finished (done or failed), and
        those it finished that no server has heard of: the new server holds them all until the
        worker's next ``ready``, which carries the timings of the finished ones."""
        with self.lock:
            unread = [m["job_id"] for m in list(self.outbox.queue) if m is not _END and m.get("ev") == "job_done"]
            return [j for jobs in self.active.values() for j in jobs] + list(self.finished_before) + unread

    @ray.method(num_returns="streaming")
    def stream(self, gen: int):
        with self.lock:
            self._attach(gen)
            q = self.outbox if gen == self.gen else None
        if q is None:
            return
        yield {"ev": "placed", **self.where}
        while True:
            msg = q.get()
            if msg is _END:
                return
            yield msg

    def next_messages(self, gen: int, max_wait_s: float) -> tuple[list[dict[str, Any]], bool]:
        """The long-poll transport: (the messages ready now, waiting up to ``max_wait_s`` for the
        first one; whether the stream of messages is over). Over means the worker ended or a newer
        attachment took over, as when a stream ends."""
        with self.lock:
            self._attach(gen)
            if gen != self.gen:
                return [], True
            q, placed, self.told_placed = self.outbox, not self.told_placed, True
        return drain(q, [{"ev": "placed", **self.where}] if placed else [], max_wait_s)


def drain(q: queue.Queue, out: list[dict[str, Any]], max_wait_s: float) -> tuple[list[dict[str, Any]], bool]:
    """``out`` and every message ready on ``q``, waiting up to ``max_wait_s`` for the first one when
    ``out`` is empty; and whether the stream ended (``_END`` came; it is not returned)."""
    try:
        msg = q.get_nowait() if out else q.get(timeout=max_wait_s)
        while True:
            if msg is _END:
                return out, True
            out.append(msg)
            msg = q.get_nowait()
    except queue.Empty:
        return out, False
