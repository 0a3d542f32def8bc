"""Read models: the small interfaces through which the HTTP app and the observer see the system,
instead of reaching into the runtime's attributes. The runtime implements ``Control``,
``FleetState`` (fleet.py) ``FleetView``, and the job store ``JobReader``."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # types only: no import of the runtime at run time
    from ..requests import JobParams
    from .jobstore import Page

Record = dict[str, Any]


@dataclass(frozen=True)
class ResidentView:
    model: str
    bytes: int
    last_used: float
    warm_pool: bool
    loading: bool


@dataclass(frozen=True)
class WorkerView:
    """One worker as the pool and the engine know it, joined once (``FleetView.worker_views``)."""

    id: str
    device: str
    device_type: str  # price-table key (H100, cpu, …)
    state: str  # starting | restarting | quarantined (not up) · idle | loading | busy (up)
    up: bool  # the engine schedules on it
    quarantined: bool
    restarts: int
    exits: int
    pid: int | None = None
    capacity_bytes: int | None = None
    used_bytes: int = 0
    reported_used_bytes: int | None = None  # what the worker itself last said it holds
    utilization: float = 0.0
    batch_id: str | None = None
    resident: tuple[ResidentView, ...] = ()
    node: str | None = None  # where it runs: the Ray node id on a cluster, None on this machine
    device_name: str | None = None  # what the device says it is (GPU model, or "cpu")
    running_jobs: int = 0  # jobs in its running batch (step-level batching: the running set's size now)
    running_model: str | None = None
    node_ip: str | None = None  # the Ray node's address on a cluster (None on this machine)
    resident_loras: tuple[dict[str, Any], ...] = ()  # LoRA adapters it holds: {id, bytes}, least recently used first

    @property
    def busy(self) -> bool:
        return self.batch_id is not None

    def to_dict(self) -> dict[str, Any]:
        if not self.up:  # starting, restarting or quarantined
            return {"id": self.id, "device": self.device, "state": self.state, "quarantined": self.quarantined,
                    "restarts": self.restarts, "exits": self.exits, "resident_models": [], "resident_loras": [], "node": self.node,
                    "node_ip": self.node_ip,
                    "device_name": self.device_name, "device_type": self.device_type}
        d = asdict(self)
        d.pop("up")
        d["resident_models"] = d.pop("resident")
        d["free_bytes"] = None if self.capacity_bytes is None else self.capacity_bytes - self.used_bytes
        return d


class FleetView(Protocol):
    def worker_views(self, now: float) -> list[WorkerView]: ...
    def up_workers(self) -> list[tuple[str, str, bool, frozenset[str]]]:
        """(id, device type, busy, resident models) of the workers the engine schedules on: the
        cheap subset of ``worker_views`` the observer needs after every engine step."""
        ...
    def queue_depth(self, model: str) -> int: ...
    def jobs_waiting_for_loads(self) -> list[tuple[str, str, int]]:
        """(model, worker, jobs) of dispatched batches still waiting for their model to load."""
        ...
    def residency_changes(self) -> list[dict[str, Any]]: ...


class JobReader(Protocol):
    def get(self, job_id: str) -> Record | None: ...
    def get_by_client_id(self, client_id: str, tenant: str = ...) -> Record | None: ...
    def recent(self, limit: int = 50, tenant: str | None = None, status: str | None = None,
               model: str | None = None) -> list[Record]: ...
    def page(self, limit: int, *, after: str | None = ..., order: str = ..., tenant: str | None = ...,
             status: str | None = ..., models: tuple[str, ...] | None = ...) -> "Page":
        """A page of jobs in submission order after the cursor job ``after`` (KeyError: no such job)."""
        ...
    def queued_count(self, tenant: str) -> int: ...
    def usage(self, since: float, tenant: str | None = None) -> list[Record]: ...
    def active_since(self, since: float, limit: int = 100_000) -> list[Record]: ...
    def attempts(self, job_id: str) -> list[Record]: ...
    def deliveries(self, job_id: str) -> list[Record]: ...


class Control(Protocol):
    """What the API asks of the runtime."""

    @property
    def ready(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    def worker_readiness(self) -> dict[str, bool]: ...
    def submit(self, params: "JobParams", client_id: str | None, tenant: str = ...,
               job_id: str | None = ...) -> tuple[Record, bool]: ...
    def submit_many(self, params: list["JobParams"], tenant: str = ...) -> list[Record]: ...
    def cancel(self, job_id: str) -> Record | None: ...
    def delete_job(self, job_id: str) -> bool: ...
    def kick(self) -> None: ...
    def load_model(self, model: str, worker: str | None) -> list[str]: ...
    def unload_model(self, model: str, worker: str | None) -> list[str]: ...
    def queue_position(self, job_id: str) -> int | None: ...
    def progress(self, job_id: str) -> tuple[int, int] | None: ...
