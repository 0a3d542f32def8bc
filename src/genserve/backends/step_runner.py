"""The worker's step-level batch loop: a ``run`` in step mode opens a running set; jobs that the
engine joins to it arrive as ``join`` messages and enter between steps; each finished job is
decoded, encoded and written while the others go on; a canceled job frees its slot at the next
step boundary. The batch ends when the set is empty and no join is waiting.

Events (see workers/protocol.py): ``started`` once, then per job ``job_started`` (with the set's
step count when it joined), per step one ``progress`` listing every job's own step count,
``job_done`` (with ``step``: joined_step, shared_with) or ``job_canceled``.
"""
from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any

from .compile import graphs
from .runner import BatchAborted, check_output
from .stepping import RunningSet, StepJob

Emit = Callable[[dict[str, Any]], None]
MAX_PARKED = 64  # paused jobs a worker keeps the latents of


def step_job(j: dict[str, Any], loras: tuple = ()) -> StepJob:
    return StepJob(j["id"], j["prompt"], int(j["seed"]), int(j["steps"]), float(j["guidance"]), j.get("negative_prompt"),
                   loras)


def step_driver(runner, model: str):
    """The loaded model's step driver (its family adapter's), or None."""
    adapter = runner.adapters.get(model)
    return adapter.step_driver(runner.pipes[model]) if adapter is not None else None


def run_grouped(runner, msg: dict[str, Any], emit: Emit, canceled: set[str],
                on_step: Callable[[int], None] = lambda step: None) -> int:
    """A step-mode batch on a pipeline the step loop cannot drive: request-level calls, one per
    (steps, guidance) group. Joins sent to it are dropped (the engine requeues them)."""
    groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for j in msg["jobs"]:
        groups.setdefault((int(j["steps"]), float(j["guidance"])), []).append(j)
    peak = 0
    for (steps, guidance), jobs in groups.items():
        sub = {**msg, "params": {**msg["params"], "steps": steps, "guidance": guidance}, "jobs": jobs}
        try:
            peak = max(peak, runner.run(sub, emit, canceled, on_step=on_step))
        except BatchAborted:  # this group's jobs were all canceled (and reported); the others still run
            continue
    return peak


def run_steps(runner, msg: dict[str, Any], emit: Emit, canceled: set[str], joins: queue.Queue, seen: set[str],
              on_step: Callable[[int], None] = lambda step: None, max_size: int = 64,
              between: Callable[[], None] = lambda: None, pausing: set[str] | None = None,
              parked: dict[str, tuple[tuple, Any]] | None = None) -> int:
    """Run the step-mode batch ``msg`` until its set is empty. ``joins`` holds ``join`` messages
    (for this batch, or stale ones for earlier batches, which are dropped); every job id that
    joins is added to ``seen``. Returns the batch's peak working bytes (measured on CUDA; 0 on
    CPU, where nothing is measured). ``between`` runs at every step boundary (the worker's unloads).
    ``pausing``: job ids to take out at the next boundary; their slots go to ``parked`` (the
    worker's, across batches), and a job that comes back to a set of the same shape resumes."""
    pausing = set() if pausing is None else pausing
    parked = {} if parked is None else parked
    import torch

    pipe = runner.pipes[msg["model"]]
    family = step_driver(runner, msg["model"])
    assert family is not None
    family.embedder = runner.embedders.get(msg["model"])
    batch_id, kind, p = msg["batch_id"], msg["kind"], msg["params"]
    shape = {"width": p["width"], "height": p["height"], "num_frames": p.get("num_frames", 0)}
    rs = RunningSet(pipe, family, shape, max(max_size, len(msg["jobs"])))
    rs.lora_plan = runner.loras.hooks_for(pipe).plan
    runner.loras.configure(msg)
    lora_info: dict[str, dict[str, Any]] = {}  # job id -> lora_load_s, tiers (loaded when it joins)
    where = (msg["model"], tuple(sorted(shape.items())))
    pending: list[dict[str, Any]] = list(msg["jobs"])
    started: dict[str, float] = {}
    payloads: dict[str, dict[str, Any]] = {}  # each admitted job's message (its output format)
    if runner.cuda:
        torch.cuda.reset_peak_memory_stats(runner.device)
        base = torch.cuda.memory_allocated(runner.device)
    emit({"ev": "started", "batch_id": batch_id, "t": time.time()})
    graphs_before = graphs()

    def take_joins() -> None:
        while True:
            try:
                m = joins.get_nowait()
            except queue.Empty:
                return
            if m["batch_id"] == batch_id:
                runner.loras.cache.evict(m.get("lora_evict") or ())
                pending.extend(m["jobs"])
                seen.update(j["id"] for j in m["jobs"])

    def joined(j: dict[str, Any], resumed_from: int | None) -> None:
        payloads[j["id"]] = j
        started.setdefault(j["id"], time.time())
        emit({"ev": "job_started", "batch_id": batch_id, "job_id": j["id"], "t": time.time(),
              "joined_step": rs.steps_run, **({"resumed_from": resumed_from} if resumed_from is not None else {})})

    def canceled_now(job_id: str) -> None:
        emit({"ev": "job_canceled", "batch_id": batch_id, "job_id": job_id, "t": time.time()})

    while True:
        between()
        take_joins()
        fresh: list[dict[str, Any]] = []
        for j in pending:
            if j["id"] in canceled:
                canceled_now(j["id"])
                continue
            back = parked.pop(j["id"], None)
            if back is not None and back[0] == where:
                joined(j, rs.resume(back[1]).done)
            else:
                fresh.append(j)
        adapters = runner.loras.adapters_of(pipe, fresh, lora_info) if any(j.get("loras") for j in fresh) else None
        rs.admit_many([step_job(j, tuple(adapters[i]) if adapters else ()) for i, j in enumerate(fresh)])
        for j in fresh:
            joined(j, None)
        pending.clear()
        for job_id in [i for i in rs.slots if i in canceled]:
            rs.drop(job_id)
            canceled_now(job_id)
        for job_id in [i for i in rs.slots if i in pausing]:
            pausing.discard(job_id)
            slot = rs.drop(job_id)
            slot.paused_at.append(slot.done)
            parked[job_id] = (where, slot)
            while len(parked) > MAX_PARKED:
                parked.pop(next(iter(parked)))  # the oldest: it restarts from step 0 if it comes back
            emit({"ev": "job_paused", "batch_id": batch_id, "job_id": job_id, "step": slot.done, "t": time.time()})
        if not rs.slots:
            take_joins()
            if pending:
                continue
            break
        finished = rs.step()
        on_step(rs.steps_run - 1)
        # one message per step for the whole set (not one per job): the server's loop handles a
        # message per denoiser call, whatever the set's size
        emit({"ev": "progress", "batch_id": batch_id, "step": rs.steps_run,
              "jobs": [[s.job.id, s.done, s.job.steps] for s in [*rs.slots.values(), *finished]]})
        for s, out in zip(finished, rs.decode(finished)):
            check_output(kind, out, shape["width"], shape["height"], shape["num_frames"])
            ref = runner.write_output(kind, payloads.pop(s.job.id), out, p["fps"])
            emit({"ev": "job_done", "batch_id": batch_id, "job_id": s.job.id, "result": ref.to_dict(),
                  "inference_start": started.pop(s.job.id), "inference_end": time.time(), "output_written": time.time(),
                  **lora_info.pop(s.job.id, {}),
                  "step": {"joined_step": s.joined_at, "shared_with": sorted(rs.shared.pop(s.job.id, set())),
                           "paused_at": s.paused_at},
                  "execution": {"cache": None, "steps_computed": s.done, "steps_reused": 0,
                                "prompt_cache": s.prompt_cache, "compiled": runner.compiled.get(msg["model"])}})
    runner.compiles = graphs() - graphs_before
    return int(torch.cuda.max_memory_allocated(runner.device) - base) if runner.cuda else 0
