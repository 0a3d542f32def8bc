"""What the runtime needs of a pool of workers, whatever runs them: local processes
(``LocalPool``), an in-memory fake for tests (``FakePool``), Ray actors later.

A pool starts, watches and restarts workers and delivers what they say through two callbacks on
the event loop: ``on_message(worker_id, msg)`` (the protocol's ``ev`` messages) and
``on_exit(worker_id, exit_code)`` (a worker died; not called for one retired on purpose).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

OnMessage = Callable[[str, dict[str, Any]], None]
OnExit = Callable[[str, int | None], None]


@dataclass
class WorkerHandle:
    """The pool's view of one worker (the engine keeps its own scheduling state)."""

    id: str
    device: str
    process: Any = None
    conn: Any = None
    ready: bool = False
    restarts: int = 0  # also the process's "life" number, which fault injection keys on
    exits: list[float] = field(default_factory=list)
    quarantined: bool = False
    retiring: bool = False  # scaled down: asked to shut down, not to be restarted
    info: dict[str, Any] = field(default_factory=dict)  # its "ready" message: pid, device name, capacity

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def state(self) -> str:
        if self.quarantined:
            return "quarantined"
        return "ready" if self.ready else ("starting" if self.alive else "restarting")


class Pool(Protocol):
    workers: Mapping[str, WorkerHandle]

    def start(self) -> None: ...
    async def close(self) -> None: ...
    def send(self, worker_id: str, msg: dict[str, Any]) -> None: ...
    def kill(self, worker_id: str) -> None: ...
    def retire(self, worker_id: str) -> None: ...
    def add_worker(self, device: str) -> str: ...
    def active(self) -> list[WorkerHandle]: ...
    def in_flight(self) -> dict[str, str]: ...  # after start: job id -> worker still running it (re-attached)


PoolFactory = Callable[[list[str], OnMessage, OnExit], Pool]
