"""HTTP API (FastAPI). Routes translate between HTTP and the runtime; no scheduling logic here."""
from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...config.load import Config
from ...engine import ErrorCode
from ..jobs.loras import s3_fetcher
from ..jobs.views import Control, FleetView, JobReader
from ..observe.tenant_usage import TenantMetrics, usage_router
from ..requests import RequestError
from ..runtime.runtime import QueueFull, Runtime
from ..security import auth
from ..security.limits import BodyLimit, SameHostRedirects
from .api import Api, error
from .docs_assets import mount_docs
from .jobs_api import jobs_router
from .loras_api import loras_router
from .observability_api import observability_router
from .openai.edits import openai_edits_router
from .openai.images import openai_images_router
from .openai.videos import openai_videos_router
from .openapi import install_openapi
from .schemas import LoadRequest

__all__ = ["create_app", "error"]


def create_app(config: Config, runtime: Runtime | None = None) -> FastAPI:
    rt = runtime or Runtime(config)
    # The routes see the system through these read models and the runtime's control surface only.
    control: Control = rt
    fleet: FleetView = rt.fleet
    jobs: JobReader = rt.store
    keys = auth.open_key_store(config)  # after the runtime opened (and migrated) the store
    api = Api(config, rt, auth.TenantGate(config.access, jobs.queued_count))

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
    app.add_middleware(SameHostRedirects)
    app.add_middleware(BodyLimit, max_bytes=config.http.max_body_bytes, max_upload_bytes=config.http.max_upload_bytes)

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
        headers = getattr(exc, "headers", None)  # a 405's Allow: openapi.AllowMiddleware
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
        return error(429, "model", exc.message(retry),
                     code="queue_full", headers={"Retry-After": retry})

    app.include_router(jobs_router(api))
    app.include_router(openai_images_router(api))
    app.include_router(openai_videos_router(api))
    app.include_router(openai_edits_router(api))
    app.include_router(loras_router(api, rt.loras, s3_fetcher(config)))

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
        # False from the first moment of a drain (load balancers stop sending) and while no worker
        # is ready or held; the map says, per worker, whether it counts (runtime.ready).
        ok = control.ready
        return JSONResponse({"ready": ok, "draining": control.draining, "role": getattr(rt, "role", "all"),
                             "workers": control.worker_readiness()},
                            status_code=200 if ok else 503)

    return app
