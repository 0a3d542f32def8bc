"""What the handlers' validation refuses, stated in the OpenAPI document, so a client generated from
it does not send what the server answers with 400 (issue 22: schemathesis found empty ``after``,
``window``, ``step``, ``size``, ``seconds`` and ``prompt``, and ``days=0``, all schema-valid).

The handlers keep their own checks and messages (a 400 naming the field); these rules only
describe them. A rule may be stricter than the handler (a duration is documented as an integer and
a unit, though ``1.5h`` is accepted too), never looser: ``tests/server/http/test_api_fuzz.py``
sends schema-valid requests and fails on any 400 other than the few the document cannot state
(rules that depend on the chosen model, on another field, or on a file's contents; see there).
Limits that differ by model (sizes, steps, frames, prompt length, timeout) are in ``GET /v1/models``.
"""
from __future__ import annotations

from typing import Any

from ..jobs.events import RECONNECT
from ..jobs.listeners import JOB_EVENTS
from ..observe.tenant_usage import MAX_DAYS
from ..requests import MAX_SEED

# Prompts: "" and "   " are refused (what Python's str.strip() removes: \s and \x1c-\x1f, \x85).
NON_EMPTY = {"minLength": 1, "pattern": r"[^\s\x1c-\x1f\x85]"}
AT_LEAST_1 = {"minimum": 1}
SEED = {"minimum": 0, "maximum": MAX_SEED}
# Each side 1..99999, no sign, no spaces ("64x64"): parse_size accepts more ("64 X 64").
SIZE = {"pattern": r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$", "example": "64x64"}
SIZE_OR_AUTO = {"pattern": r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$", "example": "64x64"}
# A duration between 1 s and 7 days, as an integer and a unit: at most 99999 s, 999 m, 99 h or 7 d
# (the server also takes decimals, "1.5h", up to 7 days).
DURATION = {"pattern": r"^([1-9][0-9]{0,4}s?|[1-9][0-9]{0,2}m|[1-9][0-9]?h|[1-7]d)$", "example": "10m"}
# A clip length: a positive decimal with up to 3 digits on each side of the point ("4", "1.125").
SECONDS = {"pattern": r"^([1-9][0-9]{0,2}(\.[0-9]{1,3})?|0\.[0-9]{0,2}[1-9])$", "example": "4"}
JOB_ID = {"minLength": 1, "maxLength": 128}

# Request bodies: component schema (or form) -> property -> what its handler checks.
_JOB_FIELDS: dict[str, dict[str, Any]] = {
    "prompt": NON_EMPTY, "width": AT_LEAST_1, "height": AT_LEAST_1, "num_frames": AT_LEAST_1,
    "steps": AT_LEAST_1, "seed": SEED, "guidance": {"minimum": 0, "maximum": 50},
    "strength": {"exclusiveMinimum": 0, "maximum": 1}, "timeout_s": {"exclusiveMinimum": 0},
    "output_compression": {"minimum": 0, "maximum": 100},
}
BODIES: dict[str, dict[str, dict[str, Any]]] = {
    "JobRequest": _JOB_FIELDS,
    "ImageGenerationRequest": {
        **{k: v for k, v in _JOB_FIELDS.items() if k not in ("width", "height", "num_frames", "strength")},
        "n": {"minimum": 1, "maximum": 10}, "size": SIZE_OR_AUTO},
}
# Query parameters: (method, path) -> parameter -> what its handler checks.
_PAGE = {"limit": {"minimum": 1, "maximum": 1000}, "after": JOB_ID, "order": {"enum": ["asc", "desc"]}}
QUERIES: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("get", "/v1/jobs"): _PAGE,
    ("get", "/v1/videos"): _PAGE,
    ("get", "/v1/stats"): {"window": DURATION},
    ("get", "/v1/stats/series"): {"window": DURATION, "step": DURATION},
    ("get", "/v1/usage"): {"days": {"minimum": 1, "maximum": MAX_DAYS}},
    ("get", "/v1/jobs/{job_id}/result"): {"index": {"minimum": 0}},
    ("get", "/v1/videos/{video_id}/content"): {"variant": {"enum": ["video", "thumbnail", "spritesheet"]}},
}

# Server-Sent Events: the schema of each event as parsed (the media type's ``schema`` describes one
# event in OpenAPI 3.1; the ``data`` field is JSON text).
JOB_EVENT = {
    "type": "object", "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": [*JOB_EVENTS, RECONNECT]},
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "absent on reconnect"},
        "retry": {"type": "integer", "minimum": 0, "description": "reconnect only: wait this many ms"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"type": "object"}},
    },
}
IMAGE_EVENT = {
    "type": "object", "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["image_generation.completed"]},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
            "type": "object", "required": ["type", "b64_json", "size", "output_format"],
            "properties": {"type": {"const": "image_generation.completed"}, "b64_json": {"type": "string"},
                           "created_at": {"type": "integer"}, "size": {"type": "string"},
                           "quality": {"type": "string"}, "output_format": {"type": "string"}}}},
    },
}


def constrain(prop: dict[str, Any], rule: dict[str, Any]) -> None:
    """Add ``rule`` to a property's schema; of an optional one (``anyOf: [T, null]``), to ``T``."""
    _value_schema(prop).update(rule)


def apply(schema: dict[str, Any]) -> None:
    """Write the rules above into a generated document (in place)."""
    comps = schema.get("components", {}).get("schemas", {})
    for name, fields in BODIES.items():
        props = comps.get(name, {}).get("properties", {})
        for field, rule in fields.items():
            if field in props:
                constrain(props[field], rule)
    paths = schema.get("paths", {})
    for (method, path), params in QUERIES.items():
        for p in paths.get(path, {}).get(method, {}).get("parameters", []):
            if p.get("in") == "query" and p["name"] in params:
                constrain(p["schema"], params[p["name"]])
    form = paths.get("/v1/jobs", {}).get("post", {}).get("requestBody", {}).get("content", {})
    form = form.get("multipart/form-data", {}).get("schema")
    if form is not None:  # the same fields as a form: the JSON body's rules, and no other fields
        form["additionalProperties"] = False
        job = comps.get("JobRequest", {}).get("properties", {})
        for field, prop in form["properties"].items():
            if field in job and prop.get("type") != "array":
                constrain(prop, {k: v for k, v in _value_schema(job[field]).items() if k in _KEYWORDS})


_KEYWORDS = ("minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "enum")


def _value_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """A property's schema for a present value: of an optional one, its non-null branch."""
    branches = [b for b in prop.get("anyOf", ()) if b.get("type") != "null"]
    return branches[0] if len(branches) == 1 else prop
