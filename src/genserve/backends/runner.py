"""Runs batches on one device with real diffusers pipelines. Lives in a worker process."""
from __future__ import annotations

import gc
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..storage import THUMBNAIL_NAME, THUMBNAIL_TYPE, ResultRef, ResultStore, output_name, output_type
from .encode import encode_image, encode_mp4, encode_thumbnail
from .families import FamilyAdapter, UnsupportedPipeline, adapter_for
from .compile import apply as apply_levers, graphs
from .families.speed import DATA_DEPENDENT
from .prompt_cache import Embedder, embedded_call, make_embedder
from .step_cache import applied as step_cache
from .lora_apply import LoraRuntime

Emit = Callable[[dict[str, Any]], None]


def _dtype_kwarg() -> str:
    # diffusers renamed ``torch_dtype`` to ``dtype`` (the old name still works, with a warning).
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

        return "dtype"
    except ImportError:
        return "torch_dtype"


DTYPE_KWARG = _dtype_kwarg()


def encode_output(kind: str, output: Any, fps: int, fmt: str = "png", quality: int | None = None) -> bytes:
    return encode_image(output, fmt, quality) if kind == "image" else encode_mp4(output, fps)


def with_thumbnail(store: ResultStore, ref: ResultRef, kind: str, output: Any) -> ResultRef:
    """Write the output's thumbnail next to it (``<job_id>/thumbnail.jpg``); ``ref`` with it. Written
    after the output: an output adopted after a crash finds its thumbnail if it was written
    (records.adopt_output), and a thumbnail never exists without its output."""
    job_id = ref.key.partition("/")[0]
    thumb = store.put(job_id, THUMBNAIL_NAME, encode_thumbnail(kind, output), THUMBNAIL_TYPE)
    return ResultRef(ref.key, ref.content_type, ref.bytes, thumbnail=thumb)


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


class IgnoredInput(ValueError):
    """A job carries an input the pipeline would silently ignore."""

    genserve_code = "invalid_request"


class UnsupportedSize(ValueError):
    """A batch asks for a size the loaded pipeline cannot produce (the server checks requests
    against the family when it could read the model; this is the worker's own check)."""

    genserve_code = "invalid_request"


def check_size(traits: Any, width: int, height: int) -> None:
    m = traits.size_multiple
    if width % m or height % m:
        raise UnsupportedSize(f"{width}x{height}: {traits.pipeline} ({traits.family}) makes sizes that are multiples "
                              f"of {m}")
    if traits.max_side and max(width, height) > traits.max_side:
        raise UnsupportedSize(f"{width}x{height}: {traits.pipeline} ({traits.family}) covers sides up to "
                              f"{traits.max_side} pixels (its positional embedding)")


class OutputMismatch(RuntimeError):
    """The pipeline returned an output of another size or frame count than asked for."""

    genserve_code = "output_mismatch"


def check_output(kind: str, output: Any, width: int, height: int, frames: int) -> None:
    """Each output must be exactly what was asked for: a pipeline that resizes or rounds silently
    (a warning at most) would otherwise hand the user something else, marked succeeded."""
    import numpy as np

    if kind == "image":
        got = tuple(output.size)
        if got != (width, height):
            raise OutputMismatch(f"asked for {width}x{height}, the pipeline returned {got[0]}x{got[1]}")
        return
    arr = np.asarray(output)
    if arr.ndim != 4 or arr.shape[0] != frames or arr.shape[1:3] != (height, width):
        raise OutputMismatch(f"asked for {frames} frames of {width}x{height}, the pipeline returned an array "
                             f"of shape {tuple(arr.shape)} (frames, height, width, channels)")


def dtype_bytes_of(pipe) -> int:
    for name in ("transformer", "unet", "vae"):
        comp = pipe.components.get(name)
        if comp is not None and hasattr(comp, "parameters"):
            for p in comp.parameters():
                return p.element_size()
    return 4


def with_inputs(job: dict[str, Any], store: ResultStore) -> dict[str, Any]:
    """The job with its stored input images opened (``image_pil``, ``mask_pil``)."""
    from .image_input import open_input

    out = job
    for field in ("image", "mask"):
        if job.get(field):
            try:
                out = {**out, f"{field}_pil": open_input(job[field], store.read)}
            except (OSError, KeyError) as e:
                raise RuntimeError(f"job {job['id']}: its stored {field} input {job[field]!r} cannot be read "
                                   f"({type(e).__name__})") from None
    return out


class PipelineRunner:
    def __init__(self, device: str, store: ResultStore, host_cache_bytes: int = 0,
                 encode: Callable[[str, Any, int], bytes] | None = None, lora_bytes: int = 1 << 30) -> None:
        """``encode(kind, output, fps, [fmt=, quality=])``: output -> stored bytes (default PNG /
        H.264 MP4; an image job's output_format and output_compression come as ``fmt``, ``quality``)."""
        self.device = device
        self.encode = encode or encode_output
        self.store = store
        self.pipes: dict[str, Any] = {}
        self.adapters: dict[str, FamilyAdapter] = {}
        self.bytes: dict[str, int] = {}
        self.host_cache: OrderedDict[str, Any] = OrderedDict()  # GPU workers: unloaded models in host RAM
        self.host_cache_bytes = host_cache_bytes if device.startswith("cuda") else 0
        self.loaded_before: set[str] = set()
        self.embedders: dict[str, Embedder] = {}  # per model: its prompt-embedding cache (absent: off)
        self.compiled: dict[str, str | None] = {}  # per model: its compile mode (None: eager)
        self.compiles = 0  # graphs compiled during the last batch (a shape the load's warm-up missed)
        self.loras = LoraRuntime(store, device, lora_bytes)  # adapters: LRU within lora_bytes (docs/lora.md)

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
        try:
            adapter = adapter_for(pipe, spec)
        except UnsupportedPipeline as e:
            pipe = None  # free the weights before reporting (the traceback would keep them alive)
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
            raise UnsupportedPipeline(str(e)) from None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            nbytes = int(torch.cuda.memory_allocated(self.device) - before)
        else:
            nbytes = module_bytes(pipe)
        try:
            levers = apply_levers(pipe, adapter, spec)  # compile + warm-up: part of the cold start
        except UnsupportedPipeline as e:
            pipe = None
            gc.collect()
            raise UnsupportedPipeline(str(e)) from None
        self.compiled[model] = levers["compiled"]
        self.pipes[model] = pipe
        self.adapters[model] = adapter
        self.bytes[model] = nbytes
        embedder = make_embedder(model, adapter, spec)
        if embedder is not None:
            self.embedders[model] = embedder
        self.loaded_before.add(model)
        return {"model": model, "cached": False, "load_start": t0, "load_end": time.time(), "bytes": nbytes,
                "tier": tier, **levers}

    def unload(self, model: str) -> dict[str, Any]:
        pipe = self.pipes.pop(model, None)
        self.adapters.pop(model, None)
        self.embedders.pop(model, None)
        self.compiled.pop(model, None)
        self.loras.hooks.pop(id(pipe), None)  # its LoRA hooks go with it (a reload hooks the new copy)
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
        A batch whose jobs could change each other's outputs in one call (``adapter.group_key``)
        runs as one call per group, one after another. Returns the batch's peak working bytes as
        measured by the CUDA allocator; 0 on CPU, where nothing measures it (``estimated_bytes``
        gives the family's estimate instead: a hint, never a measurement)."""
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

        adapter = self.adapters[msg["model"]]
        check_size(adapter.traits, p["width"], p["height"])
        for j in jobs if adapter.checks_inputs else ():
            ignored = adapter.ignored_inputs(j, p)
            if ignored:
                raise IgnoredInput(f"job {j['id']}: {msg['model']} ({adapter.traits.family}) would ignore "
                                   f"{', '.join(ignored)}")
        groups: dict[str, list[dict[str, Any]]] = {}
        cache = jobs[0].get("cache")  # one per batch: it is part of the batch key
        alone = bool(cache) and cache["method"] in DATA_DEPENDENT  # its skips look at the whole batch tensor
        for j in jobs:  # one pipeline call per group: jobs in a call must not change each other's output
            groups.setdefault(adapter.group_key(j) + (f"|{j['id']}" if alone else ""), []).append(j)
        steps = p["steps"]
        total = steps * len(groups)
        done_steps = 0

        ran = [0]  # steps of the current call

        def on_step_end(_pipe, i, _t, kwargs):
            ran[0] = i + 1
            on_step(done_steps + i)
            emit({"ev": "progress", "batch_id": batch_id, "step": done_steps + i + 1, "total": total})
            report_cancels()
            return kwargs

        report_cancels()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        t_start, graphs_before = time.time(), graphs()
        emit({"ev": "started", "batch_id": batch_id, "t": t_start})
        outputs: dict[str, Any] = {}
        execution: dict[str, dict[str, Any]] = {}
        embedder = self.embedders.get(msg["model"])
        self.loras.configure(msg)
        lora_info: dict[str, dict[str, Any]] = {}  # job id -> lora_load_s, tiers
        for group in groups.values():
            if all(j["id"] in canceled for j in group):
                done_steps += steps  # nobody left to run it for (reported below)
                continue
            group = [with_inputs(j, self.store) for j in group]
            call = adapter.call_kwargs(group, p)
            task_pipe = adapter.pipeline(pipe, group[0].get("task") or "text")
            prompt_cache = [None] * len(group)
            if embedder is not None:
                cfg = embedder.path.cfg(task_pipe, p["guidance"])
                prompt_cache = embedded_call(embedder, task_pipe, group, call, cfg, self.device)
            call["generator"] = [torch.Generator(device="cpu").manual_seed(j["seed"]) for j in group]
            call["callback_on_step_end"] = on_step_end
            call["output_type"] = "np" if kind == "video" else "pil"
            lora_jobs = self.loras.adapters_of(pipe, group, lora_info) if any(j.get("loras") for j in group) else None
            with torch.inference_mode(), step_cache(task_pipe, cache) as counts, \
                    self.loras.hooks_for(pipe).plan(lora_jobs or []):
                out = task_pipe(**call)
            computed, reused = counts.steps(ran[0]) if counts is not None else (ran[0], 0)
            got = out.images if kind == "image" else out.frames
            for j, o, pc in zip(group, got, prompt_cache):
                check_output(kind, o, p["width"], p["height"], p.get("num_frames", 0))
                outputs[j["id"]] = o
                execution[j["id"]] = {"cache": cache or None, "steps_computed": computed, "steps_reused": reused,
                                      "prompt_cache": pc, "compiled": self.compiled.get(msg["model"])}
            done_steps += steps
        t_end = time.time()
        self.compiles = graphs() - graphs_before
        peak = int(torch.cuda.max_memory_allocated(self.device) - base) if self.cuda else 0
        for jid in ids:
            if jid in canceled:
                if jid not in reported:
                    reported.add(jid)
                    emit({"ev": "job_canceled", "batch_id": batch_id, "job_id": jid, "t": time.time()})
                continue
            ref = self.write_output(kind, next(j for j in jobs if j["id"] == jid), outputs[jid], p["fps"])
            emit({"ev": "job_done", "batch_id": batch_id, "job_id": jid, "result": ref.to_dict(),
                  "inference_start": t_start, "inference_end": t_end, "output_written": time.time(),
                  "execution": execution[jid], **lora_info.get(jid, {})})
        return peak

    def write_output(self, kind: str, job: dict[str, Any], output: Any, fps: int) -> ResultRef:
        """Encode one job's output in its format (``output_format``: png when absent) and store it."""
        fmt = job.get("output_format") if kind == "image" else None
        opts = {"fmt": fmt, "quality": job.get("output_compression")} if fmt and fmt != "png" else {}
        data = self.encode(kind, output, fps, **opts)
        ref = self.store.put(job["id"], output_name(kind, fmt), data, output_type(kind, fmt))
        return with_thumbnail(self.store, ref, kind, output)

    def estimated_bytes(self, msg: dict[str, Any]) -> int:
        """The family adapter's estimate of the working memory of the batch ``msg`` (its largest
        pipeline call: groups run one after another)."""
        model, p = msg["model"], msg["params"]
        adapter, pipe = self.adapters[model], self.pipes[model]
        sizes: dict[str, int] = {}
        for j in msg["jobs"]:
            key = adapter.group_key(j)
            sizes[key] = sizes.get(key, 0) + 1
        return max((adapter.working_bytes(n, p["width"], p["height"], p.get("num_frames", 0), p["guidance"],
                                          dtype_bytes_of(pipe)) for n in sizes.values()), default=0)
