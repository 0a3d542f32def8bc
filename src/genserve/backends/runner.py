"""Runs batches on one device with real diffusers pipelines. Lives in a worker process."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..server.results import OUTPUT_TYPES, LocalResultStore, output_name
from .encode import encode_mp4, encode_png

Emit = Callable[[dict[str, Any]], None]


class BatchAborted(Exception):
    """Every job of the batch was canceled: stop the pipeline at this step boundary."""


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def module_bytes(pipe) -> int:
    import torch

    total = 0
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in comp.parameters())
            total += sum(b.numel() * b.element_size() for b in comp.buffers())
    return total


class PipelineRunner:
    def __init__(self, device: str, store: LocalResultStore) -> None:
        self.device = device
        self.store = store
        self.pipes: dict[str, Any] = {}

    def load(self, model: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Load ``model`` unless resident. Returns what the server records about the load."""
        if model in self.pipes:
            return {"model": model, "cached": True, "bytes": module_bytes(self.pipes[model])}
        from diffusers import DiffusionPipeline

        t0 = time.time()
        pipe = DiffusionPipeline.from_pretrained(spec["path"], torch_dtype=resolve_dtype(spec["dtype"], self.device))
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipes[model] = pipe
        return {"model": model, "cached": False, "load_start": t0, "load_end": time.time(), "bytes": module_bytes(pipe)}

    def run(self, msg: dict[str, Any], emit: Emit, canceled: set[str],
            on_step: Callable[[int], None] = lambda step: None) -> None:
        """Run one batch as one pipeline call; report progress, per-job outputs and timings.
        ``on_step(i)`` runs at the end of each step (fault injection hooks in there)."""
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
        t_start = time.time()
        emit({"ev": "started", "batch_id": batch_id, "t": t_start})
        with torch.inference_mode():
            out = pipe(**call)
        t_end = time.time()
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
