"""The OpenAI Videos API over genserve jobs: a video is a job of a video model, under the job's id.

``POST /v1/videos`` takes JSON or ``multipart/form-data`` (what the official client sends), with
an optional ``input_reference``: the conditioning frame of an image-to-video model (a file part,
or ``{"image_url": "data:..."}``), stored as the job's ``image``. ``seconds`` becomes frames by
``frames_for``. Another tenant's video, or a job that is not a video, is a 404.
"""
from __future__ import annotations

import json
import math
from typing import Any

from fastapi import APIRouter, Depends, Request

from ....config.load import ModelConfig, parse_size
from ...requests import RequestError
from ...security.auth import principal
from ...security.keys import Principal
from ...status import JobStatus, is_terminal
from .. import openapi_rules as rules
from ..api import Api
from ..jobs_api import job_page, list_body
from ..multipart import Part, file_data_url, parse_form
from ..schemas import lora_refs

# genserve's own job fields a create may carry too (the client's extra_body); form fields are text.
_EXTRA: dict[str, type] = {"seed": int, "steps": int, "guidance": float, "negative_prompt": str, "priority": str}
_FIELDS = {"prompt", "model", "seconds", "size", "input_reference", "loras", *_EXTRA}
# validate() names job fields; a videos request names its own
_RENAMED = {"width": "size", "height": "size", "num_frames": "seconds", "image": "input_reference"}
_STATUS = {JobStatus.QUEUED: "queued", JobStatus.RUNNING: "in_progress", JobStatus.SUCCEEDED: "completed",
           JobStatus.FAILED: "failed", JobStatus.CANCELED: "failed"}


def frames_for(seconds: float, m: ModelConfig) -> int:
    """``seconds`` × the model's fps, rounded to the nearest frame count the model can make
    (``(frames - 1) % frame_stride == 0``, at least 1; halfway: the longer). More than ``max_frames``: a 400 naming
    ``seconds`` with the longest clip the model makes."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise RequestError("seconds", "must be a positive number of seconds")
    stride = m.frame_stride
    n = min(seconds * m.fps, m.max_frames + 2.0 * stride)  # far too long stays too long, and finite
    frames = 1 + stride * max(0, math.floor((n - 1) / stride + 0.5))  # ties: the longer clip
    if frames > m.max_frames:
        longest = 1 + stride * ((m.max_frames - 1) // stride)
        raise RequestError("seconds", f"{seconds:g} s is {seconds * m.fps:g} frames at {m.fps} fps; {m.name} makes "
                                      f"at most {m.max_frames} frames ({longest / m.fps:g} s)")
    return frames


def seconds_of(frames: int, fps: int) -> str:
    """A clip's duration as the API spells it: a decimal string ("4", "1.125")."""
    return f"{frames / fps:g}"


def video_models(api: Api) -> list[str]:
    return [n for n, m in api.config.models.items() if m.kind == "video"]


def openai_videos_router(api: Api) -> APIRouter:
    router = APIRouter()

    def video_or_404(video_id: str, who: Principal) -> dict[str, Any]:
        job = api.jobs.get(video_id)
        if job is None or job["model"] not in video_models(api):
            raise RequestError("id", f"no video {video_id!r}", status=404, code="not_found")
        return api.job_or_404(video_id, who)  # another tenant's: the same 404

    @router.post("/v1/videos", tags=["openai"], openapi_extra=_CREATE_BODY, responses=_errors(415, 429))
    async def create_video(request: Request, who: Principal = Depends(principal)):
        fields = await _read_fields(request)
        try:
            job, _ = await api.create_job(_job_body(api, fields), who, explicit_priority="priority" in fields)
        except RequestError as e:  # validate() names job fields; this API's names differ
            raise RequestError(_RENAMED.get(e.field, e.field), e.message, e.status, e.code) from None
        return video_view(api, api.jobs.get(job["id"]))

    @router.get("/v1/videos", tags=["openai"])
    async def list_videos(limit: int = 20, after: str | None = None, order: str = "desc",
                          who: Principal = Depends(principal)):
        """The caller's tenant's videos (an admin key too: its own tenant's), newest first."""
        page = job_page(api, who, limit=limit, after=after, order=order, tenant=who.tenant,
                        models=tuple(video_models(api)))
        return list_body([video_view(api, j) for j in page.items], page.has_more)

    @router.get("/v1/videos/{video_id}", tags=["openai"], responses=_errors(404))
    async def retrieve_video(video_id: str, who: Principal = Depends(principal)):
        return video_view(api, video_or_404(video_id, who))

    @router.get("/v1/videos/{video_id}/content", tags=["openai"], responses={
        200: {"description": "The MP4, or the thumbnail image", "content": {
            "video/mp4": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}}}},
        307: {"description": "Redirect to the object store's signed URL"}, **_errors(404, 409, 410)})
    async def video_content(video_id: str, variant: str = "video", who: Principal = Depends(principal)):
        """The MP4 (``variant=video``) or its thumbnail (``variant=thumbnail``)."""
        if variant not in ("video", "thumbnail", "spritesheet"):
            raise RequestError("variant", "must be video or thumbnail")
        if variant == "spritesheet":
            raise RequestError("variant", "genserve makes no spritesheets (video or thumbnail)", status=404,
                               code="not_found")
        job = video_or_404(video_id, who)
        ref = api.result_ref(job, 0)
        if variant == "thumbnail":
            ref = ref.get("thumbnail")
            if not isinstance(ref, dict):
                raise RequestError("variant", "this video has no thumbnail (made before thumbnails were written)",
                                   status=404, code="not_found")
        return await api.serve_result(job, ref)

    @router.delete("/v1/videos/{video_id}", tags=["openai"], responses=_errors(404, 409))
    async def delete_video(video_id: str, who: Principal = Depends(principal)):
        """Delete a finished video: its files and its record. A queued or in-progress one: 409
        (cancel it first: ``POST /v1/jobs/{id}/cancel``)."""
        job = video_or_404(video_id, who)
        if not is_terminal(job["status"]):
            raise RequestError("id", f"video is {_STATUS[job['status']]}; cancel it first (POST /v1/jobs/{video_id}"
                               "/cancel), then delete it", status=409, code="conflict")
        api.control.delete_job(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    return router


def video_view(api: Api, job: dict[str, Any]) -> dict[str, Any]:
    """A job as the Videos API's ``Video`` object."""
    p, m = job["params"], api.config.models.get(job["model"])
    status = _STATUS.get(job["status"], "failed")  # (no other status is written)
    if job["status"] == JobStatus.SUCCEEDED:
        progress = 100
    else:
        step = api.control.progress(job["id"]) if job["status"] == JobStatus.RUNNING else None
        progress = min(99, 100 * step[0] // step[1]) if step and step[1] else 0
    error = None
    if status == "failed":
        error = {"code": job["error_code"] or job["status"], "message": job["error_message"] or job["status"]}
    finished = job["t_finished"]
    expires = api.retention.results_expire_at(finished) if finished is not None else None
    return {
        "id": job["id"], "object": "video", "model": job["model"], "status": status, "progress": progress,
        "created_at": int(job["t_received"]), "completed_at": None if finished is None else int(finished),
        "expires_at": None if expires is None else int(expires), "prompt": p.get("prompt"),
        "seconds": seconds_of(p.get("num_frames", 0), m.fps if m else 8),
        "size": f"{p.get('width')}x{p.get('height')}", "error": error, "remixed_from_video_id": None,
    }


async def _read_fields(request: Request) -> dict[str, Any]:
    """The create body as field -> value: JSON (typed) or a form (text and file parts)."""
    ctype = request.headers.get("content-type", "")
    raw = await request.body()
    if ctype.lower().startswith("multipart/form-data"):
        form: dict[str, Any] = {}
        for part in await parse_form(raw, ctype):  # a repeated name keeps the first
            form.setdefault(part.name, part if part.filename is not None else part.text())
        # The client spells an object field as bracketed keys: input_reference[image_url]=...
        ref = {k[len("input_reference["):-1]: v for k, v in form.items()
               if k.startswith("input_reference[") and k.endswith("]")}
        fields: dict[str, Any] = {k: v for k, v in form.items() if not k.startswith("input_reference[")}
        if ref:
            fields.setdefault("input_reference", ref)
        for k, typ in _EXTRA.items():
            if isinstance(fields.get(k), str) and typ is not str:
                try:
                    fields[k] = typ(fields[k])
                except ValueError:
                    raise RequestError(k, f"must be {'an integer' if typ is int else 'a number'}") from None
    elif ctype.lower().startswith("application/json") or not ctype:
        try:
            fields = json.loads(raw)
        except ValueError as e:
            raise RequestError("body", f"malformed JSON: {e}") from None
        if not isinstance(fields, dict):
            raise RequestError("body", "must be a JSON object")
    else:
        raise RequestError("body", f"unsupported content type {ctype[:60]!r}: send application/json or "
                                   "multipart/form-data", status=415, code="unsupported_media_type")
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise RequestError(unknown[0], "unknown field")
    try:
        fields["loras"] = lora_refs(fields.get("loras"))
    except ValueError as e:
        field, _, message = str(e).partition(": ")
        raise RequestError(field, message) from None
    for k, v in fields.items():
        if v is None or k in ("input_reference", "loras"):
            continue
        want = {int: int, float: (int, float)}.get(_EXTRA.get(k, str), str) if k != "seconds" else (str, int, float)
        if isinstance(v, bool) or not isinstance(v, want):
            raise RequestError(k, "must be " + {int: "an integer", str: "a string"}.get(want, "a number"))
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(k, "is not valid Unicode (a lone surrogate)") from None
    return fields


def _job_body(api: Api, f: dict[str, Any]) -> dict[str, Any]:
    """The native job body of a create: model, size, seconds and the reference checked here;
    the rest by ``validate`` when the job is created."""
    models = api.config.models
    name = f.get("model") or next(iter(video_models(api)), None)
    if name is None:
        raise RequestError("model", "this server has no video models")
    if name in models and models[name].kind != "video":
        raise RequestError("model", f"{name} is an {models[name].kind} model; /v1/videos needs a video model "
                                    f"({', '.join(video_models(api)) or 'none configured'})")
    if name not in models:
        raise RequestError("model", f"unknown model {name!r}; video models: {', '.join(video_models(api))}")
    m = models[name]
    body: dict[str, Any] = {"model": name, "prompt": f.get("prompt")}
    if not isinstance(body["prompt"], str):
        raise RequestError("prompt", "is required")
    if f.get("size") is not None:
        try:
            body["width"], body["height"] = parse_size(f["size"])
        except ValueError as e:
            raise RequestError("size", str(e)) from None
    if f.get("seconds") is not None:
        try:
            seconds = float(f["seconds"])
        except (ValueError, OverflowError):
            raise RequestError("seconds", f"must be a number of seconds, got {str(f['seconds'])[:20]!r}") from None
        body["num_frames"] = frames_for(seconds, m)
    if f.get("input_reference") is not None:
        body["image"] = _reference(f["input_reference"])
    body.update({k: f[k] for k in (*_EXTRA, "loras") if f.get(k) is not None})
    return body


def _reference(ref: Any) -> str:
    """``input_reference`` as the job's ``image`` (a data URL)."""
    if isinstance(ref, Part):
        return file_data_url(ref)  # the type its bytes hold; anything else: a 400 naming the field
    if isinstance(ref, str):  # a data URL in a text field
        ref = {"image_url": ref}
    if isinstance(ref, dict):
        if ref.get("file_id") is not None:
            raise RequestError("input_reference", "file_id references are not supported: upload the image or send "
                                                  "image_url as a data URL")
        url = ref.get("image_url")
        if isinstance(url, str) and url.startswith("data:"):
            return url
        raise RequestError("input_reference", "image_url must be a data: URL (genserve fetches no remote images)")
    raise RequestError("input_reference", "must be an image file, a data URL or {\"image_url\": \"data:...\"}")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {404: "No such video (another tenant's is not found either)", 409: "Not finished (no content yet; "
            "cannot be deleted)", 410: "Its files were deleted (retention)", 415: "Neither JSON nor a form",
            429: "Over a limit: retry after Retry-After seconds"}
    return {s: {"description": text[s], "content": {"application/json": {"schema": {"$ref": "#/components/schemas/"
                                                                                          "Error"}}}} for s in statuses}


_JSON_FIELDS = {
    "prompt": {"type": "string", **rules.NON_EMPTY}, "model": {"type": "string"},
    "seconds": {"type": "string", **rules.SECONDS,
                "description": "clip length; × the model's fps, rounded to its frame stride"},
    "size": {"type": "string", **rules.SIZE},
    "input_reference": {"type": "object", "properties": {"image_url": {"type": "string"}},
                        "description": "image-to-video models: the first frame, as a data URL"},
    "seed": {"type": "integer", **rules.SEED}, "steps": {"type": "integer", **rules.AT_LEAST_1},
    "guidance": {"type": "number", "minimum": 0, "maximum": 50},
    "negative_prompt": {"type": "string"}, "priority": {"type": "string", "enum": ["high", "standard", "low"]}}
_CREATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["prompt"], "additionalProperties": False,
                                    "properties": _JSON_FIELDS}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["prompt"], "additionalProperties": False,
                                       "properties": {**{k: _JSON_FIELDS[k] for k in ("prompt", "model", "seconds",
                                                                                        "size")},
                                                      "input_reference": {"type": "string", "format": "binary"}}}}}}}
