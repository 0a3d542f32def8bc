"""The native job API: submit, list, read, cancel, delete, fetch results, stream events (SSE)."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..jobs.events import RECONNECT
from ..jobs.jobstore import Page
from ..requests import PRIORITIES, WEBHOOK_EVENTS, RequestError
from ..security.auth import principal, visible
from ..security.keys import Principal
from ..status import JobStatus, is_terminal
from .api import Api
from .multipart import form_as_json
from .schemas import JobRequest


# How a multipart/form-data submit's fields are typed (the rest are text).
FORM_KINDS = {**{f: "int" for f in ("width", "height", "num_frames", "steps", "seed")},
              **{f: "float" for f in ("guidance", "timeout_s", "strength")},
              "webhook_events": "list", "image": "image", "mask": "image", "loras": "loras"}
_FORM_SCHEMA = {"type": "object", "required": ["model", "prompt"], "properties": {
    **{f: {"type": "string"} for f in ("model", "prompt", "negative_prompt", "id", "webhook")},
    "priority": {"type": "string", "enum": list(PRIORITIES)},
    **{f: {"type": "integer"} for f, k in FORM_KINDS.items() if k == "int"},
    **{f: {"type": "number"} for f, k in FORM_KINDS.items() if k == "float"},
    "webhook_events": {"type": "array", "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
                       "maxItems": len(WEBHOOK_EVENTS)},
    "image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"},
    "loras": {"type": "string", "description": "JSON [{name, scale}], or name:scale,name:scale"}}}


def jobs_router(api: Api) -> APIRouter:
    router = APIRouter()
    form_router = APIRouter(route_class=form_as_json(FORM_KINDS))

    @form_router.post("/v1/jobs", status_code=202, tags=["jobs"], openapi_extra={"requestBody": {"content": {
        "multipart/form-data": {"schema": _FORM_SCHEMA}}}})
    async def create_job(body: JobRequest, request: Request, who: Principal = Depends(principal)):
        """Submit a job: a JSON body, or the same fields as ``multipart/form-data`` (``image`` and
        ``mask`` as file parts; bodies up to ``[http] max_upload_bytes``)."""
        job, created = await api.create_job(body.model_dump(), who, client_id=body.id,
                                            explicit_priority="priority" in body.model_fields_set)
        return JSONResponse(api.job_view(api.jobs.get(job["id"]), api.base(request)), status_code=202,
                            headers={} if created else {"Idempotent-Replayed": "true"})

    router.include_router(form_router)

    @router.get("/v1/jobs", tags=["jobs"])
    async def list_jobs(request: Request, limit: int = 50, after: str | None = None, order: str = "desc",
                        tenant: str | None = None, status: JobStatus | None = None, model: str | None = None,
                        who: Principal = Depends(principal)):
        """Jobs in submission order, newest first (``order=asc``: oldest first), a page at a time:
        ``after`` is the previous page's ``last_id``; ``has_more`` says whether another page follows.
        The caller's tenant's jobs (an admin key: every tenant's, or ``tenant``'s); ``status`` and
        ``model`` filter them."""
        if not who.admin:
            if tenant is not None and tenant != who.tenant:
                raise RequestError("tenant", f"no tenant {tenant!r}", status=404, code="not_found")
            tenant = who.tenant
        page = job_page(api, who, limit=limit, after=after, order=order, tenant=tenant, status=status,
                        models=None if model is None else (model,))
        return list_body([api.job_view(j, api.base(request)) for j in page.items], page.has_more)

    @router.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str, request: Request, who: Principal = Depends(principal)):
        return api.job_view(api.job_or_404(job_id, who), api.base(request))

    @router.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
    async def cancel_job(job_id: str, request: Request, who: Principal = Depends(principal)):
        api.job_or_404(job_id, who)
        job = api.control.cancel(job_id)
        api.control.kick()
        return api.job_view(job, api.base(request))

    @router.delete("/v1/jobs/{job_id}", tags=["jobs"], status_code=204,
                responses={404: {"description": "no such job (or already deleted)"},
                           409: {"description": "the job has not finished: cancel it first"}})
    async def delete_job(job_id: str, who: Principal = Depends(principal)):
        """Delete a finished job: its result files and its record. 204 once deleted; a repeated
        delete finds nothing and answers 404 (the outcome is the same). A queued or running job is
        not deleted (409): cancel it, then delete it once it is canceled. Another tenant's job: 404."""
        job = api.job_or_404(job_id, who)
        if not is_terminal(job["status"]):
            raise RequestError("id", f"job is {job['status']}; cancel it first (POST {job_id}/cancel), then delete "
                               "it once canceled", status=409, code="conflict")
        api.control.delete_job(job_id)
        return Response(status_code=204)

    @router.get("/v1/jobs/{job_id}/result", tags=["jobs"])
    async def get_result(job_id: str, index: int = 0, variant: Literal["output", "thumbnail"] = "output",
                         who: Principal = Depends(principal)):
        """The job's ``index``-th output; ``variant=thumbnail``: its thumbnail (a JPEG of at most
        256 px on the longer side; 404 naming ``variant`` when the result has none)."""
        job = api.job_or_404(job_id, who)
        ref = api.result_ref(job, index, variant)
        return await api.serve_result(job, ref, "variant" if variant != "output" else "index")

    @router.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str, request: Request, who: Principal = Depends(principal)):
        api.job_or_404(job_id, who)
        last_id = _last_event_id(request.headers.get("last-event-id"))

        async def stream():
            # Read here, not in the handler: the job may have moved on before the stream started.
            job = api.jobs.get(job_id) or {}
            offset = 0  # added to the hub's ids when they follow rebuilt milestones
            if not api.events.known(job_id):
                # History is gone (the job ended, a restart, or an old job): rebuild the milestones
                # from the record; live events continue their numbering, so Last-Event-ID stays meaningful.
                history, q = _synthesized(job, last_id), None
                if not is_terminal(job["status"]):
                    offset = len(history)
                    hist2, q = api.events.subscribe(job_id)
                    history += [dict(e, id=offset + e["id"]) for e in hist2]
                elif api.events.closed:
                    history.append(api.events.reconnect_event())
            else:
                history, q = api.events.subscribe(job_id)
            try:
                for ev in history:
                    if ev["event"] == RECONNECT:
                        yield _sse(ev)
                        return
                    if ev["id"] > last_id:
                        yield _sse(ev)
                    if is_terminal(ev["event"]):
                        return
                if q is None:
                    return
                while True:
                    try:
                        ev = await asyncio.wait_for(q.get(), timeout=15)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if ev["event"] == RECONNECT:  # the server is shutting down; the job is durable
                        yield _sse(ev)
                        return
                    if offset:
                        ev = dict(ev, id=offset + ev["id"])
                    if ev["id"] > last_id:
                        yield _sse(ev)
                    if is_terminal(ev["event"]):
                        return
            finally:
                if q is not None:
                    api.events.unsubscribe(job_id, q)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


def job_page(api: Api, who: Principal, *, limit: int, after: str | None, order: str, tenant: str | None,
             status: str | None = None, models: tuple[str, ...] | None = None) -> Page:
    """A page of jobs for a listing route, its query parameters checked (4xx naming the one at
    fault). The cursor must be a job the caller may see: another tenant's id is as unknown as a
    made-up one (its existence is not disclosed)."""
    if not 1 <= limit <= 1000:
        raise RequestError("limit", "must be between 1 and 1000")
    if order not in ("asc", "desc"):
        raise RequestError("order", f"must be asc or desc, got {order[:20]!r}")
    unknown = RequestError("after", f"no job {after!r} to list after: pass the id of a job from the previous page "
                                    "(its last_id)")
    if after is not None and visible(api.jobs.get(after), who) is None:
        raise unknown
    try:
        return api.jobs.page(limit, after=after, order=order, tenant=tenant, status=status, models=models)
    except KeyError:  # deleted since the check above
        raise unknown from None


def list_body(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """The list envelope (OpenAI's cursor pages): ``last_id`` is the next page's ``after``."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def _last_event_id(header: str | None) -> int:
    """Resume after this event id. Our ids are positive integers; anything else is a client bug
    worth a clear 400 rather than a silent replay from the start."""
    if header is None or not header.strip():
        return 0
    if not header.strip().isdigit() or len(header.strip()) > 18:
        raise RequestError("Last-Event-ID", f"must be an event id this stream sent (a number), got {header[:40]!r}")
    return int(header)


def _sse(ev: dict[str, Any]) -> str:
    if ev["event"] == RECONNECT:  # no id: Last-Event-ID stays at the last job event
        return f"retry: {ev['data']['retry_ms']}\nevent: {RECONNECT}\ndata: {json.dumps(ev['data'])}\n\n"
    return f"id: {ev['id']}\nevent: {ev['event']}\ndata: {json.dumps(ev['data'])}\n\n"


def _synthesized(job: dict[str, Any], last_id: int = 0) -> list[dict[str, Any]]:
    """A job's milestones rebuilt from its record. A terminal event is always numbered after
    ``last_id``: a client reconnecting with a Last-Event-ID from the live stream learns the outcome."""
    evs: list[tuple[str, dict[str, Any]]] = [("queued", {"model": job["model"], "priority": job["priority"],
                                                         "tenant": job["tenant"]})]
    if job["t_dispatched"] is not None:
        evs.append(("started", {"batch_id": job["batch_id"], "batch_size": job["batch_size"], "worker": job["worker"],
                                "model": job["served_model"] or job["model"],
                                "cold_start": job["t_load_start"] is not None}))
    if is_terminal(job["status"]):
        data: dict[str, Any] = {"status": job["status"]}
        if job["error_code"]:
            data["error"] = {"code": job["error_code"], "message": job["error_message"]}
        evs.append((job["status"], data))
    out = [{"id": i + 1, "event": e, "data": d} for i, (e, d) in enumerate(evs)]
    if is_terminal(job["status"]):
        out[-1]["id"] = max(out[-1]["id"], last_id + 1)
    return out
