"""Run the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

uvicorn's own handling stops accepting connections at the first signal and then gives open ones a
fixed grace: ``/readyz`` never turns 503, SSE streams and waiting OpenAI calls are cut, and the
process re-raises the signal on its way out (exit status -15, not 0). Here the first signal starts
the runtime's drain while the server keeps serving (``/readyz`` answers 503 at once, so a load
balancer stops sending; running batches finish for up to ``drain_s``); only when the drain is done
is uvicorn told to exit. A second signal exits at once (SIGINT: without waiting for connections).

Two guards make the bare server safe to expose without a proxy in front (issue 22):
- ``[server] header_timeout_s``: a connection whose request headers are not complete that long after
  it opened (or after the first byte of its next request) is closed. uvicorn has a keep-alive timeout
  between requests but none on a request's headers, so a client that never finishes them held its
  connection (and a file descriptor) for as long as it liked.
- ``[server] max_connections``: while more connections are open, requests get 503 with Retry-After
  and ``Connection: close``, so the excess goes away. ``/healthz`` and ``/readyz`` are exempt: a probe
  must say whether the server lives, not that it is busy (an orchestrator would restart a busy one).
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
from collections.abc import Collection
from types import FrameType
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("genserve.server")

# After the drain: what uvicorn gives connections still open (SSE streams have ended by then) and
# what the pool gives idle workers to exit. Together they keep shutdown within drain_s + 5 s.
CONNECTIONS_GRACE_S = 2.0
PROBES = frozenset({"/healthz", "/readyz"})  # answered whatever the connection count
RETRY_AFTER_S = 1  # over max_connections: connections are short-lived, the excess clears quickly


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers. The clock starts when the
    connection opens and, on a kept-alive connection, at the first byte of the next request (the idle
    time between requests is uvicorn's keep-alive timeout); it stops once h11 has a whole request
    line and headers (``their_state`` leaves IDLE)."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            if self._header_timer is None and not self.transport.is_closing():
                self._arm()  # the first bytes of a request on a kept-alive connection
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            who = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            log.info("closing a connection from %s: request headers incomplete after %gs", who, self.header_timeout_s)
            self.transport.close()


class ConnectionCap:
    """ASGI middleware: 503 (Retry-After, Connection: close) to any request but the probes while more
    than ``limit`` connections are open. ``connections`` is uvicorn's live set of open connections
    (its ``server_state``), bound once the server exists."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit
        self.connections: Collection[Any] = ()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and len(self.connections) > self.limit and scope["path"] not in PROBES:
            body = json.dumps({"error": {
                "code": "too_many_connections", "field": None, "param": None, "type": "server_error",
                "message": f"the server has more than {self.limit} open connections "
                           "(server.max_connections); retry shortly"}}).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        if isinstance(config.app, ConnectionCap):
            config.app.connections = self.server_state.connections
        self.app = app
        self.drain_s = drain_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signaled = False
        self._drain: asyncio.Task | None = None  # kept: the loop holds tasks weakly

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes, possibly inside the loop: hand over to the loop.
        # The signal is deliberately not recorded for re-raising: a drained server exits with 0.
        if self._signaled or self._loop is None:
            log.warning("second signal (%s): exiting now", signal.Signals(sig).name)
            self.should_exit = True
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        self._signaled = True
        self._loop.call_soon_threadsafe(self._start, sig)

    def _start(self, sig: int) -> None:
        log.warning("%s: draining for up to %gs", signal.Signals(sig).name, self.drain_s)
        self._drain = self._loop.create_task(self._run_drain())  # type: ignore[union-attr]

    async def _run_drain(self) -> None:
        try:
            runtime = getattr(self.app.state, "runtime", None)
            if runtime is not None:
                await runtime.drain(self.drain_s)
        except Exception:  # the process must still exit
            log.exception("drain failed")
        finally:
            self.should_exit = True


def server(app: FastAPI, *, host: str, port: int, drain_s: float, header_timeout_s: float = 10.0,
           max_connections: int = 1000, **uvicorn_kwargs: Any) -> DrainingServer:
    """The uvicorn server for ``app`` with the drain and the connection guards (module docstring)."""
    config = uvicorn.Config(ConnectionCap(app, max_connections), host=host, port=port,
                            http=functools.partial(HeaderTimeoutProtocol, header_timeout_s=header_timeout_s),
                            timeout_graceful_shutdown=int(CONNECTIONS_GRACE_S), **uvicorn_kwargs)
    return DrainingServer(config, app, drain_s)


def serve(app: FastAPI, *, host: str, port: int, drain_s: float, **kwargs: Any) -> None:
    """Serve ``app`` until SIGTERM / SIGINT, then drain (see the module's docstring) and return."""
    server(app, host=host, port=port, drain_s=drain_s, **kwargs).run()
