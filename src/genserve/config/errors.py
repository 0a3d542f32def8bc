"""Config errors: ``ConfigError`` names one offending key; ``ConfigErrors`` carries several, all reported at
once, with a suggestion for a misspelt key.

The section parsers (``config/load.py`` and the section modules beside it) stay simple — each raises
``ConfigError`` at the first bad key of its table. :meth:`Collector.run` re-runs a parser without the key it
complained about, so one pass over a file reports every bad key of every table, without each parser keeping an
error list.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar


class ConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


T = TypeVar("T")


def message_of(e: ConfigError) -> str:
    """The message without the ``key: `` prefix."""
    return getattr(e, "message", None) or str(e).removeprefix(f"{e.key}: ")


class ConfigErrors(ConfigError):
    """Several bad settings, reported together. ``key`` and the first line are the first error's,
    so code that handles one :class:`ConfigError` still reads it correctly."""

    def __init__(self, errors: list[ConfigError]) -> None:
        ValueError.__init__(self, "\n".join(str(e) for e in errors))
        self.errors = errors
        self.key = errors[0].key
        self.message = message_of(errors[0])


def suggest(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known name, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key(key: str, name: str, known: Iterable[str], what: str = "unknown key") -> ConfigError:
    return ConfigError(key, what + suggest(name, known))


class Collector:
    """Gathers :class:`ConfigError`s across sections; :meth:`check` raises them all at once."""

    MAX_RETRIES = 50  # a parser that keeps failing on keys it cannot drop stops after this many

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def add(self, e: ConfigError) -> None:
        self.errors.extend(e.errors if isinstance(e, ConfigErrors) else [e])

    def run(self, prefix: str, parse: Callable[[Any], T], raw: Any, default: T) -> T:
        """``parse(raw)``; on an error about ``prefix.KEY`` (or ``prefix.KEY[i]``), note it, drop
        ``KEY`` and parse again, so every bad key of the table is reported. Returns the parse of
        what is left, or ``default`` when the table cannot be parsed at all."""
        if not isinstance(raw, dict):
            try:
                return parse(raw)
            except ConfigError as e:
                self.add(e)
                return default
        raw = dict(raw)
        seen: set[str] = set()
        for _ in range(self.MAX_RETRIES):
            try:
                return parse(raw)
            except ConfigError as e:
                if e.key in seen:  # "kind: must be one of …" then "kind: is required": say it once
                    return default
                seen.add(e.key)
                self.add(e)
                key = _table_key(prefix, e.key)
                if key is None or key not in raw:
                    return default  # a missing or cross-key problem: nothing left to drop
                del raw[key]
        return default

    def guard(self, fn: Callable[[], T], default: T) -> T:
        """Run a check that is not tied to one table (cross-section references)."""
        try:
            return fn()
        except ConfigError as e:
            self.add(e)
            return default

    def check(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors(list(self.errors))


def _table_key(prefix: str, key: str) -> str | None:
    """``models.m.sizes[0]`` under ``models.m`` -> ``sizes``."""
    if not key.startswith(prefix + "."):
        return None
    return re.sub(r"\[\d+\]$", "", key[len(prefix) + 1:]) or None
