"""Per-model load-time levers on the denoiser: ``compile`` (torch.compile), ``attention_backend``
(diffusers' attention dispatcher) and ``quantize`` (torchao, CUDA only). Applied by the runner
after the weights are loaded and measured, so the model's resident bytes stay the weights'.

Compile happens at load and is part of the cold start: the model's default size is run once per
warm-up batch size (1 and the model's largest batch), one denoising step each, so the graphs a
batch needs exist before the first job. torch.compile's automatic dynamic shapes mark the batch
dimension dynamic on the second size, so later batch sizes reuse that graph instead of compiling
one each (no recompilation storm); a size the warm-up did not see compiles once, and is counted
(``graphs()`` before and after each batch: the worker reports the difference).

The compiler's caches (Inductor's FX graph cache and generated kernels) live under
``compile_cache_dir`` (the server's ``data_dir/compile-cache``): set for the worker process before
its first compile, so a restarted worker, or a second one, compiles from cache.
"""
from __future__ import annotations

import os
import time
from typing import Any

from .families import UnsupportedPipeline


def denoiser(pipe: Any) -> Any:
    module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if module is None:
        raise UnsupportedPipeline(f"{type(pipe).__name__} has no unet or transformer to compile or configure")
    return module


def use_cache_dir(path: str | None) -> None:
    """Point Inductor's on-disk caches at ``path`` (before this process compiles anything)."""
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def configure(pipe: Any, spec: dict[str, Any]) -> None:
    """``attention_backend`` and ``quantize`` (checked by the server's config where it can; a worker
    on another machine refuses the load, naming the key)."""
    backend, scheme = spec.get("attention_backend"), spec.get("quantize")
    if not (backend or scheme):
        return
    module = denoiser(pipe)
    if backend:
        from .families.speed import attention_backend_problem

        problem = attention_backend_problem(backend)
        if problem:
            raise UnsupportedPipeline(f"attention_backend = {backend!r}: {problem}")
        module.set_attention_backend(backend)
    if scheme:
        import torch

        if not (torch.cuda.is_available() and next(module.parameters()).is_cuda):
            raise UnsupportedPipeline(f"quantize = {scheme!r}: needs the model on a CUDA device")
        try:
            from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
        except ImportError:
            raise UnsupportedPipeline(f"quantize = {scheme!r}: the torchao package is not installed") from None
        quantize_(module, Float8WeightOnlyConfig() if scheme == "float8" else Int8WeightOnlyConfig())


def compile_denoiser(pipe: Any, mode: str) -> None:
    module = denoiser(pipe)
    if mode == "regional":
        if not getattr(module, "_repeated_blocks", None):
            raise UnsupportedPipeline(f"compile = 'regional': {type(module).__name__} declares no repeated blocks; "
                                      "use compile = 'full'")
        module.compile_repeated_blocks()
    elif mode == "full":
        module.compile()


def warm_up(pipe: Any, adapter: Any, spec: dict[str, Any]) -> None:
    """One denoising step at the model's default size for each warm-up batch size."""
    import torch

    shape = spec.get("warmup") or {}
    params = {"width": shape.get("width", 512), "height": shape.get("height", 512), "steps": 1,
              "guidance": shape.get("guidance", 1.0), "num_frames": shape.get("num_frames", 0)}
    for n in shape.get("batch_sizes") or (1,):
        jobs = [{"id": f"warmup-{i}", "prompt": "warm-up", "negative_prompt": None} for i in range(n)]
        call = adapter.call_kwargs(jobs, params)
        call["output_type"] = "latent"
        with torch.inference_mode():
            pipe(**call)


def apply(pipe: Any, adapter: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Configure and (if asked) compile and warm up the denoiser. What the load reports:
    ``compiled`` (the mode, or None), ``compile_s`` and ``compiles`` (graphs compiled)."""
    configure(pipe, spec)
    mode = spec.get("compile") or "off"
    if mode == "off":
        return {"compiled": None, "compile_s": 0.0, "compiles": 0}
    use_cache_dir(spec.get("compile_cache_dir"))
    t0, before = time.time(), graphs()
    compile_denoiser(pipe, mode)
    warm_up(pipe, adapter, spec)
    return {"compiled": mode, "compile_s": round(time.time() - t0, 3), "compiles": graphs() - before}
