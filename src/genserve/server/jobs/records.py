"""Job records: the one writer of the job store's job rows. Each transition of a job (queued,
dispatched, started, retrying, terminal) is written here and published as one event to the
runtime's listeners, so the record and what listeners see never disagree; step progress is kept in
memory only (it changes every step) and published as events.

Invariants kept here: a job's outcome never changes once terminal (``finish`` is the only way in
and ignores a second call; only the batch's cost share is added when the batch ends); every
hand-over to a worker opens an attempt and every outcome closes it; an output already in the result
store is adopted instead of produced again.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from ...config.auth import DEFAULT_TENANT
from ...config.load import ModelConfig
from ...engine import ErrorCode, JoinBatch, RetryJob, RunBatch
from ...engine.types import RunningBatch
from ...storage import THUMBNAIL_NAME, THUMBNAIL_TYPE, ResultRef, ResultStore, output_name, output_type
from ..status import JobStatus, is_terminal
from .cost import apportion, cost_usd, job_weight
from .store.interface import Store
from .listeners import Event
from .views import Record

log = logging.getLogger("genserve.runtime")


class JobRecords:
    def __init__(self, store: Store, results: ResultStore, models: Mapping[str, ModelConfig],
                 publish: Callable[[Event], None]) -> None:
        self.store = store
        self.results = results
        self.models = models
        self.publish = publish
        self._progress: dict[str, tuple[int, int]] = {}  # running job -> (step, total); memory only

    def progress_of(self, job_id: str) -> tuple[int, int] | None:
        return self._progress.get(job_id)

    # ---- transitions ----------------------------------------------------------------------------

    def queued(self, job_id: str, client_id: str | None, params: dict[str, Any], now: float,
               tenant: str = DEFAULT_TENANT, *, max_queued: int | None = None) -> Record:
        # durable before acknowledged; ``max_queued``: counted in the insert's transaction (store.interface)
        self.store.insert(job_id, client_id, params, now, tenant, max_queued=max_queued)
        self.publish(Event("queued", now, job_id, {"model": params["model"], "priority": params["priority"],
                                                   "tenant": tenant}))
        return self.store.get(job_id)  # type: ignore[return-value]

    def restored(self, job: Record, now: float) -> None:
        """A job re-entered after a restart (its record already says queued)."""
        self.publish(Event("queued", now, job["id"], {"model": job["model"], "priority": job["priority"],
                                                      "restored": True}))

    def dispatched(self, d: RunBatch | JoinBatch, now: float) -> list[Record]:
        """The jobs of ``d`` are handed to its worker (a new batch, or joining a running set in
        step mode): running, one attempt opened each."""
        joined = isinstance(d, JoinBatch)
        cold = False if joined else d.needs_load
        waits = False if joined else d.waits_for_load
        self.store.update(d.job_ids, status=JobStatus.RUNNING, batch_id=d.batch_id, batch_size=len(d.job_ids),
                          worker=d.worker, t_dispatched=now, served_model=d.key.model)
        self.store.start_attempts(d.job_ids, d.worker, d.key.model, d.batch_id, now)
        self.publish(Event("batch_dispatched", now, data={"batch_id": d.batch_id, "worker": d.worker,
                                                         "model": d.key.model, "job_ids": d.job_ids,
                                                         "cold": cold, "joined": joined}))
        for j in d.job_ids:
            self.publish(Event("started", now, j, {"batch_id": d.batch_id, "batch_size": len(d.job_ids),
                                                   "worker": d.worker, "model": d.key.model,
                                                   "cold_start": waits}))
        return [self.store.get(j) for j in d.job_ids]  # type: ignore[misc]

    def model_loaded(self, job_ids: tuple[str, ...], msg: Mapping[str, Any]) -> None:
        """These jobs waited for the load ``msg`` reports."""
        self.store.update(job_ids, t_load_start=msg["load_start"], t_load_end=msg["load_end"], load_tier=msg["tier"],
                          compile_s=msg.get("compile_s") or None)

    def inference_started(self, job_ids: list[str], t: float) -> None:
        self.store.update(job_ids, t_inference_start=t)

    def step(self, job_ids: list[str], step: int, total: int, now: float) -> None:
        for j in job_ids:  # every step: from memory, not a store read per job
            self._progress[j] = (step, total)
            self.publish(Event("progress", now, j, {"step": step, "total": total}))

    def output_written(self, job_id: str, msg: Mapping[str, Any], now: float) -> None:
        """The worker wrote the job's output: it succeeded (unless it ended meanwhile, e.g. timed
        out while its last step ran)."""
        job = self.store.get(job_id)
        if job is not None and not is_terminal(job["status"]):
            self.store.update([job_id], results=[msg["result"]], t_inference_start=msg["inference_start"],
                              t_inference_end=msg["inference_end"], t_output_written=msg["output_written"],
                              step_batching=msg.get("step"), execution=msg.get("execution"),
                              lora_load_s=msg.get("lora_load_s"))
            self.finish(job_id, JobStatus.SUCCEEDED, now)

    def retry(self, d: RetryJob, now: float) -> None:
        self.store.end_attempt(d.job_id, d.code, d.message, now)
        self.store.update([d.job_id], status=JobStatus.QUEUED, attempts=d.attempts, batch_id=None, batch_size=None,
                          worker=None, t_dispatched=None, t_load_start=None, t_load_end=None, load_tier=None, compile_s=None,
                          t_inference_start=None, t_inference_end=None)
        self._progress.pop(d.job_id, None)
        self.publish(Event("retrying", now, d.job_id, {"code": d.code, "message": d.message, "attempts": d.attempts,
                                                       "not_before": d.not_before, "model": d.model,
                                                       "counted": d.counted}, record=self.store.get(d.job_id)))

    def cancel_requested(self, job_id: str) -> None:
        self.store.update([job_id], cancel_requested=1)

    def canceled(self, job_id: str, now: float) -> None:
        self.finish(job_id, JobStatus.CANCELED, now, code=ErrorCode.CANCELED, message="canceled by request")

    def finish(self, job_id: str, status: JobStatus, now: float, *, code: str | None = None,
               message: str | None = None) -> None:
        """The one place a job becomes terminal; a terminal job never changes again."""
        job = self.store.get(job_id)
        if job is None or is_terminal(job["status"]):
            return
        failed = status is JobStatus.FAILED
        self.store.end_attempt(job_id, None if status is JobStatus.SUCCEEDED else code, message, now)
        self.store.update([job_id], status=status, t_finished=now, error_code=code if failed else None,
                          error_message=message if failed else None)
        self._progress.pop(job_id, None)
        data: dict[str, Any] = {"status": status.value}
        if failed:
            data["error"] = {"code": code, "message": message}
        self.publish(Event(status.value, now, job_id, data, record=self.store.get(job_id)))

    def adopt_output(self, job_id: str, now: float, how: str, report: Mapping[str, Any] | None = None) -> bool:
        """If the job's output is already in the result store (its worker or the server died
        between writing it and reporting it), finish the job with it instead of running it again.
        ``report``: the worker's own ``job_done`` timings, when it kept them for the next server
        (a cluster worker that outlived one): the job keeps its inference time. The wait from the
        output to now is the job's downtime (``stats.breakdown``), never part of its inference."""
        job = self.store.get(job_id)
        if job is None or is_terminal(job["status"]):
            return False
        model = self.models.get(job["served_model"] or job["model"])
        if model is None:  # a model since removed from the config
            return False
        kind, fmt = model.kind, job["params"].get("output_format")
        key = f"{job_id}/{output_name(kind, fmt)}"
        info = self.results.head(key)
        if info is None:
            return False
        log.info("job %s: output %s", job_id, how)
        thumb_key = f"{job_id}/{THUMBNAIL_NAME}"
        thumb = self.results.head(thumb_key)  # written after the output: there unless the crash came between
        ref = ResultRef(key, output_type(kind, fmt), info.bytes,
                        thumbnail=ResultRef(thumb_key, THUMBNAIL_TYPE, thumb.bytes) if thumb else None)
        times = {"t_output_written": info.mtime}
        if report is not None:
            times = {"t_inference_start": report["inference_start"], "t_inference_end": report["inference_end"],
                     "t_output_written": report["output_written"]}
        self.store.update([job_id], results=[ref.to_dict()], adopted=1, **times)
        self.finish(job_id, JobStatus.SUCCEEDED, now)
        return True

    def charge(self, batch: RunningBatch, device_type: str, price_per_hour: float, now: float) -> None:
        """Charge the batch's device time (dispatch to end) to every job dispatched in it, by work
        share: canceled or failed jobs pay too, the device was held for them."""
        jobs = [j for j in (self.store.get(i) for i in batch.job_ids) if j is not None]
        weights = [job_weight(j["params"].get("width", 1), j["params"].get("height", 1), j["params"].get("num_frames", 0))
                   for j in jobs]
        charges = []
        for job, share in zip(jobs, apportion(max(0.0, now - batch.started_at), weights)):
            c = cost_usd(share, price_per_hour)
            self.store.update([job["id"]], device_seconds=share, cost_usd=c, device_type=device_type)
            charges.append({"job_id": job["id"], "model": job["model"], "device_seconds": share, "cost_usd": c})
        self.publish(Event("batch_ended", now, data={"batch_id": batch.id, "worker": batch.worker,
                                                    "device_type": device_type, "charges": charges}))
