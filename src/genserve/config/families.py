"""The model-family part of a ``[models.NAME]`` table: its keys (``true_cfg_scale``,
``max_sequence_length``; the speed levers ``prompt_cache_bytes``, ``caches``, ``default_cache``,
``compile``, ``attention_backend``, ``quantize``) and the checks of a model's config against what its family can produce
(read from the model directory's JSON files, or the demo catalog; no weights, no torch).

A size multiple, frame stride or size the family cannot honour is an error naming the key; when
the config does not set ``size_multiple`` / ``frame_stride``, the model's own values are taken.
A model directory genserve cannot read yet (not there at start-up) is checked when a worker loads it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..backends.families import DEMO_TRAITS, MAX_SEQUENCE_LENGTH, Traits, inspect_model_dir
from ..backends.families import speed as levers
from .errors import suggest

KEYS = ("true_cfg_scale", "max_sequence_length")
SPEED_KEYS = ("prompt_cache_bytes", "caches", "default_cache", "compile", "attention_backend", "quantize")
SPEED_SCHEMA = {
    "prompt_cache_bytes": {"type": "integer", "minimum": 0, "default": levers.PROMPT_CACHE_BYTES},
    "caches": {"type": "array", "items": {"enum": list(levers.METHODS)}},
    "default_cache": {"type": "object", "properties": {"method": {"enum": list(levers.METHODS)}},
                      "required": ["method"]},
    "compile": {"enum": list(levers.COMPILE_MODES), "default": "off"},
    "attention_backend": {"type": "string"},
    "quantize": {"type": "string"},
}
DEFAULT_SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class ModelFamily:
    """A model's family: its traits (None: not readable when the config was loaded; the worker
    checks at load) and the family keys of its table."""

    traits: Traits | None = None
    true_cfg_scale: float | None = None  # FLUX-style true CFG (> 1: negative prompts are used)
    max_sequence_length: int | None = None  # T5 tokens (FLUX, SD3, Wan); None: the pipeline's default
    # The speed levers (docs/performance.md).
    prompt_cache_bytes: int = levers.PROMPT_CACHE_BYTES  # the worker's prompt-embedding cache; 0: off
    caches: tuple[str, ...] = ()  # step caches requests may ask for
    default_cache: Any = None  # a normalized cache dict for requests that name none
    compile: str = "off"  # torch.compile of the denoiser: off | regional | full
    attention_backend: str | None = None  # diffusers' attention dispatcher backend
    quantize: str | None = None

    def public(self) -> dict[str, Any]:
        return {"family": self.traits.describe() if self.traits else None, "true_cfg_scale": self.true_cfg_scale,
                "max_sequence_length": self.max_sequence_length, **self.speed_spec(), "caches": list(self.caches),
                "default_cache": self.default_cache}

    def speed_spec(self) -> dict[str, Any]:
        """What a worker needs at load (the load message's spec)."""
        return {"prompt_cache_bytes": self.prompt_cache_bytes, "compile": self.compile,
                "attention_backend": self.attention_backend, "quantize": self.quantize}


def build(cls: Any, kw: dict[str, Any], raw: dict[str, Any], error: Any) -> Any:
    """``cls(**kw)`` (a ModelConfig) with its family keys parsed, checked against and completed
    from its family's traits; ``error(key, message)`` makes the config error to raise."""
    try:
        return apply(cls(**kw, family=ModelFamily(None, **parse_keys(raw))), raw)
    except FamilyConfigError as e:
        raise error(e.key, e.message) from None


class FamilyConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:  # key: relative to the model's table
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def model_traits(source: str) -> Traits | None:
    if source in DEMO_TRAITS:
        return DEMO_TRAITS[source]
    path = Path(source)
    return inspect_model_dir(path) if path.is_dir() else None


def parse_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """The family keys of a model table, type- and range-checked."""
    kw: dict[str, Any] = {}
    if "true_cfg_scale" in raw:
        v = raw["true_cfg_scale"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1.0 <= v <= 50.0:
            raise FamilyConfigError("true_cfg_scale", f"must be a number between 1 and 50, got {v!r}")
        kw["true_cfg_scale"] = float(v)
    if "max_sequence_length" in raw:
        v = raw["max_sequence_length"]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SEQUENCE_LENGTH:
            raise FamilyConfigError("max_sequence_length", f"must be an integer between 1 and {MAX_SEQUENCE_LENGTH}, "
                                                           f"got {v!r}")
        kw["max_sequence_length"] = v
    return {**kw, **parse_speed(raw)}


def parse_speed(raw: dict[str, Any]) -> dict[str, Any]:
    """The speed keys, type-checked; ``caches`` / ``default_cache`` against the family in ``apply``."""
    kw: dict[str, Any] = {}
    if "prompt_cache_bytes" in raw:
        v = raw["prompt_cache_bytes"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise FamilyConfigError("prompt_cache_bytes", f"must be an integer ≥ 0 (0: off), got {v!r}")
        kw["prompt_cache_bytes"] = v
    if "caches" in raw:
        v = raw["caches"]
        if not isinstance(v, list):
            raise FamilyConfigError("caches", f"must be a list of cache methods, got {v!r}")
        for i, m in enumerate(v):
            if m not in levers.METHODS:
                raise FamilyConfigError(f"caches[{i}]", f"must be one of {', '.join(levers.METHODS)}, got {m!r}")
        kw["caches"] = tuple(dict.fromkeys(v))
    if "default_cache" in raw:
        try:
            kw["default_cache"] = levers.normalize(raw["default_cache"], None, kw.get("caches", ()))
        except levers.CacheError as e:
            raise FamilyConfigError("default_cache" + e.field.removeprefix("cache"), e.message) from None
    if "compile" in raw:
        if raw["compile"] not in levers.COMPILE_MODES:
            raise FamilyConfigError("compile", f"must be one of {', '.join(levers.COMPILE_MODES)}, "
                                               f"got {raw['compile']!r}")
        kw["compile"] = raw["compile"]
    if "attention_backend" in raw:
        v = raw["attention_backend"]
        problem = levers.attention_backend_problem(v) if isinstance(v, str) else "must be a string"
        if problem:
            raise FamilyConfigError("attention_backend", problem)
        kw["attention_backend"] = v
    if "quantize" in raw:
        v = raw["quantize"]
        if not isinstance(v, str) or v not in levers.QUANTIZE:
            raise FamilyConfigError("quantize", f"must be one of {', '.join(levers.QUANTIZE)}, got {v!r}")
        if not levers.cuda_available():
            raise FamilyConfigError("quantize", f"{v!r} quantization needs a CUDA device; this machine has none")
        kw["quantize"] = v
    return kw


def apply(m: Any, raw: dict[str, Any]) -> Any:
    """``m`` (a ModelConfig) checked against, and completed from, its family's traits."""
    t = model_traits(m.source)
    if t is None:
        return m
    fam = f"{t.family} ({t.pipeline})"
    if t.kind != m.kind:
        raise FamilyConfigError("kind", f"{fam} makes {t.kind}s, not {m.kind}s")
    kw: dict[str, Any] = {"family": replace(m.family, traits=t)}
    if "size_multiple" in raw:
        if m.size_multiple % t.size_multiple:
            raise FamilyConfigError("size_multiple", f"{fam} needs sizes that are multiples of {t.size_multiple} "
                                                     f"(VAE scale × patch size / packing)")
    else:  # the model's, and never below the old default of 8 (tiny test models have smaller VAEs)
        kw["size_multiple"] = math.lcm(DEFAULT_SIZE_MULTIPLE, t.size_multiple)
    if t.kind == "video" and t.frame_multiple:
        if "frame_stride" in raw:
            if m.frame_stride % t.frame_multiple:
                raise FamilyConfigError("frame_stride", f"{fam} needs num_frames - 1 to be a multiple of "
                                                        f"{t.frame_multiple} (the VAE's temporal factor)")
        else:
            kw["frame_stride"] = t.frame_multiple
    if t.max_side:
        for i, (w, h) in enumerate(m.sizes):
            if max(w, h) > t.max_side:
                raise FamilyConfigError(f"sizes[{i}]", f"{fam} covers sides up to {t.max_side} pixels")
        if max(m.default_size) > t.max_side and "default_size" in raw:
            raise FamilyConfigError("default_size", f"{fam} covers sides up to {t.max_side} pixels")
    if m.family.true_cfg_scale is not None and not t.true_cfg:
        raise FamilyConfigError("true_cfg_scale", f"{fam} has no true CFG (only FLUX-style pipelines take it)")
    if m.family.max_sequence_length is not None and not t.max_sequence_length:
        raise FamilyConfigError("max_sequence_length", f"{fam} has no T5-style text encoder length to set")
    for i, method in enumerate(m.family.caches):
        if t.family not in levers.METHODS[method][0]:
            raise FamilyConfigError(f"caches[{i}]", f"{method!r} does not apply to {fam} (it has: "
                                                    f"{', '.join(levers.methods_for(t.family)) or 'none'})")
    return replace(m, **kw)


# ---- [loras.NAME]: adapters from the config (docs/lora.md) -------------------------------------------

LORA_BATCHING = ("mixed", "split")
LORA_KEYS = ("model", "source")


@dataclass(frozen=True)
class LoraSource:
    """``[loras.NAME]``: an adapter for ``model`` read at start-up from ``source`` (a directory, a
    ``.safetensors`` file or an ``s3://`` URL), registered as shared (every tenant may use it)."""

    name: str
    model: str
    source: str


def parse_lora(name: str, raw: Any, models: Any, error: Any) -> LoraSource:
    """``error(key, message)`` makes the config error to raise (key relative to ``loras.NAME``)."""
    if not isinstance(raw, dict):
        raise error("", "must be a table with model and source")
    for k in raw:
        if k not in LORA_KEYS:
            raise error(k, "unknown key" + suggest(k, LORA_KEYS))
    for k in LORA_KEYS:
        if not isinstance(raw.get(k), str) or not raw[k]:
            raise error(k, "is required (a string)")
    if raw["model"] not in models:
        raise error("model", f"unknown model {raw['model']!r}")
    src = raw["source"]
    if not (src.startswith("s3://") or src.endswith(".safetensors") or Path(src).is_dir()):
        raise error("source", "must be a directory, a .safetensors file or an s3:// URL (never a pickle)")
    return LoraSource(name, raw["model"], src)
