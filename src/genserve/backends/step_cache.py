"""Step caches applied around one pipeline call (the request's ``cache``; methods and their checks:
backends/families/speed.py).

``deep`` is genserve's DeepCache-style cache for UNet2DConditionModel (diffusers' cache hooks cover
transformers only). On a full step the whole UNet runs and the output of its deepest up blocks (the
input of the shallowest up block) is kept; on a cached step only ``conv_in``, the shallowest down
block, the shallowest up block and ``conv_out`` run, on top of the kept feature — the deeper down
blocks, the mid block and the deeper up blocks return placeholders that nothing reads. It works by
swapping the blocks' ``forward`` for the duration of the call (no copy of the weights, undone after).
Every ``interval``-th UNet call is a full one, counted from the start of the pipeline call: the
schedule depends on the step count only, and every operation is per row, so a batch with the
cache gives each job what it would get alone.

The DiT methods are diffusers' hooks (``transformer.enable_cache``), enabled for the call and
disabled after it, so each call starts from a clean cache state. ``first_block`` decides from the
data of the whole batch tensor whether to skip; the runner gives each job of such a batch its own
pipeline call (``speed.DATA_DEPENDENT``).

Each context yields ``Counts``: denoiser passes run in full and passes that reused cached work,
from which the runner reports ``steps_computed`` / ``steps_reused``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator


class UnsupportedCache(ValueError):
    """The loaded pipeline has no denoiser this cache method applies to."""

    genserve_code = "invalid_request"


@dataclass
class Counts:
    calls: int = 0  # denoiser passes
    computed: int = 0  # passes that ran the cached part in full

    def steps(self, steps_run: int) -> tuple[int, int]:
        """(steps computed, steps reused) of a call that ran ``steps_run`` steps: passes are counted
        and scaled to steps (a step with classifier-free guidance may make two passes)."""
        if not self.calls:
            return steps_run, 0
        reused = round(steps_run * (self.calls - self.computed) / self.calls)
        return steps_run - reused, reused


def _swap(module: Any, forward: Any, undo: list) -> None:
    module.forward = forward  # an instance attribute shadows the class's forward until deleted
    undo.append(lambda: module.__dict__.pop("forward", None))


@contextmanager
def deep_cache(unet: Any, interval: int) -> Iterator[Counts]:
    n = len(unet.down_blocks)
    if n < 2 or len(unet.up_blocks) != n:
        raise UnsupportedCache(f"deep cache needs a UNet with at least 2 down blocks and as many up blocks; "
                               f"this one has {n} and {len(unet.up_blocks)}")
    counts = Counts()
    kept: dict[str, Any] = {}
    undo: list = []

    def full() -> bool:
        return (counts.calls - 1) % interval == 0

    def count(_module, _args):
        counts.calls += 1
        counts.computed += full()

    def down(block):
        n_out = len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)

        def forward(hidden_states=None, *args, **kwargs):
            if full():
                return type(block).forward(block, hidden_states, *args, **kwargs)
            return hidden_states, (hidden_states,) * n_out  # placeholders: read by skipped up blocks only
        return forward

    def mid(block):
        def forward(hidden_states=None, *args, **kwargs):
            return type(block).forward(block, hidden_states, *args, **kwargs) if full() else hidden_states
        return forward

    def up(block, keeps: bool):
        def forward(*args, **kwargs):
            if full():
                out = type(block).forward(block, *args, **kwargs)
                if keeps:
                    kept["feature"] = out
                return out
            return kept["feature"] if keeps else kwargs.get("hidden_states", args[0] if args else None)
        return forward

    try:
        handle = unet.register_forward_pre_hook(count)
        undo.append(handle.remove)
        for block in list(unet.down_blocks)[1:]:
            _swap(block, down(block), undo)
        if unet.mid_block is not None:
            _swap(unet.mid_block, mid(unet.mid_block), undo)
        for i, block in enumerate(list(unet.up_blocks)[:-1]):
            _swap(block, up(block, keeps=i == n - 2), undo)
        yield counts
    finally:
        for fn in reversed(undo):
            fn()


# The attention modules of the DiT families' blocks (Wan ``blocks.N.attn1``, FLUX and SD3
# ``transformer_blocks.N.attn``, FLUX ``single_transformer_blocks.N.attn``): diffusers' default
# TaylorSeer patterns must match a module name whole, and miss Wan's.
ATTENTION = r"(?:blocks|transformer_blocks|single_transformer_blocks)\.\d+\.attn\d*"


def _probe(transformer: Any, method: str) -> Any:
    """A module that runs only when the cache did not reuse work: the last transformer block (first
    block cache skips the blocks after the first), or that block's attention (TaylorSeer predicts
    the attention outputs)."""
    import torch

    lists = [m for name, m in transformer.named_children() if "blocks" in name and isinstance(m, torch.nn.ModuleList)]
    if not lists or not len(lists[-1]):
        raise UnsupportedCache(f"{type(transformer).__name__} has no transformer block list to cache")
    block = lists[-1][-1]
    if method == "first_block":
        return block
    return next(m for name, m in block.named_modules() if name.startswith("attn"))


def _config(pipe: Any, cache: dict[str, Any]) -> Any:
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if cache["method"] == "first_block":
        return FirstBlockCacheConfig(threshold=cache["threshold"])
    return TaylorSeerCacheConfig(cache_interval=cache["interval"], disable_cache_before_step=2,
                                 taylor_factors_dtype=pipe.transformer.dtype, cache_identifiers=[ATTENTION])


@contextmanager
def hook_cache(pipe: Any, cache: dict[str, Any]) -> Iterator[Counts]:
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(transformer, "enable_cache"):
        raise UnsupportedCache(f"{type(pipe).__name__} has no transformer with diffusers' cache hooks")
    counts = Counts()
    probe = _probe(transformer, cache["method"])

    def real(*args, **kwargs):
        counts.computed += 1
        return type(probe).forward(probe, *args, **kwargs)

    def count(_module, _args):
        counts.calls += 1

    undo: list = []
    try:
        _swap(probe, real, undo)  # before the hooks: they wrap it as the "original" forward
        handle = transformer.register_forward_pre_hook(count)
        undo.append(handle.remove)
        transformer.enable_cache(_config(pipe, cache))
        undo.append(transformer.disable_cache)
        yield counts
    finally:
        for fn in reversed(undo):
            fn()


@contextmanager
def applied(pipe: Any, cache: dict[str, Any] | None) -> Iterator[Counts | None]:
    """The request's step cache on ``pipe`` for one call (None: no cache, yields None)."""
    if not cache:
        yield None
    elif cache["method"] == "deep":
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise UnsupportedCache(f"{type(pipe).__name__} has no UNet for the deep cache")
        with deep_cache(unet, cache["interval"]) as counts:
            yield counts
    else:
        with hook_cache(pipe, cache) as counts:
            yield counts
