"""The engine role's own small HTTP surface (``genserve serve --role engine``, docs/ha.md): it
takes no jobs (gateways do), it answers whether it leads and is ready, and serves the fleet's
Prometheus metrics while it leads.

``/readyz``: 200 with ``{"role": "engine", "leader": false}`` for a standby waiting on the lock, runtime built;
the leader answers 200 once its workers are up, 503 before and while it drains.
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from ...config.load import Config
from ..runtime.leader import EngineRole

PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def create_engine_app(config: Config, role: EngineRole) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await role.start()
        try:
            yield
        finally:
            await role.close()

    app = FastAPI(title="genserve engine", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.runtime = role  # SIGTERM drains the leader's runtime (serve.py)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "role": "engine"}

    @app.get("/readyz")
    async def readyz():
        rt = role.runtime
        body = {"role": "engine", "leader": role.leader, "ready": role.ready, "draining": role.draining,
                "leading_since": role.became_leader_at,
                "workers": {v.id: v.up for v in rt.fleet.worker_views(time.time())} if rt is not None else {}}
        return JSONResponse(body, status_code=200 if role.ready and not role.draining else 503)

    @app.get("/metrics")
    async def metrics():
        rt = role.runtime
        leader = f"# TYPE genserve_engine_leader gauge\ngenserve_engine_leader {int(role.leader)}\n".encode()
        return Response(leader + (rt.observer.prometheus_text() if rt is not None else b""), media_type=PROMETHEUS)

    return app
