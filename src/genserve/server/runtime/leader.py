"""``genserve serve --role engine``: engines elect one leader through the database; the leader runs
the runtime (engine + worker pool), the others stand by (docs/ha.md).

Election: ``pg_advisory_lock`` on a dedicated connection. A standby's call simply waits in the
server until the lock is free (no polling); PostgreSQL frees it the moment the leader's session
ends, and a leader killed with ``kill -9`` ends its session when the kernel closes its socket, so a
standby leads within milliseconds of the death being visible to the database (a leader cut off by
the network: once TCP keepalives give up, see docs/ha.md). A leader that loses its lock connection
can no longer know it leads: it exits at once (status 75) and its supervisor restarts it as a
standby, rather than ever having two leaders write.

Leading: the runtime starts as after a restart (running jobs of the old leader requeued as a failed
attempt unless their output is there, which is adopted, queued ones re-entered in their order),
then new jobs and cancels arrive over LISTEN (bus.JOBS, bus.CANCELS) with a bounded catch-up read
after each (re)connect; job events leave over NOTIFY (bus.EventPublisher) to every gateway.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import psycopg

from ...config.load import Config
from ..jobs.store import bus
from ..jobs.store.postgres import PgJobStore
from ..status import JobStatus, is_terminal
from .runtime import Runtime

log = logging.getLogger("genserve.leader")

LEADER_LOCK = 0x67656E_0002  # the advisory lock key: one leading engine per database
CATCH_UP_MAX = 10_000  # queued jobs read back after a (re)connect of the intake
LOST_LEADERSHIP_EXIT = 75  # EX_TEMPFAIL: the supervisor restarts the engine, as a standby


class EngineRole:
    role = "engine"

    def __init__(self, config: Config, *, runtime_factory=None, exit=os._exit) -> None:
        assert config.store.backend == "postgres" and config.store.dsn, "an engine role needs [store] backend = postgres"
        self.config = config
        self.dsn = config.store.dsn
        self._make_runtime = runtime_factory or (lambda: Runtime(config))
        self._exit = exit
        self.runtime: Runtime | None = None  # set once leading
        self._prepared: Runtime | None = None
        self.standing_by = False  # built and waiting on the lock
        self.leader = False
        self.became_leader_at: float | None = None
        self._task: asyncio.Task | None = None
        self._intake: bus.Listen | None = None
        self._lock_conn: psycopg.AsyncConnection | None = None

    @property
    def ready(self) -> bool:
        """A standby once it waits on the lock with its runtime built (ready to take over at once);
        the leader once its runtime is."""
        if self.leader:
            return self.runtime is not None and self.runtime.ready
        return self.standing_by

    @property
    def draining(self) -> bool:
        return self.runtime is not None and self.runtime.draining

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._lead())
        self._task.add_done_callback(self._lead_ended)

    def _lead_ended(self, task: asyncio.Task) -> None:
        """Leading ends only by exiting or closing: a failure to start leading must not leave an
        engine that holds the lock and runs nothing."""
        if not task.cancelled() and task.exception() is not None:
            log.error("leading failed: exiting", exc_info=task.exception())
            self._exit(LOST_LEADERSHIP_EXIT)

    async def _lead(self) -> None:
        # A warm standby: the runtime is built before waiting (devices probed in a child process,
        # store pool open), so taking over only starts it. Built off the loop: /readyz answers meanwhile.
        prepared = self._prepared = await asyncio.get_running_loop().run_in_executor(None, self._make_runtime)
        try:
            # Keepalives: a leader cut off by the network loses the lock (and exits) within ~15 s.
            self._lock_conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3)
            log.info("engine %d: waiting for the leader lock", os.getpid())
            self.standing_by = True
            await self._lock_conn.execute("SELECT pg_advisory_lock(%s)", (LEADER_LOCK,))
        except psycopg.Error:
            log.exception("cannot reach the database for the leader election")
            self._exit(LOST_LEADERSHIP_EXIT)
            return
        self.leader, self.standing_by, self.became_leader_at = True, False, time.time()
        log.warning("engine %d: leading", os.getpid())
        rt = self.runtime = prepared
        store = rt.store
        assert isinstance(store, PgJobStore)
        rt.listeners.append(bus.EventPublisher(store.notify))
        await rt.start()
        self._intake = bus.Listen(self.dsn, (bus.JOBS, bus.CANCELS), self._on_notify, self._catch_up)
        self._intake.start()
        await self._watch_lock()

    async def _watch_lock(self) -> None:
        """Leaders hold the lock as long as its connection lives: wait on it; if it breaks, exit."""
        assert self._lock_conn is not None
        try:
            async for _ in self._lock_conn.notifies():  # nothing is sent here; returns or raises on loss
                pass
        except psycopg.Error as e:
            log.error("leader lock connection lost (%s): exiting so that exactly one engine leads", e)
        else:
            log.error("leader lock connection closed: exiting so that exactly one engine leads")
        self._exit(LOST_LEADERSHIP_EXIT)

    # ---- intake ----------------------------------------------------------------------------------

    def _on_notify(self, channel: str, job_id: str) -> None:
        rt = self.runtime
        assert rt is not None
        if channel == bus.CANCELS:
            rt.cancel(job_id)
            return
        job = rt.store.get(job_id)
        if job is not None:
            self._take(job)

    def _take(self, job: dict[str, Any]) -> None:
        rt = self.runtime
        assert rt is not None
        if job["status"] != JobStatus.QUEUED or rt.engine.is_queued(job["id"]) or rt.draining:
            return
        now = rt.clock()
        rt.restore(job, now, announce=False)
        rt.kick()
        if job.get("cancel_requested"):  # asked before this engine led
            rt.cancel(job["id"])

    def _catch_up(self) -> None:
        """After LISTEN is in place: the queued jobs this leader does not hold (inserted while the
        intake was (re)connecting), and cancels asked meanwhile. Bounded: the oldest first."""
        rt = self.runtime
        assert rt is not None
        for job in rt.store.unfinished(limit=CATCH_UP_MAX):  # type: ignore[call-arg]
            if job["status"] == JobStatus.QUEUED and not rt.engine.is_queued(job["id"]):
                self._take(job)
            elif job.get("cancel_requested") and not is_terminal(job["status"]):
                rt.cancel(job["id"])

    # ---- shutdown --------------------------------------------------------------------------------

    async def drain(self, drain_s: float) -> None:
        if self.runtime is not None:
            await self.runtime.drain(drain_s)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 — closing anyway
                pass
        if self._intake is not None:
            await self._intake.close()
        if self.runtime is not None:
            await self.runtime.close()
        elif self._prepared is not None:  # a standby's, never started: only its store is open
            self._prepared.store.close()
        if self._lock_conn is not None:
            await self._lock_conn.close()  # frees the lock: a standby leads
