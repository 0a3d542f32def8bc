"""The LoRA adapter registry over HTTP (docs/lora.md): upload (multipart ``name``, ``model``,
``file``; or JSON ``{name, model, source}``, admin only), list, read, delete.

Tenancy as for jobs: a tenant's upload is its own (another tenant gets 404); an admin's upload, or
an adapter from ``[loras.NAME]``, is shared. Deleting an adapter that queued or running jobs use
is refused (409): they would fail at run time.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..jobs.loras import LoraRegistry, jobs_using
from ..requests import RequestError
from ..security.auth import principal
from ..security.keys import Principal
from .api import Api
from .multipart import is_multipart, parse_form

# The names follow what register() accepts (NAME in server/jobs/loras.py); unknown fields are refused.
_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}
_FORM = {"multipart/form-data": {"schema": {
    "type": "object", "required": ["name", "model", "file"], "additionalProperties": False, "properties": {
        "name": _NAME, "model": {"type": "string", "minLength": 1}, "file": {"type": "string", "format": "binary"}}}},
    "application/json": {"schema": {
        "type": "object", "required": ["name", "model", "source"], "additionalProperties": False, "properties": {
            "name": _NAME, "model": {"type": "string", "minLength": 1},
            "source": {"type": "string", "minLength": 1,
                       "description": "a server-side path or s3:// URL (admin only)"}}}}}


def _text(fields: dict[str, Any], name: str) -> str:
    v = fields.get(name)
    if not isinstance(v, str) or not v:
        raise RequestError(name, "is required (a string)")
    return v


def loras_router(api: Api, registry: LoraRegistry, fetch=None) -> APIRouter:
    router = APIRouter()

    def visible_or_404(name: str, who: Principal) -> dict[str, Any]:
        view = registry.find(name, who.tenant, who.admin)
        if view is None:
            raise RequestError("name", f"no adapter {name!r}", status=404, code="not_found")
        return view

    @router.post("/v1/loras", status_code=201, tags=["loras"], openapi_extra={"requestBody": {"content": _FORM}})
    async def create_lora(request: Request, who: Principal = Depends(principal)):
        """Register an adapter: a ``.safetensors`` upload (multipart), or a ``source`` the server
        reads (JSON; admin keys only). 201 with ``{name, model, bytes, rank, targets, owner, ...}``."""
        owner = None if who.admin else who.tenant
        body = await request.body()
        if is_multipart(request.headers.get("content-type")):
            parts = await parse_form(body, request.headers["content-type"])
            fields: dict[str, Any] = {p.name: p.text() for p in parts if p.filename is None}
            files = [p for p in parts if p.filename is not None and p.name == "file"]
            if not files:
                raise RequestError("file", "is required: the adapter as a .safetensors file part")
            if files[0].filename and not files[0].filename.endswith(".safetensors"):
                raise RequestError("file", f"{files[0].filename!r}: only .safetensors adapters are accepted "
                                           "(never a pickle)")
            view = registry.register(_text(fields, "name"), _text(fields, "model"), files[0].data, owner)
        else:
            try:
                fields = json.loads(body or b"{}")
            except ValueError:
                raise RequestError("body", "must be JSON {name, model, source} or a multipart form") from None
            if not isinstance(fields, dict):
                raise RequestError("body", "must be a JSON object")
            unknown = sorted(set(fields) - {"name", "model", "source"})
            if unknown:
                raise RequestError(unknown[0], "unknown field")
            if not who.admin:
                raise RequestError("source", "registering from a server-side source needs an admin key; upload the "
                                             "file instead", status=403, code="forbidden")
            view = registry.register_source(_text(fields, "name"), _text(fields, "model"), _text(fields, "source"),
                                            owner, fetch=fetch)
        return JSONResponse(view, status_code=201)

    @router.get("/v1/loras", tags=["loras"])
    async def list_loras(who: Principal = Depends(principal)):
        data = registry.list(who.tenant, who.admin)
        return {"object": "list", "data": data}

    @router.get("/v1/loras/{lora}", tags=["loras"])
    async def get_lora(lora: str, who: Principal = Depends(principal)):
        return visible_or_404(lora, who)

    @router.delete("/v1/loras/{lora}", status_code=204, tags=["loras"])
    async def delete_lora(lora: str, who: Principal = Depends(principal)):
        """Delete an adapter (204); 409 while queued or running jobs use it."""
        name = lora
        view = visible_or_404(name, who)
        if view["owner"] is None and not who.admin and registry.find(name, who.tenant) == view:
            raise RequestError("name", "is a shared adapter; only an admin key may delete it", status=403,
                               code="forbidden")
        users = [j["id"] for j in jobs_using(api.jobs, view["id"], view["name"])]
        if users:
            raise RequestError("name", f"{len(users)} queued or running job(s) use it (e.g. {users[0]}); cancel them "
                                       "or wait", status=409, code="conflict")
        registry.delete(view)
        return Response(status_code=204)

    return router
