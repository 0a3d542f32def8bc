"""Authentication, scopes and per-tenant admission for the HTTP API (docs/security.md).

``AuthMiddleware`` (pure ASGI, so it also guards routes that FastAPI did not match) turns the
``Authorization: Bearer <key>`` header into a ``Principal`` before any route runs: 401 without a
valid key (once any key exists, or ``[auth] required``), 403 for a ``jobs`` key on an admin route.
Routes read the principal with the ``principal`` dependency and scope what they touch by its tenant;
``TenantGate`` applies ``[tenants.NAME]`` limits at submission.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ...config.auth import DEFAULT_TENANT, AccessConfig
from ..requests import JobParams, RequestError
from .keys import KeyStore, Principal
from .rate import RateLimiter

log = logging.getLogger("genserve.auth")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# The dashboard's static files hold no data (its script sends the key from /dashboard#key=… with
# every API call), so a browser can load them without a header; so do the vendored libraries under
# /static/ (uPlot, which the dashboard loads with a <script> tag; Swagger UI, ReDoc).
STATIC_PATHS = frozenset({"/", "/dashboard"})
STATIC_PREFIX = ("/dashboard/", "/static/")
# Routes only an admin key may call: the fleet, the models' residency, everyone's stats and metrics.
_ADMIN = [
    ("POST", re.compile(r"^/v1/models/[^/]+/(load|unload)$")),
    ("GET", re.compile(r"^/v1/workers$")),
    ("GET", re.compile(r"^/v1/stats(/series)?$")),
    ("GET", re.compile(r"^/metrics$")),
]
_AUTHENTICATE = 'Bearer realm="genserve"'
NO_AUTH = Principal(DEFAULT_TENANT, "admin")  # auth off (no keys yet, loopback or --insecure)
PRINCIPAL_KEY = "genserve.principal"


def is_admin_route(method: str, path: str) -> bool:
    return any(method == m and rx.match(path) for m, rx in _ADMIN)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, keys: KeyStore, access: AccessConfig, insecure: bool) -> str | None:
    """Why ``serve`` must not start, or None. Without keys the API is open to whoever reaches the
    port, which is only acceptable on loopback or when the operator says so."""
    if insecure or is_loopback(host) or keys.any_keys() or access.auth.required:
        return None
    return (f"refusing to serve on {host} without authentication: create a key first "
            f"(genserve keys create --tenant NAME --scope admin), set [auth] required = true, "
            f"or pass --insecure to serve without keys anyway")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # The API's error shape (app.error), without importing the app.
    return JSONResponse({"error": {"code": code, "message": message, "field": None, "param": None,
                                   "type": "invalid_request_error"}}, status_code=status, headers=headers)


class AuthMiddleware:
    def __init__(self, app: Any, keys: KeyStore, access: AccessConfig) -> None:
        self.app, self.keys, self.access = app, keys, access

    def enabled(self) -> bool:
        return self.access.auth.required or self.keys.any_keys()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        static = scope.get("method") == "GET" and (path in STATIC_PATHS or path.startswith(STATIC_PREFIX))
        if scope["type"] != "http" or path in OPEN_PATHS or static or scope["method"] == "OPTIONS":
            # OPTIONS: CORS preflights carry no credentials; the CORS middleware (outside) answers them.
            await self.app(scope, receive, send)
            return
        response, principal = self._check(scope)
        if response is not None:
            await response(scope, receive, send)
            return
        scope[PRINCIPAL_KEY] = principal
        await self.app(scope, receive, send)

    def _check(self, scope: dict) -> tuple[JSONResponse | None, Principal]:
        method, path = scope["method"], scope["path"]
        if not self.enabled():
            return None, NO_AUTH
        token = _bearer(scope)
        client = (scope.get("client") or ("?",))[0]
        metrics_token = self.access.auth.metrics_token
        if path == "/metrics" and token and metrics_token and hmac.compare_digest(token.encode(), metrics_token.encode()):
            return None, Principal("metrics", "metrics")
        p = self.keys.verify(token) if token else None
        if p is None:
            log.warning("auth failure: %s %s from %s (%s)", method, path, client,
                        "invalid or revoked key" if token else "no bearer token")
            return _error(401, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)",
                          {"WWW-Authenticate": _AUTHENTICATE}), NO_AUTH
        if is_admin_route(method, path):
            if not p.admin:
                log.warning("auth failure: %s %s from %s: key %s (tenant %s) lacks the admin scope",
                            method, path, client, p.key_id, p.tenant)
                return _error(403, "forbidden", "this route needs a key with the admin scope"), p
            if method != "GET":
                log.info("admin action: %s %s by key %s (tenant %s) from %s", method, path, p.key_id, p.tenant, client)
        return None, p


def _bearer(scope: dict) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            return token.strip() or None if kind.lower() == "bearer" else None
    return None


def principal(request: Request) -> Principal:
    """FastAPI dependency: who is calling (set by ``AuthMiddleware``)."""
    return request.scope.get(PRINCIPAL_KEY, NO_AUTH)


def visible(job: dict[str, Any] | None, who: Principal) -> dict[str, Any] | None:
    """The job if ``who`` may see it: its own tenant's, or any for an admin. Another tenant's job
    is reported as missing (404), never as forbidden: its existence is not disclosed."""
    if job is None or who.admin or job.get("tenant", DEFAULT_TENANT) == who.tenant:
        return job
    return None


class TenantLimited(Exception):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


class TenantGate:
    """``[tenants.NAME]`` limits at submission: the best priority allowed (400), jobs queued at once
    and the token bucket (429 with Retry-After). Checked before anything is stored."""

    def __init__(self, access: AccessConfig, queued_count: Callable[[str], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.access, self.queued_count, self.clock = access, queued_count, clock
        self.rates = RateLimiter()

    def default_priority(self, tenant: str, params: JobParams, explicit: bool) -> JobParams:
        """A job that did not ask for a priority gets the best its tenant may have, if that is
        below the default (``max_priority = "low"``); one that asked explicitly is checked in
        ``admit`` instead."""
        cfg = self.access.tenant(tenant)
        if explicit or cfg.priority_allowed(params.priority):
            return params
        return replace(params, priority=cfg.max_priority)

    def admit(self, tenant: str, priority: str, n: int = 1) -> None:
        cfg = self.access.tenant(tenant)
        if not cfg.priority_allowed(priority):
            raise RequestError("priority", f"{priority!r} is above what tenant {tenant} may ask for "
                               f"({cfg.max_priority})", code="priority_not_allowed")
        if cfg.max_queued is not None:
            if n > cfg.max_queued:  # can never be admitted: not a matter of retrying later
                raise RequestError("n", f"{n} jobs at once exceed tenant {tenant}'s max_queued ({cfg.max_queued})")
            queued = self.queued_count(tenant)
            if queued + n > cfg.max_queued:
                raise TenantLimited(f"tenant {tenant} has {queued} jobs queued; the limit is {cfg.max_queued}", 5.0)
        wait = self.rates.take(tenant, cfg, n, self.clock())
        if wait == float("inf"):
            raise RequestError("n", f"{n} jobs at once exceed tenant {tenant}'s burst ({cfg.burst})")
        if wait > 0:
            raise TenantLimited(f"tenant {tenant} is over its rate of {cfg.rate_per_s:g} jobs/s", wait)


def install(app: FastAPI, keys: KeyStore, access: AccessConfig, cors_origins: tuple[str, ...]) -> None:
    """Auth (inside) and CORS (outside, so preflights and 401s carry CORS headers)."""
    app.add_middleware(AuthMiddleware, keys=keys, access=access)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                           expose_headers=["Retry-After", "Idempotent-Replayed"], max_age=600)

    @app.exception_handler(TenantLimited)
    async def _limited(_req: Request, exc: TenantLimited):
        retry = str(int(max(1, round(exc.retry_after_s + 0.499))))
        return _error(429, "rate_limited", f"{exc.message}; retry after {retry}s", {"Retry-After": retry})


def audit(event: str, who: Principal, **fields: Any) -> None:
    log.info("%s by key %s (tenant %s): %s", event, who.key_id, who.tenant, json.dumps(fields, default=str))


def open_key_store(config) -> KeyStore:
    """The keys of ``config``'s store: ``keys.db`` in the data directory, or PostgreSQL's
    ``api_keys`` table (pg_keys.py; its schema comes with the job store's migrations)."""
    if config.store.backend == "postgres":
        from .pg_keys import PgKeyStore

        return PgKeyStore(config.store.dsn)
    return KeyStore(config.server.data_dir)
