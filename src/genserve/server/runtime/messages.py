"""What the runtime sends workers for the engine's decisions (the protocol: workers/protocol.py).
Pure functions of the config, the decision and the job records."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ...config.load import Config
from ...engine import JoinBatch, LoadModel, RunBatch
from ...workers import protocol as P

_JOB_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance")
_INPUT_FIELDS = ("image", "image_sha256", "mask", "task", "strength", "loras",  # absent from older records
                 "output_format", "output_compression",
                 "cache")  # the step cache the job asked for (one per batch: it is part of the batch key)  # how the worker encodes an image (absent: png)


def job_payload(jobs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each job as the worker needs it (step mode reads each job's own steps and guidance); its
    inputs go as result-store keys, which the worker reads."""
    return [{"id": j["id"], **{k: j["params"][k] for k in _JOB_FIELDS},
             **{k: j["params"].get(k) for k in _INPUT_FIELDS}} for j in jobs]


def load_message(config: Config, d: LoadModel) -> dict[str, Any]:
    m = config.models[d.model]
    spec = {"path": str(config.model_dir(d.model)), "kind": m.kind, "dtype": m.dtype,
            "true_cfg_scale": m.family.true_cfg_scale, "max_sequence_length": m.family.max_sequence_length,
            **m.family.speed_spec(),  # prompt cache, compile, attention backend, quantize (docs/performance.md)
            # what requests are checked against: the worker refuses the load if the model cannot produce it
            "size_multiple": m.size_multiple, "frame_stride": m.frame_stride if m.kind == "video" else None}
    if m.family.compile != "off":  # compiled at load for the default size at batch 1 and the largest batch
        spec.update(compile_cache_dir=str(config.server.data_dir / "compile-cache"),
                    warmup={"width": m.default_size[0], "height": m.default_size[1], "guidance": m.default_guidance,
                            "num_frames": m.default_frames if m.kind == "video" else 0,
                            "batch_sizes": sorted({1, m.max_batch_size})})
    if m.source.startswith("s3://"):  # each node downloads it once into its cache (any provider)
        spec.update(source=m.source, endpoint_url=config.results.endpoint_url, region=config.results.region,
                    cache=config.cluster.model_cache)
    return {"op": P.LOAD, "model": d.model, "spec": spec, "reason": d.reason}


def run_message(config: Config, d: RunBatch, jobs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    m = config.models[d.key.model]
    params = {"width": d.key.width, "height": d.key.height, "num_frames": d.key.num_frames,
              "steps": d.key.steps, "guidance": d.key.guidance, "fps": m.fps}
    msg = {"op": P.RUN, "batch_id": d.batch_id, "model": d.key.model, "kind": m.kind, "params": params,
           "jobs": job_payload(jobs), "lora_memory": int(config.server.lora_memory_mb * (1 << 20)),
           "lora_evict": list(d.lora_evict)}
    if m.batching == "step" and not d.key.variant and not d.key.execution:  # a running set: each job brings its own steps and guidance
        msg.update(mode="step", max_size=m.max_batch_size)
    return msg


def join_message(d: JoinBatch, jobs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {"op": P.JOIN, "batch_id": d.batch_id, "jobs": job_payload(jobs), "lora_evict": list(d.lora_evict)}
