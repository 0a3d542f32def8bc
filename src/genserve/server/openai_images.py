"""The OpenAI Images API over genserve jobs: each image is one job; the call waits for them."""
from __future__ import annotations

import asyncio
import base64
import random
import time

from fastapi import APIRouter, Depends, Request

from ..auth.keys import Principal
from ..config import parse_size
from ..requests import MAX_SEED, RequestError, validate
from ..status import JobStatus
from .api import Api, Reconnect, draining, error
from .auth import principal
from .schemas import ImageGenerationRequest


def openai_images_router(api: Api) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/images/generations", tags=["openai"])
    async def images_generations(body: ImageGenerationRequest, request: Request, who: Principal = Depends(principal)):
        image_models = [n for n, m in api.config.models.items() if m.kind == "image"]
        model = body.model or (image_models[0] if image_models else None)
        if model in api.config.models and api.config.models[model].kind != "image":
            raise RequestError("model", f"{model} is a {api.config.models[model].kind} model, not an image model")
        if not 1 <= body.n <= 10:
            raise RequestError("n", "must be between 1 and 10")
        if api.control.draining:
            return draining()
        size = {}
        if body.size is not None:
            try:
                size = dict(zip(("width", "height"), parse_size(body.size)))
            except ValueError as e:
                raise RequestError("size", str(e)) from None
            if min(size.values()) <= 0:
                raise RequestError("size", "width and height must be positive")
        params = [validate({"model": model, "prompt": body.prompt, **size}, api.config.models,
                           random_seed=random.randint(0, MAX_SEED)) for _ in range(body.n)]
        params = [api.gate.default_priority(who.tenant, p, explicit=False) for p in params]
        api.gate.admit(who.tenant, params[0].priority, len(params))
        submitted = api.control.submit_many(params, who.tenant)
        api.control.kick()
        try:
            finals = [await api.wait_terminal(j["id"]) for j in submitted]
        except Reconnect:
            # The server is shutting down before the images were made. Nobody could fetch them
            # later (the caller has no job ids), so they are canceled rather than run after the restart.
            for j in submitted:
                api.control.cancel(j["id"])
            return draining()
        failed = [j for j in finals if j["status"] != JobStatus.SUCCEEDED]
        if failed:
            j = failed[0]
            return error(500, None, f"generation {j['status']}: {j['error_message'] or ''}",
                         code=j["error_code"] or j["status"])
        data = []
        for j in finals:
            if body.response_format == "b64_json":
                raw = await asyncio.get_running_loop().run_in_executor(None, api.results.read, j["results"][0]["key"])
                data.append({"b64_json": base64.b64encode(raw).decode(), "revised_prompt": None})
            else:
                data.append({"url": f"{api.base(request)}v1/jobs/{j['id']}/result", "revised_prompt": None})
        return {"created": int(time.time()), "data": data}

    return router
