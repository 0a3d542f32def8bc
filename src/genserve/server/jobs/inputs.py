"""A job's image inputs at submit: read (a data URL, an uploaded file sent on as one, or an earlier
job's output), validated (genserve/backends/image_input.py) and stored with the job.

Stored under the job's own key prefix in the configured result store (``<job id>/input-image.png``,
``<job id>/input-mask.png``) before the job is queued, so a queued job survives a restart with its
inputs; the job's params keep the key and a sha256 digest, and the worker reads the bytes back.
A job reference (``{"job": "<id>", "index": 0}``) copies that output under the new job's prefix,
so deleting the earlier job never takes an input from under a later one.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
from typing import Any

from ...backends.image_input import ImageInputError, InputImage, check_input, first_frame_png, split_data_url
from ...storage import ResultStore
from ..requests import JobParams, RequestError
from ..security.auth import visible
from ..security.keys import Principal
from ..status import JobStatus
from .views import JobReader

FIELDS = ("image", "mask")
STORED_NAMES = {"image": "input-image.png", "mask": "input-mask.png"}


async def _run(fn, *args, **kw):
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kw))


async def read_inputs(data: dict[str, Any], jobs: JobReader, results: ResultStore,
                      who: Principal) -> dict[str, InputImage]:
    """``data``'s image inputs, decoded and checked (a 4xx naming the field otherwise)."""
    out: dict[str, InputImage] = {}
    for field in FIELDS:
        value = data.get(field)
        if value is None:
            continue
        declared = None
        if isinstance(value, InputImage):  # read and checked already (the edits route)
            out[field] = value
            continue
        if isinstance(value, dict):
            raw = await referenced(field, value, jobs, results, who)
        else:
            try:
                declared, raw = split_data_url(value)
            except ImageInputError as e:
                raise RequestError(field, str(e)) from None
        try:
            out[field] = await _run(check_input, raw, mask=field == "mask", declared=declared)
        except ImageInputError as e:
            raise RequestError(field, str(e)) from None
    return out


async def referenced(field: str, ref: dict[str, Any], jobs: JobReader, results: ResultStore,
                     who: Principal) -> bytes:
    """The encoded bytes of an earlier job's output, for ``who`` only: another tenant's job is
    reported exactly like one that does not exist. A video output gives its first frame."""
    jid, index = ref.get("job"), ref.get("index", 0)
    job = visible(jobs.get(jid), who) if isinstance(jid, str) else None
    if job is None:
        raise RequestError(field, f"refers to no job {jid!r}", status=404, code="not_found")
    if job["status"] != JobStatus.SUCCEEDED:
        raise RequestError(field, f"refers to job {jid}, which is {job['status']}; only a succeeded job's output "
                                  "can be an input", status=409, code="not_ready")
    if job.get("t_results_deleted") is not None:
        raise RequestError(field, f"refers to job {jid}, whose results were deleted", status=410, code="gone")
    if not 0 <= index < len(job["results"]):
        raise RequestError(field, f"refers to output {index} of job {jid}, which has {len(job['results'])}",
                           status=404, code="not_found")
    out = job["results"][index]
    try:
        data = await _run(results.read, out["key"])
    except (OSError, KeyError, ValueError):
        raise RequestError(field, f"refers to job {jid}, whose output is no longer available", status=410,
                           code="gone") from None
    if str(out.get("content_type", "")).startswith("video/"):
        try:
            return await _run(first_frame_png, data)
        except Exception:
            raise RequestError(field, f"refers to job {jid}, whose video output cannot be decoded") from None
    return data


async def store_inputs(results: ResultStore, job_id: str, params: JobParams,
                       inputs: dict[str, InputImage]) -> JobParams:
    """Write the inputs under ``job_id``'s prefix; the params with their keys."""
    keys = {}
    for field, img in inputs.items():
        ref = await _run(results.put, job_id, STORED_NAMES[field], img.png, "image/png")
        keys[field] = ref.key
    return dataclasses.replace(params, **keys)


def input_keys(params: dict[str, Any]) -> list[str]:
    """The result-store keys of a job's stored inputs (not legacy data URLs)."""
    return [v for f in FIELDS if isinstance(v := params.get(f), str) and not v.startswith("data:")]


async def delete_inputs(results: ResultStore, params: JobParams | dict[str, Any]) -> None:
    d = params.to_dict() if isinstance(params, JobParams) else params
    for key in input_keys(d):
        await _run(results.delete, key)
