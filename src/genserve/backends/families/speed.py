"""The speed levers as data: step caches a request may ask for (``cache = {"method": ..., ...}``)
and which family has which, compile modes, attention backends, quantization. The server validates
requests and configs with these; the worker applies them (backends/step_cache.py,
backends/compile.py). Nothing here imports torch at module level (the server imports it); the
two checks that need the installed torch / diffusers import them when called.

- ``deep`` (UNet families): DeepCache-style. Every ``interval``-th step runs the whole UNet and
  keeps the input of its shallowest up block; the steps between run only the shallowest down and
  up blocks on top of that kept feature. The schedule depends on the step count alone.
- ``first_block`` (DiT families): diffusers' first-block cache: when the first transformer block's
  output changed by less than ``threshold`` (relative L1) since the last full step, the other
  blocks are skipped and their last residual is reused. The decision is data-dependent.
- ``taylorseer`` (DiT families): diffusers' TaylorSeer: full steps every ``interval``, the blocks'
  outputs predicted by a Taylor expansion in between. The schedule depends on the step count.
Others this diffusers ships are not offered: MagCache needs per-model calibrated magnitude ratios;
FasterCache assumes the conditional and unconditional passes share one call (Wan runs them in two);
pyramid attention broadcast and SeaCache are not wired up yet.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROMPT_CACHE_BYTES = 64 << 20  # default per model: a few hundred SD prompts, dozens of T5-length ones
COMPILE_MODES = ("off", "regional", "full")
QUANTIZE = ("float8", "int8")  # torchao weight-only schemes, CUDA only
CPU_ATTENTION = ("native", "_native_math", "flex")  # the dispatcher's backends that run without CUDA
UNET_FAMILIES = ("sd", "sdxl")
# SD3 is not among them: its SD3Transformer2DModel has no diffusers cache support (CacheMixin) in
# the installed diffusers (0.42.1), and its joint blocks are not in the hooks' block registry.
DIT_FAMILIES = ("wan", "wan-i2v", "flux")
# method -> (families, {param: (type, low, high, default)}); low exclusive for floats
METHODS: dict[str, tuple[tuple[str, ...], dict[str, tuple[type, float, float, Any]]]] = {
    "deep": (UNET_FAMILIES, {"interval": (int, 2, 10, 3)}),
    "first_block": (DIT_FAMILIES, {"threshold": (float, 0.0, 1.0, 0.1)}),
    "taylorseer": (DIT_FAMILIES, {"interval": (int, 2, 10, 3)}),
}
# Caches whose skip decision looks at the data: the diffusers hooks take it for the whole batch
# tensor, so each job of such a batch runs in its own pipeline call (a batch == lone jobs).
DATA_DEPENDENT = ("first_block",)


class CacheError(ValueError):
    def __init__(self, field: str, message: str) -> None:  # field: cache.method, cache.threshold, ...
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def methods_for(family: str | None) -> tuple[str, ...]:
    return tuple(m for m, (fams, _) in METHODS.items() if family in fams)


def normalize(raw: Any, family: str | None, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``raw`` ({"method": ..., params}) checked and completed with defaults. ``family`` None: not
    known (a model the server could not read), any method is taken and the worker checks.
    ``allowed``: the methods the model enables (None: any its family supports)."""
    if not isinstance(raw, Mapping):
        raise CacheError("cache", 'must be an object such as {"method": "first_block", "threshold": 0.1}')
    method = raw.get("method")
    if method not in METHODS:
        raise CacheError("cache.method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    fams, params = METHODS[method]
    if family is not None and family not in fams:
        have = ", ".join(methods_for(family)) or "none"
        raise CacheError("cache.method", f"{method!r} does not apply to the {family} family (it has: {have})")
    if allowed is not None and method not in allowed:
        raise CacheError("cache.method", f"{method!r} is not enabled for this model (caches = "
                                         f"[{', '.join(allowed)}])")
    out: dict[str, Any] = {"method": method}
    for key in raw:
        if key != "method" and key not in params:
            raise CacheError(f"cache.{key}", f"is not a parameter of {method!r} (it takes: {', '.join(params)})")
    for key, (tp, lo, hi, default) in params.items():
        v = raw.get(key, default)
        ok = not isinstance(v, bool) and isinstance(v, (int, float) if tp is float else int)
        if not ok or not ((lo < v <= hi) if tp is float else (lo <= v <= hi)):
            span = f"greater than {lo:g} and at most {hi:g}" if tp is float else f"an integer from {lo} to {hi}"
            raise CacheError(f"cache.{key}", f"must be {span}, got {v!r}")
        out[key] = tp(v)
    return out


def label(cache: Mapping[str, Any] | None) -> str:
    """The cache's part of the batch key: equal settings, equal label."""
    if not cache:
        return ""
    return ":".join([cache["method"], *(f"{k}={cache[k]:g}" for k in sorted(cache) if k != "method")])


def attention_backend_problem(name: str) -> str | None:
    """Why diffusers' attention dispatcher cannot use backend ``name`` here, or None."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        backend = AttentionBackendName(name)
    except ValueError:
        return f"unknown attention backend {name!r}; diffusers has: {', '.join(b.value for b in AttentionBackendName)}"
    try:
        _check_attention_backend_requirements(backend)
    except (RuntimeError, ImportError, ValueError) as e:
        return f"{name!r} is not available with the installed packages: {e}"
    if name not in CPU_ATTENTION and not cuda_available():
        return f"{name!r} needs a CUDA device; on this machine: {', '.join(CPU_ATTENTION)}"
    return None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
