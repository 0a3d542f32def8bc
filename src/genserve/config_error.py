"""``ConfigError`` on its own, so that modules parsing their own config sections (and imported by
``config.py``) can raise it without an import cycle. ``genserve.config.ConfigError`` is this class."""
from __future__ import annotations


class ConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
