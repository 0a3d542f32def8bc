"""Validators for config values: each raises ``ConfigError`` naming the key. Shared by every
section parser (``config/load.py`` and the modules that add sections)."""
from __future__ import annotations

import base64
import binascii
from typing import Any

from .errors import ConfigError, unknown_key


def _type(key: str, value: Any, types: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, types):
        raise ConfigError(key, f"must be {what}, got {value!r}")
    return value


def _int(key: str, v: Any, lo: int, hi: int | None = None) -> int:
    _type(key, v, int, "an integer")
    if v < lo or (hi is not None and v > hi):
        raise ConfigError(key, f"must be between {lo} and {hi}" if hi is not None else f"must be ≥ {lo}")
    return v


def _float(key: str, v: Any, lo: float) -> float:
    _type(key, v, (int, float), "a number")
    if v < lo:
        raise ConfigError(key, f"must be ≥ {lo}")
    return float(v)


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H); raises ValueError."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{text!r} is not WIDTHxHEIGHT")
    return int(parts[0]), int(parts[1])


def _size(key: str, v: Any) -> tuple[int, int]:
    _type(key, v, str, 'a "WIDTHxHEIGHT" string')
    try:
        w, h = parse_size(v)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None
    if w <= 0 or h <= 0:
        raise ConfigError(key, "width and height must be positive")
    return w, h


def _check_table(key: str, raw: Any, known: set[str]) -> None:
    _type(key, raw, dict, "a table")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise unknown_key(f"{key}.{unknown[0]}", unknown[0], known)


def _seconds_or_never(key: str, v: Any) -> float:
    """A duration ≥ 0, or "never" (stored as -1)."""
    return -1.0 if v == "never" else _float(key, v, 0.0)


def _secret(key: str, v: Any) -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of at least 24 random bytes."""
    _type(key, v, str, 'a "whsec_…" string')
    try:
        raw = base64.b64decode(v.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(key, "must be whsec_ followed by base64") from None
    if not v.startswith("whsec_") or len(raw) < 24:
        raise ConfigError(key, "must be whsec_ followed by base64 of at least 24 bytes")
    return v
