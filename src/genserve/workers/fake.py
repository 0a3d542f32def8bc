"""An in-memory pool (implements ``base.Pool``) for runtime tests: no processes, no torch.

The runtime talks to it exactly as to the local pool; the test plays the workers' part: it reads
what the runtime sent (``take``) and answers with protocol messages (``ready``, ``say``) or a
crash (``crash``), all synchronously on the calling thread.
"""
from __future__ import annotations

from typing import Any

from .base import OnExit, OnMessage, WorkerHandle

GIB = 1 << 30


class FakePool:
    def __init__(self, devices: list[str], on_message: OnMessage, on_exit: OnExit) -> None:
        self.on_message = on_message
        self.on_exit = on_exit
        self.workers: dict[str, WorkerHandle] = {f"w{i}": WorkerHandle(f"w{i}", d) for i, d in enumerate(devices)}
        self._next_id = len(devices)
        self.sent: list[tuple[str, dict[str, Any]]] = []  # (worker, message), oldest first, until taken
        self.killed: list[str] = []
        self.retired: list[str] = []
        self.started = self.closed = False

    # ---- the Pool protocol -------------------------------------------------------------------------

    def start(self) -> None:
        self.started = True

    async def close(self, grace_s: float = 2.0) -> None:
        self.closed = True

    def send(self, worker_id: str, msg: dict[str, Any]) -> None:
        if worker_id in self.workers:
            self.sent.append((worker_id, msg))

    def kill(self, worker_id: str) -> None:
        self.killed.append(worker_id)

    def retire(self, worker_id: str) -> None:
        if self.workers.pop(worker_id, None) is not None:
            self.retired.append(worker_id)

    def add_worker(self, device: str) -> str:
        wid = f"w{self._next_id}"
        self._next_id += 1
        self.workers[wid] = WorkerHandle(wid, device)
        return wid

    def active(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if not w.retiring and not w.quarantined]

    def in_flight(self) -> dict[str, str]:
        return {}

    # ---- the test's side: playing the workers ---------------------------------------------------------

    def ready(self, worker_id: str, capacity_bytes: int = 4 * GIB, **extra: Any) -> None:
        w = self.workers[worker_id]
        msg = {"ev": "ready", "worker": worker_id, "device": w.device, "device_name": "cpu", "pid": 0,
               "threads": 1, "capacity_bytes": capacity_bytes, **extra}
        w.ready, w.info = True, msg
        self.on_message(worker_id, msg)

    def say(self, worker_id: str, ev: str, **fields: Any) -> None:
        self.on_message(worker_id, {"ev": ev, **fields})

    def crash(self, worker_id: str, code: int | None = -9) -> None:
        self.workers[worker_id].ready = False
        self.on_exit(worker_id, code)

    def take(self, op: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Messages sent so far (only those with ``op``, when given); they are removed."""
        got = [(w, m) for w, m in self.sent if op is None or m["op"] == op]
        self.sent = [(w, m) for w, m in self.sent if not (op is None or m["op"] == op)]
        return got
