"""Routes for observing the server: Prometheus metrics, window stats, time series, the dashboard."""
from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..observe.observer import Observer
from ..observe.stats import parse_duration
from ..requests import RequestError

DASHBOARD = Path(__file__).parent / "dashboard"
MAX_POINTS = 720


def _duration(field: str, text: str, **kw) -> float:
    try:
        return parse_duration(text, **kw)
    except ValueError as e:
        raise RequestError(field, str(e)) from None


def observability_router(obs: Observer) -> APIRouter:
    r = APIRouter()

    @r.get("/metrics", tags=["observability"], include_in_schema=False)
    async def metrics():
        return Response(obs.prometheus_text(), media_type=CONTENT_TYPE_LATEST)

    @r.get("/v1/stats", tags=["observability"])
    async def stats(window: str = "1h"):
        """Per model over the window: counts, throughput, P50/P95/P99/P99.9 end-to-end and per stage,
        failure rate by code, cold-start rate, mean batch size, utilization, cost per inference, idle cost."""
        return obs.stats(_duration("window", window), time.time())

    @r.get("/v1/stats/series", tags=["observability"])
    async def series(window: str = "10m", step: str = "5s"):
        """The dashboard's time series: one point per ``step`` over the last ``window``."""
        w = _duration("window", window)
        s = _duration("step", step, lo=0.5, hi=w)
        if w / s > MAX_POINTS:
            raise RequestError("step", f"window/step gives {int(w / s)} points; the limit is {MAX_POINTS}")
        return {"window_s": w, "step_s": s, "points": obs.series(w, s, time.time())}

    @r.get("/dashboard", include_in_schema=False)
    async def dashboard():
        return FileResponse(DASHBOARD / "index.html", media_type="text/html")

    @r.get("/dashboard/{name}", include_in_schema=False)
    async def dashboard_asset(name: str):
        path = DASHBOARD / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise RequestError("path", f"no dashboard asset {name!r}", status=404, code="not_found")
        return FileResponse(path)

    @r.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/dashboard")

    return r
