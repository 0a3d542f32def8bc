"""A truthful OpenAPI description: the statuses the server really answers, with its error shape.

FastAPI documents 422 for every route with parameters, but genserve answers 400 (``app.py``'s
validation handler), and it knows nothing of 401/403 (``auth.py``), 404, 409, 413 or 429. This
module rewrites the generated schema once: model names as enums, the error schema on every
documented error status, the real content types of results and event streams, Bearer security.
``tests/server/http/test_api_fuzz.py`` holds the server to it with schemathesis.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..security.auth import OPEN_PATHS, is_admin_route
from ..security.limits import allowed_methods
from . import openapi_rules as rules

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {
            "code": {"type": "string", "description": "machine-readable: invalid_request, not_found, unauthorized, …"},
            "message": {"type": "string"},
            "field": {"type": ["string", "null"], "description": "the request field at fault"},
            "param": {"type": ["string", "null"], "description": "the same, as OpenAI clients read it"},
            "type": {"type": "string"},
        },
    }},
}
_STATUS_TEXT = {
    400: "Invalid request: the message names the field", 401: "Missing, invalid or revoked API key",
    403: "The key lacks the admin scope", 404: "Not found (another tenant's job is not found either)",
    409: "Conflict with the current state", 410: "Gone: the referenced job's results were deleted",
    413: "Request body too large", 415: "Unsupported body type (multipart/form-data expected)",
    429: "Over a limit (the model's queue, the tenant's queued jobs or rate): retry after Retry-After seconds",
    503: "Not ready, or shutting down (retry: another replica, or this one after its restart)",
    500: "The generation failed (x-should-retry: false: the server already retried what could help)",
    502: "The model could not be loaded (x-should-retry: false)",
    504: "The generation did not finish in time; its jobs were canceled (x-should-retry: false)",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer realm=\"genserve\""}},
    429: {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": "seconds"}},
}
# Extra statuses by route (method, path pattern): what the handler itself may answer.
_ROUTE_ERRORS: list[tuple[str, str, tuple[int, ...]]] = [
    ("POST", r"^/v1/jobs$", (404, 409, 410, 429)),  # 404/409/410: an image input's job reference
    # edits share the generations' wait (openai_wait): failures, load errors, draining, deadline
    ("POST", r"^/v1/images/edits$", (404, 409, 410, 415, 429, 500, 502, 503, 504)),
    ("GET", r"^/v1/jobs$", (404,)),
    ("GET", r"^/v1/usage$", (404,)),
    ("GET", r"^/v1/jobs/\{job_id\}(/events)?$", (404,)),
    ("POST", r"^/v1/jobs/\{job_id\}/cancel$", (404,)),
    ("GET", r"^/v1/jobs/\{job_id\}/result$", (404, 409, 410)),  # 410: results deleted (retention)
    ("POST", r"^/v1/images/generations$", (409, 429, 500, 502, 503, 504)),
    ("POST", r"^/v1/models/\{name\}/load$", (404, 409)),
    ("POST", r"^/v1/models/\{name\}/unload$", (404,)),
    ("POST", r"^/v1/loras$", (403, 409)),  # 403: a server-side source needs an admin key
    ("GET", r"^/v1/loras/\{lora\}$", (404,)),
    ("DELETE", r"^/v1/loras/\{lora\}$", (403, 404, 409)),  # 403: a shared adapter; 409: jobs use it
]


class AllowMiddleware:
    """A 405 names every method the path takes: Starlette's ``Allow`` lists only the first route
    that matched the path (``GET /v1/jobs`` and ``POST /v1/jobs`` are two routes)."""

    def __init__(self, app: Any, routes: Any) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_allow(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                allow = allowed_methods(self.routes(), scope).encode()
                message = {**message, "headers": headers + [(b"allow", allow)]}
            await send(message)

        await self.app(scope, receive, send_allow)


def install_openapi(app: FastAPI, models: Mapping[str, Any], auth: bool = True) -> None:
    """``models``: name -> its config (what matters here: its ``kind``)."""
    kinds = {name: getattr(m, "kind", None) for name, m in models.items()}
    app.add_middleware(AllowMiddleware, routes=lambda: app.router.routes)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = truthful(schema, list(kinds), auth, kinds)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _error_response(status: int) -> dict[str, Any]:
    r: dict[str, Any] = {"description": _STATUS_TEXT[status],
                         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if status in _HEADERS:
        r["headers"] = _HEADERS[status]
    return r


def truthful(schema: dict[str, Any], models: list[str], auth: bool = True,
             kinds: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    kinds = kinds or {}
    images = [n for n in models if kinds.get(n, "image") == "image"]
    videos = [n for n in models if kinds.get(n) == "video"]
    comps = schema.setdefault("components", {})
    schemas = comps.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    if auth:
        comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                               "description": "an API key from `genserve keys create`"}}
        schema["security"] = [{"bearer": []}]
    _model_enum(schemas.get("JobRequest", {}).get("properties", {}).get("model"), models)
    _model_enum(schemas.get("ImageGenerationRequest", {}).get("properties", {}).get("model"), images)
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            m = method.upper()
            resp = op.setdefault("responses", {})
            resp.pop("422", None)
            codes: set[int] = set()
            if op.get("parameters") or op.get("requestBody"):
                codes.add(400)
            if m == "POST":
                codes |= {400, 413}
            for rm, rx, extra in _ROUTE_ERRORS:
                if rm == m and re.match(rx, path):
                    codes |= set(extra)
            if path in OPEN_PATHS:
                op["security"] = []
            elif auth:
                codes.add(401)
                if is_admin_route(m, path.replace("{name}", "x")):
                    codes.add(403)
            for code in sorted(codes):
                resp.setdefault(str(code), _error_response(code))
            for p in op.get("parameters", []):
                if p.get("in") == "path" and p.get("name") == "name":
                    p["schema"] = {"type": "string", "enum": models, "title": "Name"}
    _content(schema, "get", "/v1/jobs/{job_id}/result", "200", {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},  # also variant=thumbnail
        "image/webp": {"schema": {"type": "string", "format": "binary"}},
        "video/mp4": {"schema": {"type": "string", "format": "binary"}}})
    _content(schema, "get", "/v1/jobs/{job_id}/events", "200", {"text/event-stream": {"schema": rules.JOB_EVENT}})
    _content(schema, "post", "/v1/images/generations", "200", {  # stream: true answers Server-Sent Events
        "application/json": {"schema": {}}, "text/event-stream": {"schema": rules.IMAGE_EVENT}})
    rules.apply(schema)
    _form_models(schema, "/v1/jobs", models)
    _form_models(schema, "/v1/images/edits", images)
    _form_models(schema, "/v1/videos", videos)
    load = schema.get("paths", {}).get("/v1/models/{name}/load", {}).get("post")
    if load is not None:
        load["responses"]["200"] = {"description": "Already loaded where asked",
                                    "content": {"application/json": {"schema": {}}}}
    ready = schema.get("paths", {}).get("/readyz", {}).get("get")
    if ready is not None:
        ready["responses"]["503"] = {"description": _STATUS_TEXT[503], "content": {"application/json": {"schema": {}}}}
    return schema


def _model_enum(prop: dict[str, Any] | None, models: list[str]) -> None:
    if prop is None:
        return
    if "anyOf" in prop:  # optional: string or null
        prop["anyOf"] = [{"type": "string", "enum": models}, {"type": "null"}]
    else:
        prop.clear()
        prop.update({"type": "string", "enum": models, "title": "Model"})


def _form_models(schema: dict[str, Any], path: str, models: list[str]) -> None:
    """The model field of a hand-written body (the edits and videos routes): the models it takes."""
    body = schema.get("paths", {}).get(path, {}).get("post", {}).get("requestBody", {})
    for media in body.get("content", {}).values():
        prop = media.get("schema", {}).get("properties", {}).get("model")
        if prop is not None and models:  # none: every call is a 400 naming model, and an empty enum is invalid
            prop["enum"] = models


def _content(schema: dict[str, Any], method: str, path: str, status: str, content: dict[str, Any]) -> None:
    op = schema.get("paths", {}).get(path, {}).get(method)
    if op is not None:
        op["responses"].setdefault(status, {"description": "OK"})["content"] = content
