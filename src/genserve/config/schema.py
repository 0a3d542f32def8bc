"""The config's sections as data, and the JSON Schema editors use (``genserve config schema``).

A :class:`Section` names a top-level table of ``genserve.toml``: the dataclass whose fields are its
keys (so the known keys and the schema come from one place), keys it takes beyond those fields, and
schema details a type annotation cannot say (enums, patterns, ``"never"``). ``config.SECTIONS`` is
the registry: a new section is one entry there plus its parser.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOCS = "docs/configuration.md"
SIZE = {"type": "string", "pattern": r"^[0-9]+[xX][0-9]+$", "description": "WIDTHxHEIGHT"}
NEVER = {"anyOf": [{"type": "number", "minimum": 0}, {"const": "never"}]}


@dataclass(frozen=True)
class Section:
    """One top-level table. ``keyed``: a table of named tables (``[models.NAME]``); ``open``: any key
    with a value of ``values``' schema (``[prices]``)."""

    fields: type | None = None  # a dataclass: its fields (minus ``exclude``) are the known keys
    exclude: tuple[str, ...] = ()
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # more keys, with their schema
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-key schema details
    keyed: bool = False
    open: bool = False
    values: dict[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    title: str = ""

    def known_keys(self) -> set[str]:
        names = {f.name for f in dataclasses.fields(self.fields)} if self.fields else set()
        return (names - set(self.exclude)) | set(self.extra)

    def table_schema(self) -> dict[str, Any]:
        if self.open:
            return {"type": "object", "additionalProperties": self.values}
        props: dict[str, Any] = {}
        defaults = _defaults(self.fields) if self.fields else {}
        hints = typing.get_type_hints(self.fields) if self.fields else {}
        for name in sorted(self.known_keys()):
            ov = self.overrides.get(name, {})
            base = {} if "anyOf" in ov or "type" in ov else _from_type(hints.get(name))
            s = {**(self.extra.get(name) or base), **ov}
            if name in defaults and "default" not in s:
                s["default"] = defaults[name]
            props[name] = s
        out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        if self.required:
            out["required"] = list(self.required)
        return out


def json_schema(sections: dict[str, Section]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name, sec in sections.items():
        table = sec.table_schema()
        if sec.keyed:
            table = {"type": "object", "additionalProperties": table}
        table["description"] = f"[{name}{'.NAME' if sec.keyed else ''}] {sec.title} — see {DOCS}#{name}".strip()
        props[name] = table
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "genserve.schema.json",
            "title": "genserve.toml", "type": "object", "properties": props, "additionalProperties": False}


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        v = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if v is dataclasses.MISSING or v is None:
            continue
        if isinstance(v, Path):
            v = str(v)
        if isinstance(v, tuple):
            if v and isinstance(v[0], int):
                v = "%dx%d" % v
            else:
                continue
        out[f.name] = v
    return out


def _from_type(tp: Any) -> dict[str, Any]:
    if tp is None:
        return {}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_type(args[0]) if len(args) == 1 else {}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp in (str, Path):
        return {"type": "string"}
    if origin is tuple:
        args = typing.get_args(tp)
        if args and args[0] is str:
            return {"type": "array", "items": {"type": "string"}}
    if origin is dict:
        return {"type": "object"}
    return {}
