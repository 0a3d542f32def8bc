"""Where the config comes from: the file (found by :func:`find_config`) and ``GENSERVE_*`` overrides.

``GENSERVE_SERVER__WEBHOOK_SECRET=whsec_…`` sets ``server.webhook_secret``: the prefix, then the
key's path with ``__`` between levels. Names match case-insensitively and ``_`` matches ``-``
(``GENSERVE_MODELS__DEMO_IMAGE__MAX_BATCH_SIZE=8``). Values are read as TOML (``8`` is an integer,
``true`` a boolean, ``["64x64"]`` a list, ``"8"`` a string); what is not valid TOML is a string.
"""
from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, ConfigErrors, message_of

PREFIX = "GENSERVE_"
SEP = "__"
FILE_NAME = "genserve.toml"
CONFIG_ENV = "GENSERVE_CONFIG"


def find_config(explicit: str | Path | None, cwd: Path | None = None,
                env: Mapping[str, str] | None = None) -> Path | None:
    """``--config`` if given; else ``./genserve.toml`` if it exists; else ``$GENSERVE_CONFIG``;
    else ``None`` (the built-in demo catalog)."""
    if explicit:
        return Path(explicit)
    env = os.environ if env is None else env
    here = (cwd or Path.cwd()) / FILE_NAME
    if here.is_file():
        return here
    return Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None


def overrides(env: Mapping[str, str] | None = None) -> list[tuple[tuple[str, ...], Any, str]]:
    """``(path, value, variable)`` for every ``GENSERVE_A__B…`` variable, sorted by variable."""
    env = os.environ if env is None else env
    out = []
    for var in sorted(env):
        if not var.startswith(PREFIX) or SEP not in var:
            continue
        path = tuple(p.lower() for p in var[len(PREFIX):].split(SEP))
        if all(path):
            out.append((path, scalar(env[var]), var))
    return out


def scalar(text: str) -> Any:
    """A value as TOML reads it; a bare word that is not TOML is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply(data: dict[str, Any], ovr: list[tuple[tuple[str, ...], Any, str]]) -> dict[str, str]:
    """Set each override in ``data`` (in place); returns dotted key -> variable, so an error about
    a key can say which variable set it."""
    origin = {}
    for path, value, var in ovr:
        table, keys = data, []
        for i, part in enumerate(path):
            name = _match(table, part)
            keys.append(name)
            if i == len(path) - 1:
                table[name] = value
            else:
                if not isinstance(table.get(name), dict):
                    table[name] = {}
                table = table[name]
        origin[".".join(keys)] = var
    return origin


def _match(table: dict[str, Any], part: str) -> str:
    """The existing key that ``part`` names (a model called ``demo-image`` from ``DEMO_IMAGE``)."""
    norm = part.replace("-", "_")
    for k in table:
        if k.lower().replace("-", "_") == norm:
            return k
    return part


def blame(e: ConfigError, origin: dict[str, str]) -> ConfigError:
    """``e`` with each error about a key set from the environment saying which variable set it."""
    out = []
    for err in e.errors if isinstance(e, ConfigErrors) else [e]:
        var = next((v for k, v in origin.items() if err.key == k or err.key.startswith((k + "[", k + "."))), None)
        out.append(ConfigError(err.key, f"{message_of(err)} (from ${var})") if var else err)
    return out[0] if len(out) == 1 else ConfigErrors(out)
