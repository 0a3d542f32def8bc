"""Runs batches on one device with real diffusers pipelines. Lives in a worker process."""
from __future__ import annotations

import gc
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..storage import OUTPUT_TYPES, ResultStore, output_name
from .encode import encode_mp4, encode_png

Emit = Callable[[dict[str, Any]], None]


def _dtype_kwarg() -> str:
    # diffusers renamed ``torch_dtype`` to ``dtype`` (the old name still works, with a warning).
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

        return "dtype"
    except ImportError:
        return "torch_dtype"


DTYPE_KWARG = _dtype_kwarg()


class BatchAborted(Exception):
    """Every job of the batch was canceled: stop the pipeline at this step boundary."""


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def module_bytes(pipe) -> int:
    """Parameters + buffers of every torch module in the pipeline."""
    import torch

    total = 0
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in comp.parameters())
            total += sum(b.numel() * b.element_size() for b in comp.buffers())
    return total


def _widest(module, *attrs: str) -> int:
    cfg = getattr(module, "config", None)
    best = 0
    for a in attrs:
        v = getattr(cfg, a, None) if cfg is not None else None
        if isinstance(v, (list, tuple)) and v:
            best = max(best, max(int(x) for x in v))
        elif isinstance(v, int):
            best = max(best, v)
    return best


def _vae_width(vae) -> int:
    """Widest channel count of the VAE decoder (SD-style ``block_out_channels``, or Wan-style
    ``base_dim × max(dim_mult)``); 128 when the config says neither."""
    width = _widest(vae, "block_out_channels")
    if width:
        return width
    cfg = getattr(vae, "config", None)
    base, mult = getattr(cfg, "base_dim", None), getattr(cfg, "dim_mult", None)
    if base and mult:
        return int(base) * max(int(m) for m in mult)
    return 128


def estimate_working_bytes(pipe, n: int, width: int, height: int, frames: int, guidance: float, dtype_bytes: int) -> int:
    """CPU estimate of a batch's peak working memory, from latent and activation sizes.

    Denoiser: (batch × CFG copies) × latent positions × its widest channel count × a depth factor
    for the activations alive at once. VAE decode: output pixels × its widest channel count × 3
    live buffers. Plus the decoded float output. (On CUDA the allocator's peak is measured instead.)
    """
    scale = int(getattr(pipe, "vae_scale_factor", 0) or getattr(pipe, "vae_scale_factor_spatial", 0) or 8)
    t_scale = int(getattr(pipe, "vae_scale_factor_temporal", 0) or 1)
    latent_frames = max(1, (frames - 1) // t_scale + 1) if frames else 1
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    width_ch = _widest(denoiser, "block_out_channels")
    if not width_ch and denoiser is not None:
        heads, head_dim = getattr(denoiser.config, "num_attention_heads", 0), getattr(denoiser.config, "attention_head_dim", 0)
        width_ch = int(heads or 0) * int(head_dim or 0)
    width_ch = width_ch or 320
    cfg_copies = 2 if guidance > 1.0 else 1
    positions = (height // scale) * (width // scale) * latent_frames
    act = n * cfg_copies * positions * width_ch * dtype_bytes * 16
    vae_ch = _vae_width(getattr(pipe, "vae", None))
    pixels = n * width * height * max(1, frames)
    vae = pixels * vae_ch * dtype_bytes * 3
    return act + vae + pixels * 3 * 4


class PipelineRunner:
    def __init__(self, device: str, store: ResultStore, host_cache_bytes: int = 0) -> None:
        self.device = device
        self.store = store
        self.pipes: dict[str, Any] = {}
        self.bytes: dict[str, int] = {}
        self.host_cache: OrderedDict[str, Any] = OrderedDict()  # GPU workers: unloaded models in host RAM
        self.host_cache_bytes = host_cache_bytes if device.startswith("cuda") else 0
        self.loaded_before: set[str] = set()

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def capacity(self, cpu_budget: int) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.mem_get_info(self.device)[1])
        return cpu_budget

    def used_bytes(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.memory_allocated(self.device))
        return sum(self.bytes.values())

    def load(self, model: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Load ``model`` unless resident. Returns what the server records about the load."""
        if model in self.pipes:
            return {"model": model, "cached": True, "bytes": self.bytes[model], "tier": "resident"}
        import torch

        t0 = time.time()
        before = torch.cuda.memory_allocated(self.device) if self.cuda else 0
        if model in self.host_cache:
            pipe = self.host_cache.pop(model).to(self.device)
            tier = "host"
        else:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(spec["path"], **{DTYPE_KWARG: resolve_dtype(spec["dtype"], self.device)})
            pipe = pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            # On CPU a reload reads files the OS most likely still caches; we cannot see which.
            tier = "page_cache" if (model in self.loaded_before and not self.cuda) else "disk"
        if self.cuda:
            torch.cuda.synchronize(self.device)
            nbytes = int(torch.cuda.memory_allocated(self.device) - before)
        else:
            nbytes = module_bytes(pipe)
        self.pipes[model] = pipe
        self.bytes[model] = nbytes
        self.loaded_before.add(model)
        return {"model": model, "cached": False, "load_start": t0, "load_end": time.time(), "bytes": nbytes,
                "tier": tier}

    def unload(self, model: str) -> dict[str, Any]:
        pipe = self.pipes.pop(model, None)
        freed = self.bytes.pop(model, 0)
        kept = None
        if pipe is not None and self.host_cache_bytes and module_bytes(pipe) <= self.host_cache_bytes:
            self.host_cache[model] = pipe.to("cpu")
            kept = "host"
            while sum(module_bytes(p) for p in self.host_cache.values()) > self.host_cache_bytes:
                self.host_cache.popitem(last=False)
        del pipe
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
        return {"model": model, "freed_bytes": freed, "kept_in": kept, "used_bytes": self.used_bytes(),
                "resident": sorted(self.pipes)}

    def run(self, msg: dict[str, Any], emit: Emit, canceled: set[str],
            on_step: Callable[[int], None] = lambda step: None) -> int:
        """Run one batch as one pipeline call; report progress, per-job outputs and timings.
        ``on_step(i)`` runs at the end of each step (fault injection hooks in there).
        Returns the batch's peak working bytes (measured on CUDA, estimated on CPU)."""
        import torch

        batch_id, kind, p = msg["batch_id"], msg["kind"], msg["params"]
        jobs = msg["jobs"]
        ids = [j["id"] for j in jobs]
        pipe = self.pipes[msg["model"]]
        reported: set[str] = set()

        def report_cancels() -> None:
            for jid in ids:
                if jid in canceled and jid not in reported:
                    reported.add(jid)
                    emit({"ev": "job_canceled", "batch_id": batch_id, "job_id": jid, "t": time.time()})
            if len(reported) == len(ids):
                raise BatchAborted()

        total = p["steps"]

        def on_step_end(_pipe, i, _t, kwargs):
            on_step(i)
            emit({"ev": "progress", "batch_id": batch_id, "step": i + 1, "total": total})
            report_cancels()
            return kwargs

        report_cancels()
        negs = [j.get("negative_prompt") for j in jobs]
        call: dict[str, Any] = dict(
            prompt=[j["prompt"] for j in jobs],
            negative_prompt=[n or "" for n in negs] if any(negs) else None,
            width=p["width"], height=p["height"], num_inference_steps=total, guidance_scale=p["guidance"],
            generator=[torch.Generator(device="cpu").manual_seed(j["seed"]) for j in jobs],
            callback_on_step_end=on_step_end,
        )
        if kind == "video":
            call["num_frames"] = p["num_frames"]
            call["output_type"] = "np"
        else:
            call["output_type"] = "pil"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        t_start = time.time()
        emit({"ev": "started", "batch_id": batch_id, "t": t_start})
        with torch.inference_mode():
            out = pipe(**call)
        t_end = time.time()
        if self.cuda:
            peak = int(torch.cuda.max_memory_allocated(self.device) - base)
        else:
            dtype_bytes = next(iter(pipe.components["vae"].parameters())).element_size() if "vae" in pipe.components else 4
            peak = estimate_working_bytes(pipe, len(jobs), p["width"], p["height"], p.get("num_frames", 0),
                                          p["guidance"], dtype_bytes)
        outputs = out.images if kind == "image" else out.frames
        for idx, jid in enumerate(ids):
            if jid in canceled:
                if jid not in reported:
                    reported.add(jid)
                    emit({"ev": "job_canceled", "batch_id": batch_id, "job_id": jid, "t": time.time()})
                continue
            data = encode_png(outputs[idx]) if kind == "image" else encode_mp4(outputs[idx], p["fps"])
            ref = self.store.put(jid, output_name(kind), data, OUTPUT_TYPES[kind])
            emit({"ev": "job_done", "batch_id": batch_id, "job_id": jid, "result": ref.to_dict(),
                  "inference_start": t_start, "inference_end": t_end, "output_written": time.time()})
        return peak
