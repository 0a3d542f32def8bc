"""Run the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

uvicorn's own handling stops accepting connections at the first signal and then gives open ones a
fixed grace: ``/readyz`` never turns 503, SSE streams and waiting OpenAI calls are cut, and the
process re-raises the signal on its way out (exit status -15, not 0). Here the first signal starts
the runtime's drain while the server keeps serving (``/readyz`` answers 503 at once, so a load
balancer stops sending; running batches finish for up to ``drain_s``); only when the drain is done
is uvicorn told to exit. A second signal exits at once (SIGINT: without waiting for connections).
"""
from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("genserve.server")

# After the drain: what uvicorn gives connections still open (SSE streams have ended by then) and
# what the pool gives idle workers to exit. Together they keep shutdown within drain_s + 5 s.
CONNECTIONS_GRACE_S = 2.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
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


def serve(app: FastAPI, *, host: str, port: int, drain_s: float, **uvicorn_kwargs: Any) -> None:
    """Serve ``app`` until SIGTERM / SIGINT, then drain (see the module's docstring) and return."""
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=int(CONNECTIONS_GRACE_S),
                            **uvicorn_kwargs)
    DrainingServer(config, app, drain_s).run()
