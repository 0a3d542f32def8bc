"""The fleet as the server sees it: the pool's workers joined with the engine's scheduling state
(``FleetView`` for the API and the observer), what workers last reported about their memory,
recent residency changes, and which dispatched batches still wait for their model to load."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...engine import Engine
from ...workers.base import Pool
from ..jobs.cost import device_type
from ..jobs.views import ResidentView, WorkerView

RESIDENCY_LOG = 500  # residency changes kept in memory


class FleetState:
    def __init__(self, engine: Engine, pool: Pool, prices: Mapping[str, float]) -> None:
        self.engine = engine
        self.pool = pool
        self.prices = prices
        self._reported: dict[str, dict[str, Any]] = {}  # worker -> what it last said of its memory
        self._log: list[dict[str, Any]] = []  # recent loads/unloads, newest last
        self._awaiting_load: dict[str, tuple[str, str, tuple[str, ...]]] = {}  # batch -> (worker, model, jobs)

    # ---- what workers said ------------------------------------------------------------------------

    def worker_ready(self, worker_id: str) -> None:
        self._reported[worker_id] = {"used_bytes": 0, "resident": []}

    def worker_gone(self, worker_id: str) -> None:
        self._reported.pop(worker_id, None)

    def unloaded(self, worker_id: str, msg: Mapping[str, Any]) -> None:
        self._reported[worker_id] = {"used_bytes": msg["used_bytes"], "resident": msg["resident"]}

    def loaded(self, worker_id: str, msg: Mapping[str, Any], now: float) -> list[tuple[str, ...]]:
        """A load finished. Returns the job ids of each batch that was waiting for it."""
        if not msg.get("cached"):
            self.log(now, "load", worker_id, msg["model"], tier=msg["tier"], bytes=msg["bytes"],
                     seconds=round(msg["load_end"] - msg["load_start"], 4))
            rep = self._reported.setdefault(worker_id, {"used_bytes": 0, "resident": []})
            rep["used_bytes"] += msg["bytes"]
            rep["resident"] = sorted({*rep["resident"], msg["model"]})
        waited = []
        for batch_id, (worker, model, job_ids) in list(self._awaiting_load.items()):
            if worker == worker_id and model == msg["model"]:
                waited.append(job_ids)
                del self._awaiting_load[batch_id]
        return waited

    def log(self, now: float, action: str, worker: str, model: str, **info: Any) -> None:
        self._log.append({"t": now, "action": action, "worker": worker, "model": model, **info})
        del self._log[:-RESIDENCY_LOG]

    # ---- batches waiting for a load -----------------------------------------------------------------

    def await_load(self, batch_id: str, worker: str, model: str, job_ids: tuple[str, ...]) -> None:
        self._awaiting_load[batch_id] = (worker, model, job_ids)

    def batch_over(self, batch_id: str) -> None:
        self._awaiting_load.pop(batch_id, None)

    # ---- FleetView --------------------------------------------------------------------------------

    def device_type(self, worker_id: str) -> str:
        h = self.pool.workers.get(worker_id)
        return device_type(h.device, h.info.get("device_name"), self.prices) if h is not None else "cpu"

    def up_workers(self) -> list[tuple[str, str, bool, frozenset[str]]]:
        out = []
        for wid, h in self.pool.workers.items():
            st = self.engine.workers.get(wid)
            if st is not None and h.ready:
                out.append((wid, self.device_type(wid), not st.idle, frozenset(st.resident)))
        return out

    def worker_views(self, now: float) -> list[WorkerView]:
        out = []
        for wid, h in self.pool.workers.items():
            st = self.engine.workers.get(wid)
            dtype = self.device_type(wid)
            node, name = h.info.get("node"), h.info.get("device_name")
            if st is None or not h.ready:
                out.append(WorkerView(wid, h.device, dtype, h.state, False, h.quarantined, h.restarts, len(h.exits),
                                      node=node, device_name=name, node_ip=h.info.get("node_ip")))
                continue
            batch = self.engine.running_batch(st.batch_id) if st.batch_id is not None else None
            out.append(WorkerView(
                wid, h.device, dtype, "busy" if not st.idle else ("loading" if st.loading else "idle"), True,
                h.quarantined, h.restarts, len(h.exits), h.info.get("pid"), st.capacity, st.used,
                self._reported.get(wid, {}).get("used_bytes"), round(st.busy.utilization(now), 4), st.batch_id,
                tuple(ResidentView(m, r.bytes, r.last_used, r.pinned, r.loading) for m, r in sorted(st.resident.items())),
                node, name, len(batch.jobs) if batch is not None else 0,
                batch.key.model if batch is not None else None, node_ip=h.info.get("node_ip"),
                resident_loras=tuple({"id": i, "bytes": n} for i, n in self.engine.resident_loras(wid).items())))
        return out

    def queue_depth(self, model: str) -> int:
        return self.engine.queue_depth(model)

    def jobs_waiting_for_loads(self) -> list[tuple[str, str, int]]:
        return [(model, worker, len(jobs)) for worker, model, jobs in self._awaiting_load.values()]

    def residency_changes(self) -> list[dict[str, Any]]:
        return self._log[-50:]
