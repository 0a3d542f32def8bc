"""``multipart/form-data`` bodies, parsed from bytes already read (and bounded by ``BodyLimit``).

python-multipart (what Starlette's ``request.form()`` needs) is not a dependency; a form here is a
few fields and at most a few files, and the whole body is in memory anyway, so a small parser over
the bytes does, byte-exact for file contents (no line-ending rewriting).
"""
from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

from ..requests import RequestError


@dataclass(frozen=True)
class Part:
    """A file part: its bytes, and what the client said about them (either may be absent)."""

    data: bytes
    filename: str | None
    content_type: str | None


def parse_form(body: bytes, content_type: str) -> dict[str, str | Part]:
    """Field name -> text (a field without a filename) or ``Part`` (a file). A repeated name keeps
    the first. Raises RequestError("body", ...) on a body that is not a well-formed form."""
    boundary = _param(content_type, "content-type", "boundary")
    if not boundary:
        raise RequestError("body", "multipart/form-data without a boundary")
    delim = b"\r\n--" + boundary.encode("latin-1")
    segments = (b"\r\n" + body).split(delim)
    if len(segments) < 2 or not segments[-1].startswith(b"--"):
        raise RequestError("body", "malformed multipart body (no closing boundary)")
    out: dict[str, str | Part] = {}
    for seg in segments[1:-1]:
        _, nl, seg = seg.partition(b"\r\n")  # the rest of the boundary line (transport padding)
        head, sep, data = seg.partition(b"\r\n\r\n")
        if not nl or not sep:
            raise RequestError("body", "malformed multipart body (a part without headers)")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            k, colon, v = line.partition(":")
            if colon:
                headers[k.strip().lower()] = v.strip()
        disposition = headers.get("content-disposition", "")
        name = _param(disposition, "content-disposition", "name")
        if not disposition.lower().startswith("form-data") or not name:
            raise RequestError("body", "malformed multipart body (a part without a form-data name)")
        filename = _param(disposition, "content-disposition", "filename")
        if name in out:
            continue
        if filename is None and headers.get("content-type", "text/plain").lower().startswith("text/plain"):
            try:
                out[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(name, "is not valid UTF-8") from None
        else:
            out[name] = Part(data, filename, headers.get("content-type"))
    return out


def _param(value: str, header: str, key: str) -> str | None:
    msg = Message()
    msg[header] = value
    got = msg.get_param(key, header=header)
    if isinstance(got, tuple):  # RFC 2231 (filename*=utf-8''...)
        got = got[2]
    return None if got is None else str(got)
