"""``genserve serve --role gateway``: the HTTP surface without an engine or workers (docs/ha.md).

A gateway validates, persists and reads; the leading engine (leader.py) schedules. It implements
the same surfaces the routes see of a runtime (``Control``, ``FleetView``, the job store as
``JobReader``), so the app is the one ``create_app`` builds either way:
- submit: the job row is inserted (with the tenant's ``max_queued`` counted in the same
  transaction, exact across gateways); the insert trigger wakes the leader and announces
  ``queued`` to every gateway. Acknowledged only after the commit: a gateway's death loses nothing
  it answered 202 for.
- cancel: ``cancel_requested`` is recorded and the leader woken (bus.CANCELS), one transaction.
- events: every job event arrives over LISTEN (bus.EVENTS) and feeds this gateway's event hub, so
  SSE and the OpenAI wait work for jobs submitted anywhere. After a reconnect, the jobs its streams
  follow are read back (bounded by the streams open) and a terminal event missed meanwhile is
  emitted from the record.
- what only the engine knows (queue positions, workers, residency) is not shown here: workers and
  residency are the engine's ``/metrics``; a queued job's ``queue_position`` is null on a gateway.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from ...config.auth import DEFAULT_TENANT
from ...config.load import Config
from ...storage.open import open_store
from ..jobs.events import EventHub
from ..jobs.listeners import Event, Listener
from ..jobs.loras import open_registry
from ..jobs.records import JobRecords
from ..jobs.store import bus
from ..jobs.store.interface import QueueLimitReached
from ..jobs.store.postgres import PgJobStore
from ..jobs.sweeper import Retention
from ..jobs.views import WorkerView
from ..jobs.webhooks import WebhookSender
from ..observe.observer import Observer
from ..requests import JobParams
from ..security.auth import TenantLimited
from ..security.ssrf import WebhookGuard
from ..status import JobStatus, is_terminal
from .runtime import QueueFull

log = logging.getLogger("genserve.gateway")

CATCH_UP_MAX = 1000  # records read back after a reconnect: at most this many followed jobs


class GatewayFleet:
    """A gateway's view of the fleet: it has no workers; queue depths come from the database."""

    def __init__(self, store: PgJobStore) -> None:
        self.store = store

    def worker_views(self, now: float) -> list[WorkerView]:
        return []

    def up_workers(self) -> list[tuple[str, str, bool, frozenset[str]]]:
        return []

    def queue_depth(self, model: str) -> int:
        return self.store.queued_for_model(model)

    def jobs_waiting_for_loads(self) -> list[tuple[str, str, int]]:
        return []

    def residency_changes(self) -> list[dict[str, Any]]:
        return []


class Gateway:
    role = "gateway"

    def __init__(self, config: Config, *, clock=time.time) -> None:
        assert config.store.backend == "postgres" and config.store.dsn, "a gateway needs [store] backend = postgres"
        self.config, self.clock = config, clock
        s = config.server
        self.store = PgJobStore(config.store.dsn, config.store.pool_size)
        self.results = open_store(config.results.spec(s.data_dir))
        self.loras = open_registry(config, self.results)  # the shared database's table (docs/lora.md)
        self.events = EventHub()
        self.fleet = GatewayFleet(self.store)
        self.observer = Observer(config.prices, config.models, self.fleet, self.store, clock)
        # Deliveries are the leader's (it watches the job's events); here only the submit-time check.
        self.webhooks = WebhookSender(self.store, s.webhook_secret, guard=WebhookGuard(config.webhooks, own_port=s.port))
        self.retention = Retention(config.retention, self.store, self.results, self.observer.metrics.registry, clock)
        # The trigger announces a new job to every gateway: nothing to publish from here.
        self.records = JobRecords(self.store, self.results, config.models, lambda ev: None)
        self.listeners: list[Listener] = []  # create_app adds its own; gateways feed only their hub
        self._progress: dict[str, tuple[int, int]] = {}
        self._listen = bus.Listen(config.store.dsn, (bus.EVENTS,), self._on_notify, self._catch_up)
        self.draining = False

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._listen.start()
        await self._listen.connected.wait()  # ready only once events can reach this gateway's streams

    async def drain(self, drain_s: float) -> None:
        """Unready at once; nothing runs here, so only the streams are told to reconnect (elsewhere)."""
        self.draining = True
        self.events.close_streams()

    async def close(self) -> None:
        await self._listen.close()
        self.store.close()

    @property
    def ready(self) -> bool:
        return not self.draining and self._listen.connected.is_set() and self.store.ping()

    def worker_readiness(self) -> dict[str, bool]:
        """A gateway runs no workers: its readiness is the database and its event feed (``ready``)."""
        return {}

    # ---- Control ---------------------------------------------------------------------------------

    def submit(self, params: JobParams, client_id: str | None, tenant: str = DEFAULT_TENANT,
               job_id: str | None = None, *, exact_limit: bool = True) -> tuple[dict[str, Any], bool]:
        import uuid

        if client_id is not None and (existing := self.store.get_by_client_id(client_id, tenant)) is not None:
            return existing, False
        model = self.config.models[params.model]
        if self.store.queued_for_model(params.model) >= model.max_queue:
            raise QueueFull(params.model, 5.0)
        limit = self.config.access.tenant(tenant).max_queued if exact_limit else None
        job_id = job_id or uuid.uuid4().hex
        try:
            job = self.records.queued(job_id, client_id, params.to_dict(), self.clock(), tenant, max_queued=limit)
        except QueueLimitReached as e:
            raise TenantLimited(str(e), 5.0) from None
        except self.store.IntegrityError:  # another gateway stored the same client id first
            existing = self.store.get_by_client_id(client_id, tenant) if client_id is not None else None
            if existing is None:
                raise
            return existing, False
        return job, True

    def submit_many(self, params: list[JobParams], tenant: str = DEFAULT_TENANT) -> list[dict[str, Any]]:
        """Jobs that should share a batch (OpenAI ``n``). The tenant's limit was checked for all ``n``
        by the gate; they are not refused one by one (half a request accepted would be worse)."""
        model = params[0].model
        if self.store.queued_for_model(model) + len(params) > self.config.models[model].max_queue:
            raise QueueFull(model, 5.0)
        return [self.submit(p, None, tenant, exact_limit=False)[0] for p in params]

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        job = self.store.get(job_id)
        if job is None or is_terminal(job["status"]):
            return job
        self.store.request_cancel(job_id, bus.CANCELS)
        return self.store.get(job_id)

    def delete_job(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return job is not None and is_terminal(job["status"]) and self.retention.delete_job(job)

    def kick(self) -> None:
        """The insert's trigger already woke the leader."""

    def load_model(self, model: str, worker: str | None) -> list[str]:
        return []  # workers are the engine's: a gateway loads nothing (the route answers 409)

    def unload_model(self, model: str, worker: str | None) -> list[str]:
        return []

    def queue_position(self, job_id: str) -> int | None:
        return None

    def progress(self, job_id: str) -> tuple[int, int] | None:
        return self._progress.get(job_id)

    # ---- events from the leader ------------------------------------------------------------------

    def _on_notify(self, channel: str, payload: str) -> None:
        ev = bus.parse_event(payload)
        if ev is None:
            log.warning("ignored a malformed event on %s: %.200s", channel, payload)
            return
        job_id, kind, data = ev["job_id"], ev["kind"], ev.get("data") or {}
        if kind == "progress":
            self._progress[job_id] = (data.get("step"), data.get("total"))
        elif is_terminal(kind) or kind in ("retrying", "queued"):
            self._progress.pop(job_id, None)
        self.events.emit(job_id, kind, data)

    def _catch_up(self) -> None:
        """After a (re)connect: a followed job that ended while this gateway was not listening gets
        its terminal event from the record."""
        for job_id in list(self.events.subscribers)[:CATCH_UP_MAX]:
            job = self.store.get(job_id)
            if job is not None and is_terminal(job["status"]):
                data: dict[str, Any] = {"status": job["status"]}
                if job["status"] == JobStatus.FAILED:
                    data["error"] = {"code": job["error_code"], "message": job["error_message"]}
                self._on_notify(bus.EVENTS, bus.event_payload(Event(job["status"], job["t_finished"] or 0.0,
                                                                     job_id, data)))
