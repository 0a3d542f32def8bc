"""Log setup for ``genserve serve --log-format text|json``.

Job lifecycle lines carry structured fields (``job_id``, ``batch_id``, ``worker``, ``model``,
``stage`` and ``timings``) passed as ``extra=``; the JSON format writes one object per line with
those fields at the top level, the text format appends them as ``key=value``.
"""
from __future__ import annotations

import json
import logging
import sys
import time

FIELDS = ("job_id", "batch_id", "worker", "model", "stage", "status", "code", "timings", "device_seconds",
          "cost_usd", "tier")
FORMATS = ("text", "json")


def _fields(record: logging.LogRecord) -> dict:
    return {k: getattr(record, k) for k in FIELDS if getattr(record, k, None) is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage(), **_fields(record)}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.Formatter.converter = time.localtime
