"""``POST /v1/images/edits``: the OpenAI Images edit call over genserve jobs (multipart only).

Each output is one job: image-to-image (``task`` img2img) without a mask, inpainting with one.
Several images (``image[]``) are each edited ``n`` times, image-major; as in OpenAI's API the mask
applies to the first image only. OpenAI's mask convention (fully transparent = the area to edit)
is translated to genserve's (white = repaint): alpha below 128 becomes white, the rest black; a
mask without an alpha channel is refused. ``size`` absent or ``auto``: the model's default size
(each image is fitted to the size by cover-scaling and centre-cropping). Besides the OpenAI fields,
``seed`` (output k gets seed + k), ``steps``, ``guidance``, ``strength`` and ``negative_prompt``
are honoured; fields genserve cannot honour (quality, background, user, ...) are accepted and
ignored.
"""
from __future__ import annotations

import asyncio
import io
from typing import Any

from fastapi import APIRouter, Depends, Request

from ....backends.image_input import ImageInputError, InputImage, check_input, decode_bytes
from ....config.load import parse_size
from ...requests import RequestError
from ...security.auth import principal
from ...security.keys import Principal
from .. import openapi_rules as rules
from ..api import Api, draining
from ..multipart import Part, is_multipart, parse_form, typed
from ..schemas import lora_refs
from .images import images_response
from .wait import wait_jobs

MAX_OUTPUTS = 10
MAX_IMAGES = 16
HONOURED = {"seed": "int", "steps": "int", "guidance": "float", "strength": "float", "negative_prompt": "str",
            "output_format": "str", "output_compression": "int"}


def openai_mask(data: bytes) -> InputImage:
    """An OpenAI mask (transparent = edit) as a genserve mask (white = repaint)."""
    try:
        img = decode_bytes(data)
    except ImageInputError as e:
        raise RequestError("mask", str(e)) from None
    if "A" not in img.getbands() and not (img.mode == "P" and "transparency" in img.info):
        raise RequestError("mask", "must be a PNG with an alpha channel: fully transparent pixels mark the area to "
                                   "edit (or use POST /v1/jobs, where a mask is white = repaint)")
    alpha = img.convert("RGBA").getchannel("A")
    repaint = alpha.point(lambda a: 255 if a < 128 else 0)
    buf = io.BytesIO()
    repaint.save(buf, format="PNG")
    return check_input(buf.getvalue(), mask=True)


def _image(part: Part) -> InputImage:
    try:
        return check_input(part.data)
    except ImageInputError as e:
        raise RequestError("image", f"{part.filename or 'the upload'}: {e}") from None


def _fields(parts: list[Part]) -> tuple[list[Part], Part | None, dict[str, str]]:
    images, mask, fields = [], None, {}
    for p in parts:
        if p.name in ("image", "image[]"):
            if p.filename is None:
                raise RequestError("image", "must be a file part")
            images.append(p)
        elif p.name == "mask":
            if p.filename is None:
                raise RequestError("mask", "must be a file part")
            mask = p
        elif p.filename is None:
            fields[p.name] = p.text()
    return images, mask, fields


def openai_edits_router(api: Api) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/images/edits", tags=["openai"], openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image", "prompt"], "properties": {
            "image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"},
            "prompt": {"type": "string", **rules.NON_EMPTY}, "model": {"type": "string"},
            "n": {"type": "integer", "minimum": 1, "maximum": MAX_OUTPUTS},
            "size": {"type": "string", **rules.SIZE_OR_AUTO},
            "response_format": {"type": "string", "enum": ["url", "b64_json"]}}}}}}})
    async def images_edits(request: Request, who: Principal = Depends(principal)):
        ctype = request.headers.get("content-type")
        if not is_multipart(ctype):
            raise RequestError("body", "must be multipart/form-data (image and mask as file parts)", status=415,
                               code="unsupported_media_type")
        images, mask_part, f = _fields(await parse_form(await request.body(), ctype))
        if not images:
            raise RequestError("image", "is required (a file part; several as image[])")
        if len(images) > MAX_IMAGES:
            raise RequestError("image", f"at most {MAX_IMAGES} images")
        prompt = f.get("prompt")
        if not prompt or not prompt.strip():
            raise RequestError("prompt", "must not be empty")
        n = typed("n", f["n"], "int") if "n" in f else 1
        if not 1 <= n <= MAX_OUTPUTS or n * len(images) > MAX_OUTPUTS:
            raise RequestError("n", f"must be between 1 and {MAX_OUTPUTS}, and n × images at most {MAX_OUTPUTS}")
        response_format = f.get("response_format") or "url"
        if response_format not in ("url", "b64_json"):
            raise RequestError("response_format", "must be url or b64_json")
        model = f.get("model") or next((name for name, m in api.config.models.items() if m.kind == "image"
                                        and m.family.traits is not None and m.family.traits.edit), None)
        if model in api.config.models and api.config.models[model].kind != "image":
            raise RequestError("model", f"{model} is a {api.config.models[model].kind} model, not an image model")
        base: dict[str, Any] = {"model": model, "prompt": prompt}
        size = f.get("size")
        if size and size != "auto":
            try:
                base["width"], base["height"] = parse_size(size)
            except ValueError as e:
                raise RequestError("size", str(e)) from None
        for name, kind in HONOURED.items():
            if name in f:
                base[name] = typed(name, f[name], kind)
        try:
            base["loras"] = lora_refs(f.get("loras"))
        except ValueError as e:
            field, _, message = str(e).partition(": ")
            raise RequestError(field, message) from None
        if api.control.draining:
            return draining()
        loop = asyncio.get_running_loop()
        inputs = [await loop.run_in_executor(None, _image, p) for p in images]
        mask = await loop.run_in_executor(None, openai_mask, mask_part.data) if mask_part is not None else None
        submitted = []
        try:
            for i, img in enumerate(inputs):
                for k in range(n):
                    body = dict(base, image=img, mask=mask if i == 0 else None)
                    if "seed" in base:
                        body["seed"] = base["seed"] + k
                    submitted.append((await api.create_job(body, who, explicit_priority=False))[0])
        except BaseException:
            for j in submitted:  # a later image was refused: no half answers
                api.control.cancel(j["id"])
            api.control.kick()
            raise
        finals = await wait_jobs(api, request, submitted)
        if not isinstance(finals, list):  # failed, timed out, the client went away, shutting down
            return finals
        return await images_response(api, request, finals, response_format, None)

    return router
