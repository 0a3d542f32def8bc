"""The OpenAI Images API over genserve jobs: each image is one job; the call waits for them
(wait.py: deadline, disconnect, failures). docs/api.md lists what each field does."""
from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ....config.load import ModelConfig, parse_size
from ...requests import MAX_SEED, JobParams, RequestError, validate
from ...security.auth import principal
from ...security.keys import Principal
from ..api import Api, draining
from ..schemas import ImageGenerationRequest
from .wait import wait_jobs

MAX_N = 10
# ``quality`` -> a multiple of the model's default_steps (capped at its max_steps), and the name the
# response reports. An explicit ``steps`` wins over ``quality``.
QUALITY_STEPS = {"low": (0.5, "low"), "medium": (1.0, "medium"), "auto": (1.0, "medium"),
                 "standard": (1.0, "medium"), "high": (2.0, "high"), "hd": (2.0, "high"), "xhigh": (3.0, "xhigh"),
                 "max": (4.0, "max")}


def quality_steps(quality: str, m: ModelConfig) -> int:
    return max(1, min(m.max_steps, _wanted(quality, m)))


def _wanted(quality: str, m: ModelConfig) -> int:
    return round(m.default_steps * QUALITY_STEPS[quality][0])


def quality_reported(quality: str, m: ModelConfig) -> str:
    """The name the response reports: the level asked for, or, where ``max_steps`` (or the floor of
    1 step) clamped it, the highest level whose own steps the run reached: ``xhigh`` on a model
    with default 2 and max 4 steps ran 4 steps, what ``high`` asks for, and says ``high``."""
    ran = quality_steps(quality, m)
    if ran == _wanted(quality, m):
        return QUALITY_STEPS[quality][1]
    reached = [name for q, (_, name) in QUALITY_STEPS.items() if _wanted(q, m) <= ran]
    return max(reached, key=_LEVELS.index, default="low")


_LEVELS = ["low", "medium", "high", "xhigh", "max"]


def _size(size: str | None) -> dict[str, int]:
    """``size`` as job fields: nothing (the model's default_size) for absent or ``auto``."""
    if size is None or size == "auto":
        return {}
    try:
        w, h = parse_size(size)
    except ValueError as e:
        raise RequestError("size", f"{e} (or auto: the model's default size)") from None
    if w <= 0 or h <= 0:
        raise RequestError("size", "width and height must be positive")
    return {"width": w, "height": h}


def job_bodies(body: ImageGenerationRequest, models: dict[str, ModelConfig]) -> tuple[list[dict[str, Any]], int,
                                                                                       str | None]:
    """The native job bodies for the call (image i gets seed + i), n, and the quality reported."""
    image_models = [name for name, m in models.items() if m.kind == "image"]
    model = body.model or (image_models[0] if image_models else None)
    m = models.get(model)
    if m is not None and m.kind != "image":
        raise RequestError("model", f"{model} is a {m.kind} model, not an image model")
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise RequestError("n", f"must be between 1 and {MAX_N}")
    seed = random.randint(0, MAX_SEED - MAX_N) if body.seed is None else body.seed
    if body.seed is not None and not 0 <= seed <= MAX_SEED - (n - 1):
        raise RequestError("seed", f"must be between 0 and {MAX_SEED - (n - 1)} (image i of n gets seed + i)")
    steps, quality = body.steps, None
    if body.quality is not None and m is not None:
        quality = QUALITY_STEPS[body.quality][1]
        if steps is None:
            steps = quality_steps(body.quality, m)
            quality = quality_reported(body.quality, m)
    base = {"model": model, "prompt": body.prompt, "negative_prompt": body.negative_prompt, **_size(body.size),
            "steps": steps, "guidance": body.guidance, "timeout_s": body.timeout_s, "priority": body.priority,
            "output_format": body.output_format, "output_compression": body.output_compression,
            "loras": [a.model_dump() for a in body.loras] if body.loras else None}
    return [dict(base, seed=seed + i) for i in range(n)], n, quality


def openai_images_router(api: Api) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/images/generations", tags=["openai"])
    async def images_generations(body: ImageGenerationRequest, request: Request, who: Principal = Depends(principal)):
        bodies, n, quality = job_bodies(body, api.config.models)
        if api.control.draining:
            return draining()
        params = [validate({**b, **api.resolve_loras(b, who)}, api.config.models, random_seed=0) for b in bodies]
        params = [api.gate.default_priority(who.tenant, p, explicit=body.priority is not None) for p in params]
        api.gate.admit(who.tenant, params[0].priority, n)
        submitted = api.control.submit_many(params, who.tenant)
        api.control.kick()
        finals = await wait_jobs(api, request, submitted)
        if not isinstance(finals, list):
            return finals
        if body.stream:
            return StreamingResponse(completed_events(api, finals, params[0], quality), media_type="text/event-stream")
        return await images_response(api, request, finals, body.response_format, quality)

    return router


async def images_response(api: Api, request: Request, jobs: list[dict[str, Any]], response_format: str | None,
                          quality: str | None) -> dict[str, Any]:
    """OpenAI's ImagesResponse for finished jobs (generations and edits): each image as a URL (the
    job's result) or base64."""
    p = jobs[0]["params"]
    data = []
    for j in jobs:
        if response_format == "b64_json":
            raw = await _read(api, j["results"][0]["key"])
            data.append({"b64_json": base64.b64encode(raw).decode(), "revised_prompt": None})
        else:
            data.append({"url": f"{api.base(request)}v1/jobs/{j['id']}/result", "revised_prompt": None})
    return {"created": int(time.time()), "data": data, "background": None,
            "output_format": p.get("output_format") or "png", "quality": quality,
            "size": f"{p['width']}x{p['height']}", "steps": p.get("steps"), "usage": None}


async def _read(api: Api, key: str) -> bytes:
    return await asyncio.get_running_loop().run_in_executor(None, api.results.read, key)


async def completed_events(api: Api, jobs: list[dict[str, Any]], p: JobParams, quality: str | None):
    """``stream: true``: once every image exists, one ``image_generation.completed`` event per image
    (no partial images: a diffusion model's intermediate latents are not pictures worth sending)."""
    zero = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
            "total_tokens": 0}
    for j in jobs:
        raw = await _read(api, j["results"][0]["key"])
        event = {"type": "image_generation.completed", "b64_json": base64.b64encode(raw).decode(),
                 "created_at": int(time.time()), "size": f"{p.width}x{p.height}", "quality": quality or "auto",
                 "steps": p.steps, "background": "auto", "output_format": p.output_format, "usage": zero}
        yield f"event: image_generation.completed\ndata: {json.dumps(event)}\n\n"
