"""Log setup for ``genserve serve --log-format text|json``.

Job lifecycle lines carry structured fields (``job_id``, ``batch_id``, ``worker``, ``model``,
``stage`` and ``timings``) passed as ``extra=``; the JSON format writes one object per line with
those fields at the top level, the text format appends them as ``key=value``.

Every line is redacted before it is formatted (``Redact``, installed on the handler and on
uvicorn's loggers): credential-like query parameters (``?api_key=``, ``&token=``, ``X-Amz-Signature=``
...), ``Bearer`` / ``Basic`` credentials, ``gsk_`` keys and ``whsec_`` secrets anywhere, and
``authorization: …`` / ``api_key=…``-like pairs lose their values. A key sent where it does not
belong (a URL's query string, which ``--access-log`` writes verbatim) never reaches the log.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time

FIELDS = ("job_id", "batch_id", "worker", "model", "stage", "status", "code", "timings", "device_seconds",
          "cost_usd", "tier")
FORMATS = ("text", "json")
REDACTED = "[REDACTED]"
# Names of query parameters whose values are secrets: any name ending in one of these words.
_SECRET_PARAM = r"[\w.-]*?(?:key|token|secret|password|passwd|signature|credential|authorization|auth)"
_RULES = (
    # ?api_key=…, &key=…, &access_token=…, X-Amz-Signature=… (a URL in an access-log line or a message)
    (re.compile(rf"([?&;]{_SECRET_PARAM}=)[^&\s\"'#;]*", re.I), rf"\1{REDACTED}"),
    (re.compile(r"\b(Bearer)\s+(?!tokens?\b)[^\s,;\"']+", re.I), rf"\1 {REDACTED}"),
    (re.compile(r"\b((?i:Basic))\s+(?![a-z]+\b)[A-Za-z0-9+/]{8,}={0,2}"), rf"\1 {REDACTED}"),  # not "Basic settings"
    (re.compile(r"\b(gsk|whsec)_[A-Za-z0-9_+/=-]+"), rf"\1_{REDACTED}"),
    # the password in a URL's user info: postgresql://genserve:…@db:5432/genserve ([store] dsn)
    (re.compile(r"\b([a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s/]+@", re.I), rf"\1{REDACTED}@"),
    # authorization: …, "api_key": "…", token=… in free text (a header or a config dump)
    (re.compile(r"\b((?:x-)?(?:api[_-]?key|access[_-]?token|authorization|password|secret|token)[\"']?\s*[:=]\s*[\"']?)"
                r"(?!Bearer\b|Basic\b|\[REDACTED\])[^\s,;&\"']+", re.I), rf"\1{REDACTED}"),
)


def redact(text: str) -> str:
    """``text`` with every credential the rules above recognise replaced by ``[REDACTED]``."""
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text


class Redact(logging.Filter):
    """Redacts a record in place, so every handler and formatter after it sees only the redacted
    text. The arguments are redacted one by one where that redacts the whole message (uvicorn's
    access formatter reads ``record.args`` as a tuple); otherwise the message is rendered and its
    arguments dropped. Exception text is rendered and redacted too."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            full = record.getMessage()
        except Exception:  # a broken format: what the formatter would print, redacted
            full = f"{record.msg} {record.args!r}"
            record.args = None
        clean = redact(full)
        if clean != full:
            args = record.args
            each = tuple(redact(a) if isinstance(a, str) else a for a in args) if isinstance(args, tuple) else None
            msg = redact(record.msg) if isinstance(record.msg, str) else record.msg
            try:
                ok = each is not None and isinstance(msg, str) and msg % each == clean
            except Exception:
                ok = False
            record.msg, record.args = (msg, each) if ok else (clean, None)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _fields(record: logging.LogRecord) -> dict:
    return {k: getattr(record, k) for k in FIELDS if getattr(record, k, None) is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage(), **_fields(record)}
        if record.exc_text or record.exc_info:
            out["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = _fields(record)
        if not extra:
            return base
        parts = []
        for k, v in extra.items():
            if isinstance(v, dict):
                v = ",".join(f"{a}={b:.4f}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
            elif isinstance(v, float):
                v = f"{v:.6g}"
            parts.append(f"{k}={v}")
        return f"{base} " + " ".join(parts)


def configure(fmt: str = "text", level: int = logging.INFO) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    # On the handler: every record it writes, whichever logger it came from. uvicorn's loggers go
    # through it (whatever configured them before: uvicorn's own log config gives them handlers of
    # their own and stops propagation), and redact on their own too, for any handler added later.
    handler.addFilter(Redact())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        lg.setLevel(logging.NOTSET)  # uvicorn sets its own level from --log-level when it starts
        if name != "uvicorn" and not any(isinstance(f, Redact) for f in lg.filters):
            lg.addFilter(Redact())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.Formatter.converter = time.localtime
