"""Sends the requests (HTTP): closed loop with C in flight, or open loop at scheduled times.

Latency is client-observed: from sending the request to seeing its outcome — for genserve the
terminal Server-Sent Event of the job, for an OpenAI-images endpoint the HTTP response. Against
genserve the job records are fetched afterwards for the per-stage breakdown and cost.
"""
from __future__ import annotations

import asyncio
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import httpx

from ..server.status import JobStatus, is_terminal
from .report import summarize_run
from .workload import Workload, arrival_offsets, draw

APIS = ("genserve", "openai")


def _size(body: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k != "size"}
    if "size" in body:
        w, _, h = str(body["size"]).lower().partition("x")
        out["width"], out["height"] = int(w), int(h)
    return out


async def _genserve_one(client: httpx.AsyncClient, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    r = await client.post("/v1/jobs", json=_size(body))
    if r.status_code != 202:
        return {"ok": False, "error": f"http_{r.status_code}", "status_code": r.status_code}
    job_id = r.json()["id"]
    final = None
    async with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as s:
        event = None
        async for line in s.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and is_terminal(event):
                final = event
                err = (json.loads(line[5:]).get("error") or {}).get("code")
                break
    if final is None:
        return {"ok": False, "error": "stream_ended", "job_id": job_id}
    return {"ok": final == JobStatus.SUCCEEDED, "error": None if final == JobStatus.SUCCEEDED else (err or final), "job_id": job_id,
            "status_code": 202}


async def _openai_one(client: httpx.AsyncClient, body: dict[str, Any], path: str) -> dict[str, Any]:
    payload = {"model": body["model"], "prompt": body.get("prompt", "benchmark"), "n": 1,
               "response_format": "b64_json"}
    if "size" in body:
        payload["size"] = body["size"]
    r = await client.post(path, json=payload)
    if r.status_code != 200:
        return {"ok": False, "error": f"http_{r.status_code}", "status_code": r.status_code}
    data = r.json().get("data") or []
    return {"ok": bool(data), "error": None if data else "empty_response", "status_code": 200}


async def _job_records(client: httpx.AsyncClient, results: list[dict[str, Any]], wait_s: float = 10.0) -> None:
    """Attach breakdown and cost from the job records (cost is set when a batch ends: retry briefly)."""
    async def one(r: dict[str, Any]) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            resp = await client.get(f"/v1/jobs/{r['job_id']}")
            if resp.status_code != 200:
                return
            job = resp.json()
            cost = job.get("cost") or {}
            if cost.get("device_seconds") is not None or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        batch = job.get("batch") or {}
        r.update(breakdown=job.get("breakdown"), batch_id=batch.get("id"), batch_size=batch.get("size"),
                 device_seconds=cost.get("device_seconds"), cost_usd=cost.get("usd"), status=job.get("status"))

    sem = asyncio.Semaphore(16)

    async def bounded(r: dict[str, Any]) -> None:
        async with sem:
            await one(r)

    await asyncio.gather(*(bounded(r) for r in results if r.get("job_id")))


async def run(url: str, workload: Workload, n: int, *, api: str = "genserve", seed: int = 0, timeout: float = 600.0,
              api_key: str | None = None, on_done: Callable[[dict[str, Any]], None] | None = None,
              label: str | None = None) -> dict[str, Any]:
    if api not in APIS:
        raise ValueError(f"api must be one of {', '.join(APIS)}")
    bodies = draw(workload, n, seed)
    offsets = arrival_offsets(workload.arrival, n, seed)
    url = url.rstrip("/")
    path = "/v1/images/generations"
    if api == "openai" and url.endswith("/v1"):  # an OpenAI-style base URL
        url = url[:-3]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    in_flight = workload.arrival.concurrency if offsets is None else n
    limits = httpx.Limits(max_connections=in_flight + 8, max_keepalive_connections=in_flight + 8)
    results: list[dict[str, Any]] = [None] * n  # type: ignore[list-item]
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60.0, read=timeout), limits=limits,
                                 headers=headers) as client:
        t0 = time.monotonic()
        started_at = time.time()

        async def send(i: int) -> None:
            body = bodies[i]
            sent = time.monotonic()
            try:
                out = await (_genserve_one(client, body, timeout) if api == "genserve" else _openai_one(client, body, path))
            except httpx.HTTPError as e:
                out = {"ok": False, "error": type(e).__name__}
            done = time.monotonic()
            results[i] = {"i": i, "model": body["model"], "size": body.get("size"), "steps": body.get("steps"),
                          "priority": body.get("priority"), "t_sent": sent - t0, "t_done": done - t0,
                          "latency_s": done - sent, **out}
            if on_done:
                on_done(results[i])

        if offsets is None:
            queue = iter(range(n))

            async def worker() -> None:
                for i in queue:
                    await send(i)

            await asyncio.gather(*(worker() for _ in range(min(workload.arrival.concurrency, n))))
        else:
            async def at(i: int) -> None:
                await asyncio.sleep(max(0.0, offsets[i] - (time.monotonic() - t0)))
                await send(i)

            await asyncio.gather(*(at(i) for i in range(n)))
        duration = time.monotonic() - t0
        if api == "genserve":
            await _job_records(client, results)
    return {
        "version": 1, "label": label, "target": {"url": url, "api": api},
        "config": {"n": n, "seed": seed, "arrival": workload.arrival.__dict__, "arrival_text": workload.arrival.describe(),
                   "requests": list(workload.requests)},
        "machine": {"client": f"{platform.machine()}, {platform.system()} {platform.release()}, python {platform.python_version()}"},
        "started_at": started_at, "requests": results, "summary": summarize_run(results, duration),
    }
