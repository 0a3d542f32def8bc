"""``multipart/form-data`` request bodies, parsed with python-multipart (Starlette's parser).

The body has already been read whole under ``[http] max_upload_bytes`` (limits.BodyLimit), so
parsing it is bounded; the parser also caps the number of parts and a text field's size.
``FormAsJson`` is a route class that turns a form into the JSON body the route's pydantic model
validates: fields as form values, numbers parsed strictly (a 400 naming the field), image fields
as file parts (sent on as data URLs) or text.
"""
from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.formparsers import MultiPartParser

from ..requests import RequestError
from .schemas import lora_refs

_INT = re.compile(r"[+-]?[0-9]{1,19}")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
MAX_PARTS = 64
MAX_TEXT_BYTES = 24 << 20  # a text field: an image as a data URL (16 MiB, base64) fits


@dataclass(frozen=True)
class Part:
    name: str
    data: bytes
    filename: str | None = None  # set: a file part
    content_type: str = "text/plain"

    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(self.name, "is not valid UTF-8 text") from None


class _StrictParser(MultiPartParser):
    """Starlette reads a text field that is not valid in its charset as latin-1, silently: a prompt
    of invalid UTF-8 (a lone surrogate's bytes) would be stored as mojibake. Refused instead, as a
    400 naming the field, like a lone surrogate in JSON."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset or "utf-8")
            except (UnicodeDecodeError, LookupError):
                raise RequestError(part.field_name or "body", "is not valid UTF-8 text") from None
        super().on_part_end()


def is_multipart(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "multipart/form-data"


async def parse_form(body: bytes, content_type: str) -> list[Part]:
    """The form's parts in order. A body that is not a well-formed form: a 400 naming ``body``."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException

    async def stream():
        yield body

    parser = _StrictParser(Headers({"content-type": content_type}), stream(), max_files=MAX_PARTS,
                           max_fields=MAX_PARTS, max_part_size=MAX_TEXT_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise RequestError("body", f"is not a well-formed multipart/form-data body: {e.message}") from None
    parts = []
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                parts.append(Part(name, await value.read(), value.filename or "",
                                  value.content_type or "application/octet-stream"))
            else:
                parts.append(Part(name, value.encode("utf-8")))
    finally:
        await form.close()
    return parts


def sniff_image(data: bytes) -> str | None:
    """The image MIME type the bytes' signature says (PNG, JPEG, WebP), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def file_data_url(part: Part) -> str:
    """A file part as a data URL of the image type its bytes hold (clients often send
    application/octet-stream); anything else is refused naming the field."""
    mime = sniff_image(part.data)
    if mime is None:
        raise RequestError(part.name, f"the uploaded file {part.filename!r} is not a PNG, JPEG or WebP image")
    return f"data:{mime};base64," + base64.b64encode(part.data).decode()


def typed(name: str, value: str, kind: str) -> Any:
    """A form value as the JSON type the field takes, strictly (no "1e3" width, no "nan")."""
    v = value.strip()
    if kind == "int":
        if not _INT.fullmatch(v):
            raise RequestError(name, f"must be an integer, got {value[:40]!r}")
        return int(v)
    if kind == "float":
        if not _FLOAT.fullmatch(v):
            raise RequestError(name, f"must be a number, got {value[:40]!r}")
        return float(v)
    if kind == "loras":  # JSON text, or "ink:0.8,paper"
        try:
            return lora_refs(v, name)
        except ValueError as e:
            field, _, message = str(e).partition(": ")
            raise RequestError(field, message) from None
    return value


def form_to_json(parts: list[Part], kinds: dict[str, str]) -> dict[str, Any]:
    """Form parts -> a JSON object. ``kinds``: field -> int | float | list | image | str (default).
    An image field's file part becomes a data URL; its text value is a data URL or a JSON object
    (a job reference: {"job": "<id>", "index": 0})."""
    out: dict[str, Any] = {}
    for p in parts:
        kind = kinds.get(p.name, "str")
        if kind == "list":
            out.setdefault(p.name, []).append(p.text())
            continue
        if p.name in out:
            raise RequestError(p.name, "is given more than once")
        if kind == "image":
            if p.filename is not None:
                out[p.name] = file_data_url(p)
                continue
            text = p.text().strip()
            if text.startswith("{"):
                try:
                    out[p.name] = json.loads(text)
                except ValueError:
                    raise RequestError(p.name, "is neither a data URL nor a JSON job reference") from None
                continue
            out[p.name] = text
            continue
        if p.filename is not None:
            raise RequestError(p.name, "must be a form value, not a file")
        out[p.name] = typed(p.name, p.text(), kind)
    return out


def form_as_json(kinds: dict[str, str]) -> type[APIRoute]:
    """A route class: a multipart request reaches the route as the equivalent JSON request."""

    class FormAsJson(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def route(request: Request):
                if is_multipart(request.headers.get("content-type")):
                    body = json.dumps(form_to_json(await parse_form(await request.body(),
                                                              request.headers["content-type"]), kinds)).encode()
                    headers = [(k, v) for k, v in request.scope["headers"]
                               if k not in (b"content-type", b"content-length")]
                    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                    request = Request({**request.scope, "headers": headers}, request.receive)
                    request._body = body
                return await handler(request)

            return route

    return FormAsJson
