"""Waiting on the jobs behind an OpenAI-style call (images today; edits share it): a deadline, a
client that goes away, and failures told in a way the official clients do not retry blindly.

The official clients retry 408, 409, 429 and every 5xx unless the response says
``x-should-retry: false``. A job that failed has already been through genserve's own retries
(another worker, a smaller batch), so sending the same request again would most likely fail the
same way and run the model again for nothing: every failure here says ``x-should-retry: false``.
What a retry can fix gets a Retry-After instead (the server shutting down: 503; a full queue:
429, raised before anything is submitted).
"""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from ....engine import ErrorCode
from ...status import JobStatus
from ..api import Api, Reconnect, draining, error

NO_RETRY = {"x-should-retry": "false"}
DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there
GRACE_S = 5.0  # past the jobs' own deadline (the engine fails them then) before the handler gives up

# A failed job's error code -> the HTTP status its call answers with.
FAILURE_STATUS = {
    ErrorCode.INVALID_REQUEST: 400,  # an input the pipeline refused, found only when it ran
    ErrorCode.TIMEOUT: 504,
    ErrorCode.CANCELED: 409,  # canceled by someone else (DELETE / cancel on the job)
    ErrorCode.MODEL_LOAD_FAILED: 502,  # the model, not the request: the operator has to look
}


def failure(job: dict[str, Any]) -> JSONResponse:
    """The error response for a job that did not succeed (OpenAI's error shape, no blind retry)."""
    code = job["error_code"] or job["status"]
    status = 409 if job["status"] == JobStatus.CANCELED else FAILURE_STATUS.get(code, 500)
    return error(status, None, f"generation {job['status']} (job {job['id']}): {job['error_message'] or code}",
                 code=code, headers=NO_RETRY)


async def _client_gone(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


def _retrieve(f: asyncio.Future) -> None:
    if not f.cancelled():
        f.exception()


def _cancel(api: Api, ids: list[str]) -> None:
    for i in ids:
        api.control.cancel(i)
    api.control.kick()


async def wait_jobs(api: Api, request: Request, jobs: list[dict[str, Any]]) -> list[dict[str, Any]] | JSONResponse:
    """Wait until every job in ``jobs`` (just submitted for this call) has ended; their final
    records, or the response to send instead: a failed job's error, a timeout (the jobs are
    canceled), the server shutting down (canceled: nobody could fetch them later, the caller has
    no job ids), or a client that went away (canceled: nobody is waiting for them any more)."""
    ids = [j["id"] for j in jobs]
    limit = max(j["params"].get("timeout_s") or api.config.models[j["model"]].timeout_s for j in jobs) + GRACE_S
    waits = asyncio.ensure_future(asyncio.gather(*(api.wait_terminal(i) for i in ids)))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({waits, gone}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in (waits, gone):
            f.cancel()
            # A cancelled gather ends with CancelledError set as its *exception* (not as cancelled),
            # and a wait may end with Reconnect after we stopped listening: retrieve whatever it
            # ends with, or asyncio logs "exception was never retrieved" when it is collected.
            f.add_done_callback(_retrieve)
    if waits in done:
        try:
            finals = waits.result()
        except Reconnect:
            _cancel(api, ids)
            return draining()
        failed = [j for j in finals if j["status"] != JobStatus.SUCCEEDED]
        return failure(failed[0]) if failed else finals
    _cancel(api, ids)
    if gone in done:  # nobody reads this; 499 (client closed request) is what the access log shows
        return error(499, None, "the client closed the connection; its jobs were canceled", code="canceled",
                     headers=NO_RETRY)
    return error(504, None, f"the generation did not finish within {limit:g}s; its jobs were canceled",
                 code=ErrorCode.TIMEOUT, headers=NO_RETRY)
