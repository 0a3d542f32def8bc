"""HTTP API (FastAPI). Routes translate between HTTP and the runtime; no scheduling logic here."""
from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..auth.keys import KeyStore, Principal
from ..config import Config, parse_size
from ..engine import ErrorCode, is_retryable
from ..backends.families.base import image_digest
from ..requests import MAX_SEED, RequestError, validate
from ..status import JobStatus, is_terminal
from ..storage import LocalResultStore
from .events import RECONNECT
from . import auth
from .auth import principal, visible
from .jobstore import STAGES
from .docs_assets import mount_docs
from .limits import BodyLimit, allowed_methods, base_url
from .observability_api import observability_router
from .openapi import install_openapi
from .runtime import QueueFull, Runtime
from .schemas import ImageGenerationRequest, JobRequest, LoadRequest
from .ssrf import Refused
from .stats import breakdown
from .tenant_usage import TenantMetrics, usage_router
from .views import Control, FleetView, JobReader


def _shown_params(params: dict[str, Any]) -> dict[str, Any]:
    """A job's params as shown: a conditioning image (a data URL, up to MBs) by its digest."""
    if params.get("image"):
        return {**params, "image": "sha256:" + image_digest(params["image"])}
    return params


def error(status: int, field: str | None, message: str, code: str = "invalid_request",
          headers: dict[str, str] | None = None) -> JSONResponse:
    # OpenAI-shaped (message/type/param/code) so OpenAI clients surface it; ``field`` names the culprit.
    body = {"error": {"code": code, "message": f"{field}: {message}" if field else message, "field": field,
                      "param": field, "type": "invalid_request_error" if status < 500 else "server_error"}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(config: Config, runtime: Runtime | None = None) -> FastAPI:
    rt = runtime or Runtime(config)
    # The routes see the system through these read models and the runtime's control surface only.
    control: Control = rt
    fleet: FleetView = rt.fleet
    jobs: JobReader = rt.store
    results, events = rt.results, rt.events
    retention = config.retention
    keys = KeyStore(config.server.data_dir)
    gate = auth.TenantGate(config.access, jobs.queued_count)
    webhook_guard = rt.webhooks.guard

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await rt.start()
        try:
            yield
        finally:
            await rt.close()
            keys.close()

    app = FastAPI(title="genserve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Self-hosted inference for image and video diffusion models.")
    mount_docs(app)
    app.state.runtime = rt
    auth.install(app, keys, config.access, config.server.cors_origins)
    install_openapi(app, config.models)
    app.add_middleware(BodyLimit, max_bytes=config.http.max_body_bytes)

    def base(request: Request) -> str:
        return base_url(request.scope, config.http)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return error(400, "body", "malformed JSON: " + err.get("ctx", {}).get("error", err.get("msg", "")))
        field = ".".join(loc) or "body"
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        return error(400, field, msg)

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(app.router.routes, req.scope)}
        return error(exc.status_code, None, str(exc.detail), code="not_found" if exc.status_code == 404 else "http_error",
                     headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(_req: Request, exc: RequestError):
        return error(exc.status, exc.field, exc.message, code=exc.code)

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception):
        return error(500, None, f"internal error: {type(exc).__name__}", code=ErrorCode.INTERNAL)

    @app.exception_handler(QueueFull)
    async def _queue_full(_req: Request, exc: QueueFull):
        retry = str(int(max(1, round(exc.retry_after_s))))
        return error(429, "model", f"the queue for {exc.model} is full; retry after {retry}s",
                     code="queue_full", headers={"Retry-After": retry})

    def batch_view(job: dict[str, Any]) -> dict[str, Any]:
        step = job["step_batching"] or {}
        shared = step.get("shared_with") or []
        # Only the job's own tenant's ids are shown; other tenants' jobs are counted, never named.
        own = [i for i in shared if (other := jobs.get(i)) is not None and other["tenant"] == job["tenant"]]
        mode = "step" if job["step_batching"] is not None or getattr(config.models.get(job["model"]), "batching",
                                                                      "") == "step" else "request"
        return {"id": job["batch_id"], "size": job["batch_size"], "worker": job["worker"], "mode": mode,
                # step mode: the running set's step count when it joined, who shared its denoiser
                # calls, its own step count each time a higher-priority job paused it
                "joined_at_step": step.get("joined_step"),
                "shared_steps_with": own if job["step_batching"] is not None else None,
                "shared_steps_with_other_tenants": len(shared) - len(own) if job["step_batching"] is not None else None,
                "paused_at_steps": step.get("paused_at")}

    def job_view(job: dict[str, Any], base: str) -> dict[str, Any]:
        jid = job["id"]
        ts = {s: job[f"t_{s}"] for s in STAGES}
        urls = {"self": f"{base}v1/jobs/{jid}", "events": f"{base}v1/jobs/{jid}/events",
                "cancel": f"{base}v1/jobs/{jid}/cancel", "result": f"{base}v1/jobs/{jid}/result"}
        step = control.progress(jid)
        if job["status"] == JobStatus.SUCCEEDED:
            step = (job["params"].get("steps"), job["params"].get("steps"))
        stages = breakdown(job)
        return {
            "id": jid, "object": "job", "client_id": job["client_id"], "tenant": job["tenant"], "model": job["model"],
            "status": job["status"], "priority": job["priority"], "params": _shown_params(job["params"]),
            "queue_position": control.queue_position(jid) if job["status"] == JobStatus.QUEUED else None,
            "progress": {"step": step[0], "total": step[1]} if step else None,
            "cancel_requested": job["cancel_requested"],
            "error": {"code": job["error_code"], "message": job["error_message"],
                      "retryable": is_retryable(job["error_code"])} if job["error_code"] else None,
            "served_by": job["served_model"], "timeout_s": job["params"].get("timeout_s"),
            "attempts": [{**{k: a[k] for k in ("attempt", "worker", "model", "batch_id", "batch_size", "code",
                                               "message", "started", "ended")},
                          "duration_s": round(a["ended"] - a["started"], 4) if a["ended"] is not None else None}
                         for a in jobs.attempts(jid)],
            "webhook": {"url": job["params"]["webhook"], "events": job["params"].get("webhook_events", ["completed"]),
                        "deliveries": jobs.deliveries(jid)} if job["params"].get("webhook") else None,
            "batch": batch_view(job) if job["batch_id"] else None,
            "timestamps": ts,
            "cold_start": {"waited": job["t_load_start"] is not None, "worker": job["worker"] if job["t_load_start"] else None,
                           "tier": job["load_tier"],
                           "seconds": None if stages["cold_start"] is None else round(stages["cold_start"], 4)},
            "breakdown": {f"{k}_s": None if v is None else round(v, 4) for k, v in stages.items()},
            # the job's share of its batch's device time, and its price; set when the batch ends
            "cost": {"device_seconds": job["device_seconds"], "usd": job["cost_usd"], "device_type": job["device_type"]},
            "results": [{"url": urls["result"] + (f"?index={i}" if i else ""), "content_type": r.get("content_type"),
                         "bytes": r.get("bytes")} for i, r in enumerate(job["results"])],
            # [retention]: when the record (and, at the latest, the results) will be deleted; null: kept
            "expires_at": retention.record_expires_at(job["t_finished"]),
            "results_expire_at": retention.results_expire_at(job["t_finished"]) if job["results"] else None,
            "results_deleted_at": job.get("t_results_deleted"),
            "urls": urls,
        }

    def get_job_or_404(job_id: str, who: Principal) -> dict[str, Any]:
        job = visible(jobs.get(job_id), who)
        if job is None:
            raise RequestError("id", f"no job {job_id!r}", status=404, code="not_found")
        return job

    @app.post("/v1/jobs", status_code=202, tags=["jobs"])
    async def create_job(body: JobRequest, request: Request, who: Principal = Depends(principal)):
        data = body.model_dump()
        params = validate(data, config.models, random_seed=random.randint(0, MAX_SEED),
                          webhooks_enabled=config.server.webhook_secret is not None)
        if params.webhook is not None:
            try:
                await webhook_guard.check(params.webhook)
            except Refused as e:
                raise RequestError("webhook", e.reason) from None
        params = gate.default_priority(who.tenant, params, explicit="priority" in body.model_fields_set)
        existing = jobs.get_by_client_id(body.id, who.tenant) if body.id is not None else None
        if existing is not None:
            same = dict(params.to_dict(), seed=existing["params"].get("seed") if body.seed is None else params.seed)
            if same != existing["params"]:
                raise RequestError("id", "already used for a job with different parameters", status=409, code="conflict")
        else:
            gate.admit(who.tenant, params.priority)
        job, created = control.submit(params, body.id, who.tenant)
        control.kick()
        return JSONResponse(job_view(jobs.get(job["id"]), base(request)), status_code=202,
                            headers={} if created else {"Idempotent-Replayed": "true"})

    @app.get("/v1/jobs", tags=["jobs"])
    async def list_jobs(request: Request, limit: int = 50, tenant: str | None = None, status: JobStatus | None = None,
                        model: str | None = None, who: Principal = Depends(principal)):
        """The most recent jobs, newest first: the caller's tenant's (an admin key: every tenant's,
        or ``tenant``'s); ``status`` and ``model`` filter them."""
        if not 1 <= limit <= 1000:
            raise RequestError("limit", "must be between 1 and 1000")
        if not who.admin:
            if tenant is not None and tenant != who.tenant:
                raise RequestError("tenant", f"no tenant {tenant!r}", status=404, code="not_found")
            tenant = who.tenant
        found = jobs.recent(limit, tenant, status=status, model=model)
        return {"object": "list", "data": [job_view(j, base(request)) for j in found]}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str, request: Request, who: Principal = Depends(principal)):
        return job_view(get_job_or_404(job_id, who), base(request))

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
    async def cancel_job(job_id: str, request: Request, who: Principal = Depends(principal)):
        get_job_or_404(job_id, who)
        job = control.cancel(job_id)
        control.kick()
        return job_view(job, base(request))

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"], status_code=204,
                responses={404: {"description": "no such job (or already deleted)"},
                           409: {"description": "the job has not finished: cancel it first"}})
    async def delete_job(job_id: str, who: Principal = Depends(principal)):
        """Delete a finished job: its result files and its record. 204 once deleted; a repeated
        delete finds nothing and answers 404 (the outcome is the same). A queued or running job is
        not deleted (409): cancel it, then delete it once it is canceled. Another tenant's job: 404."""
        job = get_job_or_404(job_id, who)
        if not is_terminal(job["status"]):
            raise RequestError("id", f"job is {job['status']}; cancel it first (POST {job_id}/cancel), then delete "
                               "it once canceled", status=409, code="conflict")
        control.delete_job(job_id)
        return Response(status_code=204)

    @app.get("/v1/jobs/{job_id}/result", tags=["jobs"])
    async def get_result(job_id: str, index: int = 0, who: Principal = Depends(principal)):
        job = get_job_or_404(job_id, who)
        if job["status"] != JobStatus.SUCCEEDED:
            raise RequestError("id", f"job is {job['status']}; no result yet" if not is_terminal(job["status"])
                               else f"job {job['status']}; it has no result", status=409, code="not_ready")
        if job.get("t_results_deleted") is not None:
            raise RequestError("id", "the job's results were deleted (retention or a delete request)", status=410,
                               code="gone")
        if not 0 <= index < len(job["results"]):
            raise RequestError("index", f"must be between 0 and {len(job['results']) - 1}", status=404, code="not_found")
        ref = job["results"][index]
        key = ref.get("key")
        if not isinstance(key, str) or not results.exists(key):  # gone, or a record no version should have written
            raise RequestError("index", "the job's result is no longer available", status=404, code="not_found")
        filename = f"{job_id}-{key.rpartition('/')[2]}"
        url = results.presigned_url(key, filename)
        if url is not None:  # the object store serves the bytes; the server only points at them
            return RedirectResponse(url, status_code=307)
        if isinstance(results, LocalResultStore):
            return FileResponse(results.local_path(key), media_type=ref.get("content_type"), filename=filename)
        data = await asyncio.get_running_loop().run_in_executor(None, results.read, key)
        return Response(data, media_type=ref.get("content_type"),
                        headers={"content-disposition": f'inline; filename="{filename}"'})

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str, request: Request, who: Principal = Depends(principal)):
        get_job_or_404(job_id, who)
        last_id = _last_event_id(request.headers.get("last-event-id"))

        async def stream():
            # Read here, not in the handler: the job may have moved on before the stream started.
            job = jobs.get(job_id) or {}
            offset = 0  # added to the hub's ids when they follow rebuilt milestones
            if not events.known(job_id):
                # History is gone (the job ended, a restart, or an old job): rebuild the milestones
                # from the record; live events continue their numbering, so Last-Event-ID stays meaningful.
                history, q = _synthesized(job, last_id), None
                if not is_terminal(job["status"]):
                    offset = len(history)
                    hist2, q = events.subscribe(job_id)
                    history += [dict(e, id=offset + e["id"]) for e in hist2]
                elif events.closed:
                    history.append(events.reconnect_event())
            else:
                history, q = events.subscribe(job_id)
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
                    events.unsubscribe(job_id, q)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/images/generations", tags=["openai"])
    async def images_generations(body: ImageGenerationRequest, request: Request, who: Principal = Depends(principal)):
        image_models = [n for n, m in config.models.items() if m.kind == "image"]
        model = body.model or (image_models[0] if image_models else None)
        if model in config.models and config.models[model].kind != "image":
            raise RequestError("model", f"{model} is a {config.models[model].kind} model, not an image model")
        if not 1 <= body.n <= 10:
            raise RequestError("n", "must be between 1 and 10")
        if control.draining:
            return _draining()
        size = {}
        if body.size is not None:
            try:
                size = dict(zip(("width", "height"), parse_size(body.size)))
            except ValueError as e:
                raise RequestError("size", str(e)) from None
            if min(size.values()) <= 0:
                raise RequestError("size", "width and height must be positive")
        params = [validate({"model": model, "prompt": body.prompt, **size}, config.models,
                           random_seed=random.randint(0, MAX_SEED)) for _ in range(body.n)]
        params = [gate.default_priority(who.tenant, p, explicit=False) for p in params]
        gate.admit(who.tenant, params[0].priority, len(params))
        submitted = control.submit_many(params, who.tenant)
        control.kick()
        try:
            finals = [await _wait_terminal(j["id"]) for j in submitted]
        except _Reconnect:
            # The server is shutting down before the images were made. Nobody could fetch them
            # later (the caller has no job ids), so they are canceled rather than run after the restart.
            for j in submitted:
                control.cancel(j["id"])
            return _draining()
        failed = [j for j in finals if j["status"] != JobStatus.SUCCEEDED]
        if failed:
            j = failed[0]
            return error(500, None, f"generation {j['status']}: {j['error_message'] or ''}",
                         code=j["error_code"] or j["status"])
        data = []
        for j in finals:
            if body.response_format == "b64_json":
                raw = await asyncio.get_running_loop().run_in_executor(None, results.read, j["results"][0]["key"])
                data.append({"b64_json": base64.b64encode(raw).decode(), "revised_prompt": None})
            else:
                data.append({"url": f"{base(request)}v1/jobs/{j['id']}/result", "revised_prompt": None})
        return {"created": int(time.time()), "data": data}

    async def _wait_terminal(job_id: str) -> dict[str, Any]:
        history, q = events.subscribe(job_id)
        try:
            job = jobs.get(job_id)
            if not is_terminal(job["status"]) and not any(is_terminal(e["event"]) for e in history):
                while True:
                    ev = (await q.get())["event"]
                    if ev == RECONNECT:
                        raise _Reconnect
                    if is_terminal(ev):
                        break
        finally:
            events.unsubscribe(job_id, q)
        return jobs.get(job_id)

    @app.get("/v1/models", tags=["models"])
    async def list_models():
        loaded: dict[str, list[str]] = {}
        for v in fleet.worker_views(time.time()):
            for r in v.resident:
                loaded.setdefault(r.model, []).append(v.id)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "genserve", **m.public(),
             "queue_depth": fleet.queue_depth(name), "loaded_on": sorted(loaded.get(name, []))}
            for name, m in config.models.items()
        ]}

    @app.get("/v1/workers", tags=["workers"])
    async def list_workers():
        return {"object": "list", "data": [v.to_dict() for v in fleet.worker_views(time.time())],
                "recent_residency_changes": fleet.residency_changes()}

    def _up_workers() -> dict[str, set[str]]:
        """Workers the engine schedules on -> the models they hold."""
        return {v.id: {r.model for r in v.resident} for v in fleet.worker_views(time.time()) if v.up}

    def _check_model(name: str, worker: str | None) -> None:
        if name not in config.models:
            raise RequestError("model", f"unknown model {name!r}", status=404, code="not_found")
        if worker is not None and worker not in _up_workers():
            raise RequestError("worker", f"no running worker {worker!r}", status=404, code="not_found")

    @app.post("/v1/models/{name}/load", tags=["models"], status_code=202)
    async def load_model(name: str, body: LoadRequest | None = None):
        worker = body.worker if body else None
        _check_model(name, worker)
        workers = control.load_model(name, worker)
        if not workers:
            already = sorted(w for w, models in _up_workers().items() if name in models)
            if already and (worker is None or worker in already):
                return JSONResponse({"model": name, "loading_on": [], "already_on": already}, status_code=200)
            raise RequestError("model", f"no worker has room for {name} without evicting models in use",
                               status=409, code="no_capacity")
        return {"model": name, "loading_on": workers}

    @app.post("/v1/models/{name}/unload", tags=["models"])
    async def unload_model(name: str, body: LoadRequest | None = None):
        worker = body.worker if body else None
        _check_model(name, worker)
        return {"model": name, "unloaded_from": control.unload_model(name, worker)}

    app.include_router(observability_router(rt.observer))
    app.include_router(usage_router(jobs.usage, rt.clock))
    try:
        rt.listeners.append(TenantMetrics(config.access, rt.observer.metrics.registry,
                                          lambda jid: (jobs.get(jid) or {}).get("tenant")))
    except ValueError:
        pass  # a second app over the same runtime: its series are registered already

    @app.get("/healthz", tags=["health"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz():
        ok = control.ready  # false from the first moment of a drain: load balancers stop sending
        return JSONResponse({"ready": ok, "draining": control.draining,
                             "workers": {v.id: v.up for v in fleet.worker_views(time.time())}},
                            status_code=200 if ok else 503)

    return app


class _Reconnect(Exception):
    """The event hub closed the streams: the server is shutting down."""


def _draining() -> JSONResponse:
    return error(503, None, "the server is shutting down; retry shortly (another replica, or this one after its "
                 "restart)", code="shutting_down", headers={"Retry-After": "5"})
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
