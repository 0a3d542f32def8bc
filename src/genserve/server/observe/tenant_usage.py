"""Per-tenant usage: ``GET /v1/usage`` (jobs, device-seconds and cost by model and UTC day, from
the job records) and Prometheus series labelled by tenant — configured tenants by name, every other
tenant as "other", so a stream of new keys cannot blow up the series count."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from prometheus_client import CollectorRegistry, Counter

from ...config.auth import AccessConfig
from ..jobs.listeners import Event
from ..requests import RequestError
from ..security.auth import principal
from ..security.keys import Principal
from ..status import is_terminal

DAY = 86400.0
MAX_DAYS = 366
TENANT_METRIC_NAMES = ("genserve_tenant_jobs", "genserve_tenant_device_seconds", "genserve_tenant_cost_usd")


class TenantMetrics:
    """A runtime listener: finished jobs and their charges, by tenant label."""

    def __init__(self, access: AccessConfig, registry: CollectorRegistry,
                 tenant_of: Callable[[str], str | None]) -> None:
        self.access, self.tenant_of = access, tenant_of
        self.jobs = Counter("genserve_tenant_jobs", "Finished jobs by tenant (configured tenants; others: other)",
                            ["tenant", "model", "status"], registry=registry)
        self.device_seconds = Counter("genserve_tenant_device_seconds", "Device-seconds charged to jobs by tenant",
                                      ["tenant", "model"], registry=registry)
        self.cost = Counter("genserve_tenant_cost_usd", "Cost charged to jobs by tenant (US$)",
                            ["tenant", "model"], registry=registry)

    def on_event(self, ev: Event) -> None:
        if is_terminal(ev.kind) and ev.record is not None:
            r = ev.record
            self.jobs.labels(self.access.metric_label(r["tenant"]), r["model"], r["status"]).inc()
        elif ev.kind == "batch_ended":
            for c in ev.data["charges"]:
                label = self.access.metric_label(self.tenant_of(c["job_id"]) or "")
                self.device_seconds.labels(label, c["model"]).inc(c["device_seconds"])
                self.cost.labels(label, c["model"]).inc(c["cost_usd"])


def usage_router(usage: Callable[[float, str | None], list[dict[str, Any]]],
                 clock: Callable[[], float] = time.time) -> APIRouter:
    """``usage(since, tenant or None)``: rows of (tenant, model, day, jobs, succeeded, failed,
    canceled, device_seconds, cost_usd)."""
    r = APIRouter()

    @r.get("/v1/usage", tags=["usage"])
    async def get_usage(days: int = 30, tenant: str | None = None, who: Principal = Depends(principal)):
        """Jobs, device-seconds and cost by tenant, model and UTC day over the last ``days`` days: the
        caller's tenant (an admin key: every tenant, or ``tenant``)."""
        if not 1 <= days <= MAX_DAYS:
            raise RequestError("days", f"must be between 1 and {MAX_DAYS}")
        if not who.admin:
            if tenant is not None and tenant != who.tenant:
                raise RequestError("tenant", f"no tenant {tenant!r}", status=404, code="not_found")
            tenant = who.tenant
        now = clock()
        since = (now // DAY - (days - 1)) * DAY  # whole UTC days, today included
        tenants: dict[str, dict[str, Any]] = {}
        for row in usage(since, tenant):
            t = tenants.setdefault(row["tenant"], {"tenant": row["tenant"], "jobs": 0, "device_seconds": 0.0,
                                                   "cost_usd": 0.0, "by_model_day": []})
            t["jobs"] += row["jobs"]
            t["device_seconds"] += row["device_seconds"]
            t["cost_usd"] += row["cost_usd"]
            t["by_model_day"].append({k: row[k] for k in ("model", "day", "jobs", "succeeded", "failed", "canceled",
                                                           "device_seconds", "cost_usd")})
        for t in tenants.values():
            t["device_seconds"], t["cost_usd"] = round(t["device_seconds"], 6), round(t["cost_usd"], 8)
        return {"object": "usage", "since": since, "until": now, "days": days,
                "data": sorted(tenants.values(), key=lambda t: t["tenant"])}

    return r
