"""Input limits at the HTTP edge: the request body size, enforced while the body is read and
before anything parses it, and the base of the URLs the API hands out.

Body limit: a declared ``Content-Length`` above the limit is refused before a byte is read; a body
without one (chunked) is counted as it arrives and refused the moment it passes the limit. So a
200 MB body costs the server at most the limit in memory, and the health checks keep answering.

Returned URLs: from ``[http] public_url`` when set; else from ``X-Forwarded-Proto/-Host`` when the
peer is a configured trusted proxy; else the address the connection was accepted on. Never the
``Host`` header, which a client (or an attacker, through a cache) controls.
"""
from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...config.network import HttpConfig


def error_body(status: int, field: str, message: str, code: str) -> bytes:
    """The API's error shape (app.error), for answers given before the app runs."""
    return json.dumps({"error": {"code": code, "message": f"{field}: {message}", "field": field, "param": field,
                                 "type": "invalid_request_error" if status < 500 else "server_error"}}).encode()


class BodyLimit:
    """ASGI middleware: bodies over ``max_bytes`` get 413 (``body_too_large``); multipart/form-data
    bodies (image uploads) are held to ``max_upload_bytes`` instead."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_upload_bytes: int | None = None) -> None:
        if max_bytes < 1 or (max_upload_bytes is not None and max_upload_bytes < 1):
            raise ValueError("max_bytes must be positive")
        self.app, self.max_bytes = app, max_bytes
        self.max_upload_bytes = max_bytes if max_upload_bytes is None else max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        upload = headers.get(b"content-type", b"").split(b";")[0].strip().lower() == b"multipart/form-data"
        limit, key = (self.max_upload_bytes, "http.max_upload_bytes") if upload else (self.max_bytes,
                                                                                      "http.max_body_bytes")
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _reject(send, 400, "Content-Length", "must be a number of bytes", "invalid_request")
            if int(declared) > limit:
                return await self._too_large(send, limit, key)
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away: let the app see it
                chunks = []
                replay: list[Message] = [msg]
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._too_large(send, limit, key)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _too_large(self, send: Send, limit: int, key: str) -> None:
        await _reject(send, 413, "body", f"is larger than the limit of {limit} bytes ({key})", "body_too_large")


async def _reject(send: Send, status: int, field: str, message: str, code: str) -> None:
    body = error_body(status, field, message, code)
    # The rest of the body is never read: the connection is not reused.
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class SameHostRedirects:
    """ASGI middleware: a redirect whose ``Location`` was built from the request's own ``Host``
    header (Starlette's trailing-slash redirect, ``/v1/jobs/`` -> ``http://<Host>/v1/jobs``) is
    answered with the path alone, so a forged ``Host`` never comes back as a link. Redirects to
    other hosts (a presigned object-store URL) pass unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host")

        async def send_relative(message: Message) -> None:
            if message["type"] == "http.response.start" and 300 <= message["status"] < 400 and host:
                message = {**message, "headers": [(k, _same_host_path(v, host) if k.lower() == b"location" else v)
                                                  for k, v in message.get("headers", [])]}
            await send(message)

        await self.app(scope, receive, send_relative)


def _same_host_path(location: bytes, host: bytes) -> bytes:
    for scheme in (b"http://", b"https://", b"ws://", b"wss://"):
        prefix = scheme + host
        if location.startswith(prefix) and location[len(prefix):len(prefix) + 1] in (b"/", b"?", b""):
            return location[len(prefix):] or b"/"
    return location


_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")


def _host_port(host: str, port: int | None, scheme: str) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(scheme)
    return host if port is None or port == default else f"{host}:{port}"


def base_url(scope: Scope, http: HttpConfig) -> str:
    """The base (ending in "/") of the URLs returned for this request."""
    if http.public_url is not None:
        return http.public_url
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    client = scope.get("client")
    if http.trusted_proxies and client and _trusted(client[0], http):
        proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        host = headers.get("x-forwarded-host", "").split(",")[0].strip()
        if proto in ("http", "https") and _HOST.match(host):
            return f"{proto}://{host}/"
    scheme = scope.get("scheme", "http")
    server: Any = scope.get("server")
    if not server:
        return "/"
    return f"{scheme}://{_host_port(server[0], server[1], scheme)}/"


def _trusted(peer: str, http: HttpConfig) -> bool:
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in http.trusted_proxies)


def allowed_methods(routes: list[Any], scope: Scope) -> str:
    """The ``Allow`` header of a 405: every method some route serves at this path (Starlette
    reports only the first route that matched the path)."""
    from starlette.routing import Match

    methods: set[str] = set()

    def visit(routes: list[Any]) -> None:
        for route in routes:
            # FastAPI >= 0.165 keeps an included router (we include them without a prefix) as one entry
            inner = getattr(getattr(route, "original_router", None), "routes", None)
            if inner is not None:
                visit(inner)
            elif getattr(route, "methods", None) and route.matches({**scope, "method": "GET"})[0] != Match.NONE:
                methods.update(set(route.methods) - {"HEAD"})

    visit(routes)
    return ", ".join(sorted(methods))
