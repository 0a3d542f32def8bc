"""What the HTTP routes share: the runtime's read models and control surface, the job view, the
error shape. Routes live in routers (jobs_api.py, openai/images.py, ...) built over one ``Api``."""
from __future__ import annotations

import asyncio
import functools
import random
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from ...backends.families.base import image_digest
from ...config.load import Config
from ...engine import is_retryable
from ...storage import LocalResultStore
from ..jobs.events import RECONNECT
from ..jobs.inputs import delete_inputs, read_inputs, store_inputs
from ..jobs.jobstore import STAGES
from ..jobs.views import Control, FleetView, JobReader
from ..observe.stats import breakdown
from ..requests import MAX_SEED, JobParams, RequestError, validate
from ..runtime.runtime import Runtime
from ..security import auth
from ..security.auth import visible
from ..security.keys import Principal
from ..security.limits import base_url
from ..security.ssrf import Refused
from ..status import JobStatus, is_terminal


def error(status: int, field: str | None, message: str, code: str = "invalid_request",
          headers: dict[str, str] | None = None) -> JSONResponse:
    # OpenAI-shaped (message/type/param/code) so OpenAI clients surface it; ``field`` names the culprit.
    body = {"error": {"code": code, "message": f"{field}: {message}" if field else message, "field": field,
                      "param": field, "type": "invalid_request_error" if status < 500 else "server_error"}}
    return JSONResponse(body, status_code=status, headers=headers)


def draining() -> JSONResponse:
    return error(503, None, "the server is shutting down; retry shortly (another replica, or this one after its "
                 "restart)", code="shutting_down", headers={"Retry-After": "5"})


class Reconnect(Exception):
    """The event hub closed the streams: the server is shutting down."""


def shown_params(params: dict[str, Any]) -> dict[str, Any]:
    """A job's params as shown: an input image or mask by its digest (a legacy record's data URL
    is MBs; a store key is an internal detail)."""
    out = dict(params)
    for field in ("image", "mask"):
        if params.get(field):
            sha = params.get(f"{field}_sha256")
            out[field] = "sha256:" + (sha or image_digest(params[field]))
        out.pop(f"{field}_sha256", None)
    return out


RESULT_VARIANTS = ("output", "thumbnail")


def result_entry(url: str, index: int, ref: dict[str, Any]) -> dict[str, Any]:
    """One result in the job view: its URL, type and size, and its thumbnail's URL (null: none)."""
    own = url + (f"?index={index}" if index else "")
    return {"url": own, "content_type": ref.get("content_type"), "bytes": ref.get("bytes"),
            "thumbnail_url": (own + ("&" if index else "?") + "variant=thumbnail") if ref.get("thumbnail") else None}


class Api:
    """The system as the routes see it: read models and the runtime's control surface only."""

    def __init__(self, config: Config, rt: Runtime, gate: auth.TenantGate) -> None:
        self.config = config
        self.control: Control = rt
        self.fleet: FleetView = rt.fleet
        self.jobs: JobReader = rt.store
        self.results, self.events = rt.results, rt.events
        self.loras = rt.loras
        self.retention = config.retention
        self.gate = gate
        self.webhook_guard = rt.webhooks.guard

    def base(self, request: Request) -> str:
        return base_url(request.scope, self.config.http)

    def batch_view(self, job: dict[str, Any]) -> dict[str, Any]:
        step = job["step_batching"] or {}
        shared = step.get("shared_with") or []
        # Only the job's own tenant's ids are shown; other tenants' jobs are counted, never named.
        own = [i for i in shared if (other := self.jobs.get(i)) is not None and other["tenant"] == job["tenant"]]
        stepped = (getattr(self.config.models.get(job["model"]), "batching", "") == "step"
                   and not job["params"].get("variant")  # jobs with image inputs: request level
                   and not job["params"].get("cache"))  # and jobs with a step cache
        mode = "step" if job["step_batching"] is not None or stepped else "request"
        return {"id": job["batch_id"], "size": job["batch_size"], "worker": job["worker"], "mode": mode,
                # step mode: the running set's step count when it joined, who shared its denoiser
                # calls, its own step count each time a higher-priority job paused it
                "joined_at_step": step.get("joined_step"),
                "shared_steps_with": own if job["step_batching"] is not None else None,
                "shared_steps_with_other_tenants": len(shared) - len(own) if job["step_batching"] is not None else None,
                "paused_at_steps": step.get("paused_at")}

    def job_view(self, job: dict[str, Any], base: str) -> dict[str, Any]:
        jid = job["id"]
        ts = {s: job[f"t_{s}"] for s in STAGES}
        urls = {"self": f"{base}v1/jobs/{jid}", "events": f"{base}v1/jobs/{jid}/events",
                "cancel": f"{base}v1/jobs/{jid}/cancel", "result": f"{base}v1/jobs/{jid}/result"}
        step = self.control.progress(jid)
        if job["status"] == JobStatus.SUCCEEDED:
            step = (job["params"].get("steps"), job["params"].get("steps"))
        stages = breakdown(job)
        stages["lora_load"] = job.get("lora_load_s")  # within inference: the worker loads adapters in the batch
        return {
            "id": jid, "object": "job", "client_id": job["client_id"], "tenant": job["tenant"], "model": job["model"],
            "status": job["status"], "priority": job["priority"], "params": shown_params(job["params"]),
            "queue_position": self.control.queue_position(jid) if job["status"] == JobStatus.QUEUED else None,
            "progress": {"step": step[0], "total": step[1]} if step else None,
            "cancel_requested": job["cancel_requested"],
            "error": {"code": job["error_code"], "message": job["error_message"],
                      "retryable": is_retryable(job["error_code"])} if job["error_code"] else None,
            "served_by": job["served_model"], "timeout_s": job["params"].get("timeout_s"),
            "attempts": [{**{k: a[k] for k in ("attempt", "worker", "model", "batch_id", "batch_size", "code",
                                               "message", "started", "ended")},
                          "duration_s": round(a["ended"] - a["started"], 4) if a["ended"] is not None else None}
                         for a in self.jobs.attempts(jid)],
            "webhook": {"url": job["params"]["webhook"], "events": job["params"].get("webhook_events", ["completed"]),
                        "deliveries": self.jobs.deliveries(jid)} if job["params"].get("webhook") else None,
            "batch": self.batch_view(job) if job["batch_id"] else None,
            "timestamps": ts,
            "cold_start": {"waited": job["t_load_start"] is not None, "worker": job["worker"] if job["t_load_start"] else None,
                           "tier": job["load_tier"],
                           "seconds": None if stages["cold_start"] is None else round(stages["cold_start"], 4)},
            "breakdown": {**{f"{k}_s": None if v is None else round(v, 4) for k, v in stages.items()},
                          "compile_s": job.get("compile_s")},  # part of cold_start_s (compile = ... models)
            # what ran: {cache, steps_computed, steps_reused, prompt_cache, compiled} (docs/performance.md)
            "execution": job.get("execution"),
            # the job's share of its batch's device time, and its price; set when the batch ends
            "cost": {"device_seconds": job["device_seconds"], "usd": job["cost_usd"], "device_type": job["device_type"]},
            "results": [result_entry(urls["result"], i, r) for i, r in enumerate(job["results"])],
            # [retention]: when the record (and, at the latest, the results) will be deleted; null: kept
            "expires_at": self.retention.record_expires_at(job["t_finished"]),
            "results_expire_at": self.retention.results_expire_at(job["t_finished"]) if job["results"] else None,
            "results_deleted_at": job.get("t_results_deleted"),
            "urls": urls,
        }

    def job_or_404(self, job_id: str, who: Principal) -> dict[str, Any]:
        job = visible(self.jobs.get(job_id), who)
        if job is None:
            raise RequestError("id", f"no job {job_id!r}", status=404, code="not_found")
        return job

    async def wait_terminal(self, job_id: str) -> dict[str, Any]:
        history, q = self.events.subscribe(job_id)
        try:
            job = self.jobs.get(job_id)
            if not is_terminal(job["status"]) and not any(is_terminal(e["event"]) for e in history):
                while True:
                    ev = (await q.get())["event"]
                    if ev == RECONNECT:
                        raise Reconnect
                    if is_terminal(ev):
                        break
        finally:
            self.events.unsubscribe(job_id, q)
        return self.jobs.get(job_id)

    async def create_job(self, data: dict[str, Any], who: Principal, *, client_id: str | None = None,
                         explicit_priority: bool = True) -> tuple[dict[str, Any], bool]:
        """Validate, admit and submit one job (``data``: the type-checked request body). The job
        record and whether it is new (False: ``client_id`` replayed an earlier submit)."""
        check = functools.partial(validate, models=self.config.models, random_seed=random.randint(0, MAX_SEED),
                                  webhooks_enabled=self.config.server.webhook_secret is not None)
        if data.get("model") not in self.config.models:
            check(data)  # the unknown model is the error, before any image is decoded or job looked up
        inputs = await read_inputs(data, self.jobs, self.results, who)
        params = check({**data, **inputs, **self.resolve_loras(data, who)})
        if params.webhook is not None:
            try:
                await self.webhook_guard.check(params.webhook)
            except Refused as e:
                raise RequestError("webhook", e.reason) from None
        params = self.gate.default_priority(who.tenant, params, explicit=explicit_priority)
        existing = self.jobs.get_by_client_id(client_id, who.tenant) if client_id is not None else None
        if existing is not None:
            # stored inputs are compared by digest (their keys carry the job id)
            same = dict(params.to_dict(), seed=existing["params"].get("seed") if data.get("seed") is None
                        else params.seed, image=existing["params"].get("image"), mask=existing["params"].get("mask"))
            if same != {**JobParams.from_dict(existing["params"]).to_dict()}:
                raise RequestError("id", "already used for a job with different parameters", status=409,
                                   code="conflict")
            job, created = self.control.submit(params, client_id, who.tenant)
        else:
            self.gate.admit(who.tenant, params.priority)
            job_id = uuid.uuid4().hex
            params = await store_inputs(self.results, job_id, params, inputs)
            try:
                job, created = self.control.submit(params, client_id, who.tenant, job_id=job_id)
            except BaseException:
                await delete_inputs(self.results, params)
                raise
            if job["id"] != job_id:  # a concurrent submit with the same client id won
                await delete_inputs(self.results, params)
        self.control.kick()
        return job, created

    def resolve_loras(self, data: dict[str, Any], who: Principal) -> dict[str, Any]:
        """``data``'s ``loras`` with each name resolved as the caller's tenant sees it (an entry's
        ``lora``: the registered adapter, or None), for ``validate`` (pure: it cannot look)."""
        if not data.get("loras"):
            return {}
        return {"loras": [{**a, "lora": self.loras.find(a["name"], who.tenant)} for a in data["loras"]]}

    def result_ref(self, job: dict[str, Any], index: int, variant: str = "output") -> dict[str, Any]:
        """The job's ``index``-th result (a ResultRef dict; ``variant="thumbnail"``: its thumbnail's),
        or a 4xx saying why there is none."""
        if variant not in RESULT_VARIANTS:
            raise RequestError("variant", f"must be one of {', '.join(RESULT_VARIANTS)}, got {variant[:40]!r}")
        if job["status"] != JobStatus.SUCCEEDED:
            raise RequestError("id", f"job is {job['status']}; no result yet" if not is_terminal(job["status"])
                               else f"job {job['status']}; it has no result", status=409, code="not_ready")
        if job.get("t_results_deleted") is not None:
            raise RequestError("id", "the job's results were deleted (retention or a delete request)", status=410,
                               code="gone")
        if not 0 <= index < len(job["results"]):
            raise RequestError("index", f"must be between 0 and {len(job['results']) - 1}", status=404, code="not_found")
        ref = job["results"][index]
        if variant == "thumbnail":
            if not ref.get("thumbnail"):
                raise RequestError("variant", f"result {index} of this job has no thumbnail", status=404,
                                   code="not_found")
            return ref["thumbnail"]
        return ref

    async def serve_result(self, job: dict[str, Any], ref: dict[str, Any], field: str = "index") -> Response:
        """A stored result as a response: a redirect to the object store when it can sign one, else
        the bytes (a file response from a local store). ``field``: the request field a 404 names."""
        key = ref.get("key")
        if not isinstance(key, str) or not self.results.exists(key):  # gone, or a record no version should have written
            raise RequestError(field, "the job's result is no longer available", status=404, code="not_found")
        filename = f"{job['id']}-{key.rpartition('/')[2]}"
        url = self.results.presigned_url(key, filename)
        if url is not None:  # the object store serves the bytes; the server only points at them
            return RedirectResponse(url, status_code=307)
        if isinstance(self.results, LocalResultStore):
            return FileResponse(self.results.local_path(key), media_type=ref.get("content_type"), filename=filename)
        data = await asyncio.get_running_loop().run_in_executor(None, self.results.read, key)
        return Response(data, media_type=ref.get("content_type"),
                        headers={"content-disposition": f'inline; filename="{filename}"'})
