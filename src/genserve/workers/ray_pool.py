"""The Ray pool: each worker is a Ray actor holding one unit of a device resource, placed by Ray on
any node of the cluster (implements ``base.Pool``).

Ray only places and runs the workers; the engine stays the only scheduler. Ray's own retries are
off (``max_restarts=0``, ``max_task_retries=0``): an actor or node that dies is a dead worker for
the engine, which retries its batch on another one. Each actor's messages arrive on the event loop
through one asyncio task per actor, as the worker sends them: over a direct connection a streaming
actor call (``transport="stream"``, the default); through Ray Client (``ray://``), which carries no
streaming actor calls, one long-poll call kept outstanding that returns as soon as the worker has
something to say (``"poll"``; as fast in benchmarks/ray_dispatch.py). No timer, no threads in the
server. Actors are named and detached, so a server restarted after a crash finds
the workers that survived and attaches to them instead of starting new ones.
"""
from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from dataclasses import dataclass
from typing import Any

from ..engine.policies.liveness import RestartPolicy
from . import protocol as P
from .base import OnExit, OnMessage, WorkerHandle

log = logging.getLogger("genserve.ray_pool")


@dataclass
class RayWorkerHandle(WorkerHandle):
    actor: Any = None
    gen: int = 0  # this server's attachment number to the actor
    seq: int = 0  # next message number
    placed: bool = False  # Ray found it a node (until then it is "provisioning")
    running: bool = False  # its actor exists (created or attached, not lost)
    task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self.running

    @property
    def state(self) -> str:
        if self.quarantined:
            return "quarantined"
        if self.ready:
            return "ready"
        if not self.running:
            return "restarting"
        return "starting" if self.placed else "provisioning"


@dataclass(frozen=True)
class RaySettings:
    address: str = "auto"
    namespace: str = "genserve"
    name: str = "genserve"
    device_resource: str = "GPU"
    cpus_per_worker: float = 1.0
    model_cache: str = "/tmp/genserve-model-cache"
    heartbeat_s: float = 2.0
    memory_budget: int = 0
    host_cache_bytes: int = 0
    # How messages come back: "stream" (a streaming actor call), or "poll" (long polls; as fast in
    # benchmarks/ray_dispatch.py). Ray Client cannot carry streaming calls: through it, it polls anyway.
    transport: str = "stream"
    poll_wait_s: float = 10.0  # longest a poll waits with nothing to say (heartbeats come sooner)
    threads: int | None = None  # [server] worker_threads; None: the actor's CPUs (cpus_per_worker, ≥ 1)


class RayPool:
    def __init__(self, count: int, results: dict[str, Any], on_message: OnMessage, on_exit: OnExit,
                 settings: RaySettings, restart: RestartPolicy | None = None) -> None:
        self.count = count
        self.results = results
        self.on_message, self.on_exit = on_message, on_exit
        self.s = settings
        self.restart = restart or RestartPolicy()
        self.workers: dict[str, RayWorkerHandle] = {}
        self._next_id = 0
        self.closing = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._actor_cls: Any = None
        self.polls = settings.transport != "stream"  # long polls instead of a stream (decided in start)
        self._in_flight: dict[str, str] = {}  # job id -> surviving worker still running it (found at start)

    # ---- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        import ray

        from .ray_actor import WorkerActor

        self.loop = asyncio.get_running_loop()
        if not ray.is_initialized():
            term = signal.getsignal(signal.SIGTERM)
            self._connect(ray)
            signal.signal(signal.SIGTERM, term)  # ray.init takes SIGTERM over; the server's shutdown keeps it
        from ray.util.client import ray as ray_client

        client = ray_client.is_connected()
        self.polls = self.polls or client  # Ray Client: no streaming calls
        log.info("Ray pool: messages come back by %s%s", "long poll" if self.polls else "stream",
                 " through Ray Client" if client else "")
        self._actor_cls = ray.remote(WorkerActor)
        pattern = re.compile(re.escape(self.s.name) + r"-(w\d+)")
        survivors = sorted(m.group(1) for n in ray.util.list_named_actors() if (m := pattern.fullmatch(n)))
        found = []
        for wid in survivors:  # a restarted server: attach to the workers that outlived it
            try:
                found.append((wid, ray.get_actor(self._actor_name(wid))))
            except ValueError:
                continue
        # First, what each still runs for the server that died (finished before our hello), asked of
        # all at once: one that does not answer (dead, on a lost node) runs nothing; its stream says so.
        asks = [actor.in_flight.remote() for _, actor in found]
        answered = set(ray.wait(asks, num_returns=len(asks), timeout=60)[0]) if asks else set()
        for (wid, actor), ask in zip(found, asks):
            try:
                jobs = ray.get(ask) if ask in answered else []
            except Exception as e:
                log.warning("worker %s: cannot ask what it runs: %s", wid, type(e).__name__)
                jobs = []
            log.info("attaching to surviving worker %s (%d job(s) in flight)", wid, len(jobs))
            self._in_flight.update(dict.fromkeys(jobs, wid))
            w = self.workers[wid] = RayWorkerHandle(wid, "ray")
            self._attach(w, actor, hello=True)
        self._next_id = 1 + max((int(wid[1:]) for wid in self.workers), default=-1)
        for _ in range(self.count - len(self.workers)):
            self.add_worker("ray")

    def _connect(self, ray: Any, attempts: int = 5) -> None:
        for attempt in range(1, attempts + 1):
            try:
                ray.init(address=self.s.address, namespace=self.s.namespace, log_to_driver=False,
                         configure_logging=False)
                return
            except ConnectionError as e:
                # Ray Client: the head's proxy could not start this client's server process, or did
                # not within Ray's ~35 s of connection retries. Both seen as transients on a busy
                # machine (Ray 2.60: the next try starts one); a failed connect has already
                # disconnected itself, so trying again is clean.
                if attempt == attempts:
                    raise
                log.warning("Ray Client connection to %s failed (%s), trying again (%d/%d)", self.s.address,
                            str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__,
                            attempt + 1, attempts)

    def in_flight(self) -> dict[str, str]:
        """After ``start``: the jobs a surviving worker was running for a server that died (job id
        -> worker id). The worker reports each of them finished with its next ``ready``."""
        return dict(self._in_flight)

    def _actor_name(self, wid: str) -> str:
        return f"{self.s.name}-{wid}"

    def _create(self, w: RayWorkerHandle) -> None:
        resources = {} if self.s.device_resource == "GPU" else {self.s.device_resource: 1}
        threads = self.s.threads or max(1, int(self.s.cpus_per_worker))  # set as for a local worker
        actor = self._actor_cls.options(
            name=self._actor_name(w.id), namespace=self.s.namespace, lifetime="detached", get_if_exists=False,
            num_cpus=self.s.cpus_per_worker, num_gpus=1 if self.s.device_resource == "GPU" else 0,
            resources=resources, max_restarts=0, max_task_retries=0, max_concurrency=4,
        ).remote(w.id, self.results, threads, self.s.heartbeat_s, self.s.memory_budget, self.s.host_cache_bytes,
                 self.s.model_cache, self.s.device_resource)
        self._attach(w, actor, hello=False)

    def _attach(self, w: RayWorkerHandle, actor: Any, hello: bool) -> None:
        # A fresh attachment number: newer than any earlier server's (the clock is only a tie-breaker
        # across processes, never a schedule).
        w.actor, w.gen, w.seq = actor, time.time_ns(), 0
        w.running, w.placed, w.ready = True, False, False
        if hello:
            self.send(w.id, {"op": P.HELLO})
        assert self.loop is not None
        w.task = self.loop.create_task(self._consume(w, actor))

    async def _consume(self, w: RayWorkerHandle, actor: Any) -> None:
        """Deliver the actor's messages as they come; its death ends the loop."""
        try:
            async for msg in (self._polled(w, actor) if self.polls else self._streamed(w, actor)):
                if w.actor is not actor:
                    return  # replaced meanwhile
                ev = msg.get("ev")
                if ev == "placed":
                    w.placed, w.device = True, msg["device"]
                    w.info.update(node=msg["node"], node_ip=msg["node_ip"])
                    continue
                if ev == "ready":
                    w.ready = True
                    w.info.update(msg)
                self.on_message(w.id, msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # RayActorError, ActorDiedError, node death, …
            if w.actor is actor and not self.closing:
                log.warning("worker %s: actor lost: %s", w.id, type(e).__name__)
        if w.actor is actor and not self.closing:
            self._lost(w)

    @staticmethod
    async def _streamed(w: RayWorkerHandle, actor: Any):
        async for ref in actor.stream.remote(w.gen):
            yield await ref

    async def _polled(self, w: RayWorkerHandle, actor: Any):
        gen = w.gen
        ref = actor.next_messages.remote(gen, self.s.poll_wait_s)
        while True:
            # The actor's death (or its node's) raises here, as a stream's would. Shielded: cancelling
            # this task (close) must not cancel Ray Client's own future, which its reply thread sets later.
            msgs, over = await asyncio.shield(asyncio.wrap_future(ref.future()))
            if not over:  # one call always outstanding: the next is on its way while these are handled
                ref = actor.next_messages.remote(gen, self.s.poll_wait_s)
            for msg in msgs:
                yield msg
            if over:
                return

    def _lost(self, w: RayWorkerHandle) -> None:
        import ray

        actor, w.actor, w.running, w.ready, w.placed = w.actor, None, False, False, False
        for k in ("node", "node_ip"):  # until its replacement is placed, the worker runs nowhere (no stale node)
            w.info.pop(k, None)
        try:
            ray.kill(actor)  # a retired worker's actor outlives its worker thread; never leave one behind
        except Exception:
            pass
        if w.retiring:
            self.workers.pop(w.id, None)
            log.info("worker %s retired", w.id)
            return
        self.on_exit(w.id, None)
        now = time.time()
        w.exits.append(now)
        delay = self.restart.after_exit(w.exits, now)
        if delay is None:
            w.quarantined = True
            log.error("worker %s lost %d times in %gs: quarantined", w.id, len(w.exits), self.restart.window_s)
            return
        w.restarts += 1
        assert self.loop is not None
        self.loop.call_later(delay, lambda: None if self.closing or w.running or w.retiring else self._create(w))

    async def close(self) -> None:
        import ray

        self.closing = True
        for w in self.workers.values():
            if w.task is not None:
                w.task.cancel()
            if w.actor is not None:
                try:
                    ray.kill(w.actor)  # a clean stop frees the cluster's devices; only a crash leaves them
                except Exception:
                    pass

    # ---- the protocol -------------------------------------------------------------------------------

    def send(self, worker_id: str, msg: dict[str, Any]) -> None:
        w = self.workers.get(worker_id)
        if w is None or w.actor is None:
            return
        w.actor.send.remote(w.gen, w.seq, msg)
        w.seq += 1

    def kill(self, worker_id: str) -> None:
        import ray

        w = self.workers.get(worker_id)
        if w is not None and w.actor is not None:
            ray.kill(w.actor)  # its stream fails: reported as lost, like any crash

    def retire(self, worker_id: str) -> None:
        """An idle worker shuts down after what it runs. One not ready yet is canceled at once: an
        actor Ray has not placed (``provisioning``) is killed before it starts, so its device request
        is withdrawn (on KubeRay, no pod is brought up for it) and it cannot take a freed device."""
        import ray

        w = self.workers.get(worker_id)
        if w is None:
            return
        w.retiring = True
        if w.actor is not None and w.ready:
            self.send(worker_id, {"op": P.SHUTDOWN})  # after the batch it runs, if any: ops run in order
            return
        self.workers.pop(worker_id, None)
        actor, w.actor, w.running = w.actor, None, False  # its stream's end is then not a loss (_consume)
        if w.task is not None:
            w.task.cancel()
        if actor is not None:
            try:
                ray.kill(actor)
            except Exception as e:  # noqa: BLE001 — an actor already gone (its node lost) is canceled too
                log.debug("worker %s: ray.kill: %s", worker_id, type(e).__name__)
        log.info("worker %s canceled before it was ready (%s)", worker_id, "unplaced" if not w.placed else "starting")

    def add_worker(self, device: str) -> str:
        wid = f"w{self._next_id}"
        self._next_id += 1
        w = self.workers[wid] = RayWorkerHandle(wid, "ray")
        self._create(w)
        log.info("worker %s requested from Ray (%s)", wid, self.s.device_resource)
        return wid

    def active(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if not w.retiring and not w.quarantined]
